"""What the benchmarks share: the machine's description, starting and stopping servers, plain
vLLM as people run it."""

from __future__ import annotations

import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads_main_process": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "env": {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                           "OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU")
                if k in os.environ},
    }
    try:
        import vllm

        info["vllm_version"] = vllm.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_total_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_flags() -> dict:
    text = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    flags: set[str] = set()
    for line in text.splitlines():
        if line.lower().startswith("flags:"):
            flags = set(line.split(":", 1)[1].split())
    if not flags:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": sorted(f for f in flags if f.startswith("amx")) or False}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float, name: str
                 ) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} during start-up:\n"
                               + tail(log_path))
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{name} not healthy after {timeout:.0f} s:\n" + tail(log_path))


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM the process group (vLLM's engine core is a child), SIGKILL if it hangs."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def git_info() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    status = git("status", "--short", "server", "memory_store", "deltamem")
    return {"commit": git("log", "-1", "--format=%h"),
            "uncommitted_server_memory_store_deltamem": status.splitlines()}


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of a server's own process (its API) and of all its
    child processes together (vLLM's engine core and worker)."""
    import psutil

    main = psutil.Process(pid)
    engine = 0.0
    for child in main.children(recursive=True):
        try:
            engine += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return {"api": sum(main.cpu_times()[:2]), "engine": engine}


def plain_vllm(model: Path, port: int, dtype: str, extra: list[str] = ()) -> tuple[list[str], dict]:
    """Command and environment of plain vLLM's OpenAI server as people run it: its defaults
    (default compilation, prefix caching on) apart from the dtype, `VLLM_CPU_KVCACHE_SPACE=4`
    unless set (the δ-mem server's default), and without this project's vLLM plugin
    (`VLLM_PLUGINS` lists every other installed general plugin)."""
    from importlib.metadata import entry_points

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--port", str(port), "--dtype", dtype, *extra]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    others = [e.name for e in entry_points(group="vllm.general_plugins") if e.name != "deltamem"]
    env["VLLM_PLUGINS"] = ",".join(others)
    return cmd, env


def serve_and_run(label: str, cmd: list[str], run: Callable[[str, int], dict], *, cwd: Path,
                  log_path: Path, start_timeout: float, log: Callable[[str], None],
                  env: dict | None = None) -> dict:
    """Start one server (`cmd` carries `--port`), wait for /health, `run(url, pid)` (pid: the
    server's process), stop it. The
    result's "server" entry says how it was started; on failure the server's log tail goes to
    `log`."""
    url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    proc = None
    try:
        log(f"{label}: starting {shlex.join(cmd[1:])} (log {log_path})")
        t = time.perf_counter()
        with open(log_path, "ab") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
        wait_healthy(url, proc, log_path, start_timeout, label)
        start_s = time.perf_counter() - t
        log(f"{label}: healthy after {start_s:.0f} s")
        load0 = loadavg()
        res = run(url, proc.pid)
        res["server"] = {"command": shlex.join(cmd[1:]), "start_s": round(start_s, 1),
                         "loadavg_before": load0, "loadavg_after": loadavg()}
        return res
    except Exception:
        log(f"{label} server log tail:\n" + tail(log_path))
        raise
    finally:
        stop_process(proc)
