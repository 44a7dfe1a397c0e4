"""Deployment: the compose file validates, the image files hang together, the load test's
answer checks catch malformed answers, and a short locust run against live servers (embedded
SQLite store and Redis, the shared engine) has zero failed requests and writes its reports.

The image build itself (podman, minutes) is `make test-image` (deploy/test_image.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from live import InThreadServer, free_port

from deploy import load
from deploy.checks import Malformed, check_completion, parse_sse
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LOAD_USERS = 4
LOAD_SECONDS = 45


# --- the compose file ---------------------------------------------------------------------------

def compose_command() -> list[str]:
    """docker-compose 1.29 (Debian: apt-get install docker-compose), else Compose v2."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("neither docker-compose nor `docker compose` is installed: the compose file "
                "cannot be validated (apt-get install -y --no-install-recommends docker-compose; "
                "it validates without a Docker engine)", pytrace=False)


def compose_config(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAMEM_", "GPU_"))}
    return subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), *args,
                           "config"], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


def test_compose_file_validates():
    r = compose_config()
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    services = cfg["services"]
    assert {"redis", "api", "gpu"} <= set(services)

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    assert any(str(v).endswith(":/data") or ":/data:" in str(v) or
               (isinstance(v, dict) and v.get("target") == "/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]

    api = services["api"]
    assert api["build"]["context"] in (str(ROOT), ".")
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert api["environment"]["DELTAMEM_HOST"] == "0.0.0.0"
    # On 0.0.0.0 without a key the server refuses to start unless told to run open; the
    # stack passes the operator's choice through and defaults to refusing.
    assert api["environment"]["DELTAMEM_ALLOW_OPEN"] == "false"
    from server.settings import Settings, exposure_problem
    assert exposure_problem(Settings(host=api["environment"]["DELTAMEM_HOST"])) is not None
    assert any(int(p["target"]) == 8000 for p in api["ports"])
    mounts = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in api["volumes"]}
    assert {"/cache", "/data"} <= mounts
    assert "deltamem-entrypoint" in api["healthcheck"]["test"]

    gpu = services["gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["ENGINE"] == "gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["depends_on"]["redis"]["condition"] == "service_healthy"
    assert set(cfg["volumes"]) >= {"redis-data", "deltamem-cache", "deltamem-data"}


def test_compose_profiles():
    with_gpu = compose_config("--profile", "gpu")
    assert with_gpu.returncode == 0, with_gpu.stderr
    r = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config",
                        "--services"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {"redis", "api"} <= set(r.stdout.split())


# --- the image files ----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    args = {rest.split("=")[0] for word, rest in ins if word == "ARG"}
    assert {"BASE_IMAGE", "ENGINE", "TORCH_INDEX", "BAKE_MODEL"} <= args
    assert ins[[w for w, _ in ins].index("FROM")][1] == "${BASE_IMAGE}"
    run = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip uninstall -y torchvision torchaudio torchcodec" in run
    assert "optional-dependencies" in run  # the engine extra from pyproject.toml
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "8000") in ins
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert health and "healthcheck" in health[0]
    env = " ".join(rest for word, rest in ins if word == "ENV")
    for var in ("DELTAMEM_HOST=0.0.0.0", "DELTAMEM_DATA_DIR=/data", "DELTAMEM_CACHE_DIR=/cache"):
        assert var in env
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert ignored[0] == "*" and "!deploy/entrypoint.sh" in ignored and "!server" in ignored


def test_entrypoint_shell_syntax():
    for script in ("entrypoint.sh", "build_base_image.sh", "test_image.sh"):
        path = ROOT / "deploy" / script
        shell = "sh" if script == "entrypoint.sh" else "bash"
        r = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"
        assert os.access(path, os.X_OK), f"{script} is not executable"


def entrypoint_healthcheck(port: int) -> int:
    env = {**os.environ, "DELTAMEM_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["sh", str(ROOT / "deploy" / "entrypoint.sh"), "healthcheck"],
                          env=env, capture_output=True, timeout=60).returncode


# --- the load test's answer checks --------------------------------------------------------------

def completion(text="Hello!", version=1, usage=None, finish="stop"):
    return {"object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        "session": None if version is None else {"id": "s", "version": version}}


def sse(*chunks, done=True):
    lines = [f"data: {json.dumps(c)}" for c in chunks]
    return [x for line in lines for x in (line, "")] + (["data: [DONE]", ""] if done else [])


def chunk(content=None, finish=None, session=None, usage=None, choices=True):
    c = {"object": "chat.completion.chunk", "usage": usage, "session": session,
         "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
         if choices else []}
    return c


def test_answer_checks():
    assert check_completion(completion(), "s", 1) == "Hello!"
    assert check_completion(completion(version=None), None, None) == "Hello!"
    bad = [
        (completion(text=""), "s", 1),
        (completion(text="   "), "s", 1),
        (completion(version=2), "s", 1),  # version must move by exactly one
        (completion(version=1), None, None),  # a sessionless answer with a session
        (completion(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 4}),
         "s", 1),
        (completion(finish=None), "s", 1),
        ({"error": {"message": "x"}}, "s", 1),
    ]
    for body, sid, version in bad:
        with pytest.raises(Malformed):
            check_completion(body, sid, version)

    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    good = sse(chunk(""), chunk("Hi"), chunk(" there"),
               chunk("", finish="stop", session={"id": "s", "version": 3}),
               chunk(usage=usage, choices=False))
    assert parse_sse(good, "s", 3) == "Hi there"
    assert parse_sse([line.encode() for line in good], "s", 3) == "Hi there"
    with pytest.raises(Malformed, match="DONE"):
        parse_sse(good[:-2], "s", 3)
    with pytest.raises(Malformed):
        parse_sse(good, "s", 4)
    with pytest.raises(Malformed, match="usage"):
        parse_sse(sse(chunk("Hi"), chunk(finish="stop", session={"id": "s", "version": 1})),
                  "s", 1)
    with pytest.raises(Malformed, match="error"):
        parse_sse(sse(chunk("Hi"), {"error": {"message": "boom"}}), "s", 1)
    with pytest.raises(Malformed, match="empty"):
        parse_sse(sse(chunk(""), chunk(finish="stop"), chunk(usage=usage, choices=False)),
                  None, None)


def test_load_arguments_are_bounded(capsys):
    assert load.parse_duration("45s") == 45 and load.parse_duration("2m") == 120
    assert load.parse_duration("1h1m1s") == 3661 and load.parse_duration("30") == 30
    for argv in (["--users", "0"], ["--users", "1000"], ["--run-time", "3h"]):
        with pytest.raises(SystemExit):
            load.main(["--host", "http://127.0.0.1:9", *argv])
    with pytest.raises(SystemExit, match="not healthy"):
        load.main(["--host", f"http://127.0.0.1:{free_port()}", "--users", "1"])


# --- a short locust run against live servers ----------------------------------------------------

def load_settings(engine_host, tmp_path, **kw) -> Settings:
    base = dict(port=free_port(), data_dir=tmp_path, memory_window_tokens=256,
                max_model_len=engine_host.engine.cfg.max_model_len, default_max_tokens=32,
                session_lock_timeout=30)
    return Settings(**{**base, **kw})


def run_short_load(url: str, out: Path) -> dict:
    env = {"DELTAMEM_LOAD_MAX_TOKENS": "24", "DELTAMEM_LOAD_TURNS": "4",
           "DELTAMEM_LOAD_STREAM_SHARE": "0.3"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rc = load.main(["--host", url, "--users", str(LOAD_USERS), "--spawn-rate", "2",
                        "--run-time", f"{LOAD_SECONDS}s", "--out", str(out),
                        "--stop-timeout", "60", "--wait-healthy", "30"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summary = json.loads((out / "summary.json").read_text())
    total = summary["total"]
    assert rc == 0, f"load test failed: {summary['failure_messages']} " \
                    f"(see {out / 'locust.out'})"
    assert total["failures"] == 0, summary["failure_messages"]
    assert total["requests"] >= 20, total
    for name in ("load_stats.csv", "load_stats_history.csv", "load_failures.csv",
                 "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    names = {k["name"] for k in summary["kinds"]}
    assert "/v1/chat/completions [session]" in names
    assert "/v1/chat/completions [no session]" in names
    assert any("stream" in n for n in names)
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_load_live_server(store, engine_host, request, tmp_path):
    kw = {}
    if store == "redis":
        kw["redis_url"] = request.getfixturevalue("redis_server").url
    srv = InThreadServer(engine_host, load_settings(engine_host, tmp_path / "data", **kw))
    try:
        assert entrypoint_healthcheck(srv.port) == 0  # the image's HEALTHCHECK command
        summary = run_short_load(srv.url, tmp_path / "load")
    finally:
        srv.stop()
    assert entrypoint_healthcheck(srv.port) != 0
    t = summary["total"]
    print(f"\nlocust on {store}: {t['requests']} requests, {t['rps']:.2f} req/s, "
          f"p50 {t['p50_ms']:.0f} ms, p95 {t['p95_ms']:.0f} ms, {t['failures']} failed")
