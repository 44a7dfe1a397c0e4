"""Engine benchmark: the δ-mem vLLM engine against plain vLLM, same model, dtype and machine,
one run, the two engines one after the other (never both at once).

- decode: N concurrent requests (default 16) × G generated tokens (default 128, ignore_eos,
  short distinct prompts), and one stream; throughput = generated tokens / wall time from
  submission to the last token (the δ-mem final-state hand-back included), best of R runs.
- prefill: one P-token prompt (default 2,048, distinct random tokens each time, so plain
  vLLM's prefix cache never hits), max_tokens = 1; time to the (only) token, median of R.

δ-mem requests carry a random initial state (as a session's turn would). The δ-mem engine
uses the untrained default adapter (`new_adapter_from_checkpoint(model, seed=0)`) unless
`--adapter` is given: the cost does not depend on the weights' values.

Prints a table with δ-mem/plain ratios and writes JSON with the machine's description.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


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


async def _one(engine, prompt, sp, state):
    """Run one request; return (submit time, first-token time, end time, tokens)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    async for chunk in engine.generate(prompt, sp, state):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        n += len(chunk.token_ids)
    return t0, first, time.perf_counter(), n


async def bench_engine(engine, a, rng_seed: int) -> dict:
    import torch
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(rng_seed)
    vocab = (1000, 40000)

    def prompt(n):
        return torch.randint(*vocab, (n,), generator=g).tolist()

    def state():
        if not engine.memory:
            return None
        return torch.randn(engine.state_shape, generator=g) * 0.1

    res: dict = {}
    # Warm-up (first-call costs: allocator, kernels, the δ-mem scan's first runs).
    await asyncio.gather(*[_one(engine, prompt(a.short_prompt),
                                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                state()) for _ in range(4)])
    await _one(engine, prompt(256), SamplingParams(temperature=0, max_tokens=1), state())

    sp = SamplingParams(temperature=0, max_tokens=a.gen_tokens, ignore_eos=True)
    for name, n in (("decode_1", 1), (f"decode_{a.concurrency}", a.concurrency)):
        rounds = []
        for _ in range(a.decode_repeats):  # best of R: a busy machine only ever slows a run
            runs = [(prompt(a.short_prompt), state()) for _ in range(n)]
            t = time.perf_counter()
            out = await asyncio.gather(*[_one(engine, p, sp, s) for p, s in runs])
            wall = time.perf_counter() - t
            tokens = sum(o[3] for o in out)
            assert tokens == n * a.gen_tokens, f"{name}: {tokens} tokens, not {n * a.gen_tokens}"
            itl = statistics.median((o[2] - o[1]) / max(1, o[3] - 1) for o in out)
            ttft = statistics.median(o[1] - o[0] for o in out)
            rounds.append((tokens / wall, wall, itl, ttft))
        best = max(rounds)
        res[name] = {"requests": n, "tokens": n * a.gen_tokens, "wall_s": round(best[1], 3),
                     "tok_per_s": round(best[0], 2),
                     "tok_per_s_runs": [round(r[0], 2) for r in rounds],
                     "median_inter_token_ms": round(1000 * best[2], 2),
                     "median_ttft_ms": round(1000 * best[3], 1)}
        print(f"  {name}: {best[0]:.1f} tok/s (runs: "
              f"{', '.join(f'{r[0]:.1f}' for r in rounds)})", flush=True)

    ttfts = []
    sp1 = SamplingParams(temperature=0, max_tokens=1)
    for _ in range(a.prefill_repeats):
        t0, first, _, n = await _one(engine, prompt(a.prefill_tokens), sp1, state())
        ttfts.append(first - t0)
    ttft = statistics.median(ttfts)
    res[f"prefill_{a.prefill_tokens}"] = {
        "tokens": a.prefill_tokens, "ttft_s": [round(x, 3) for x in ttfts],
        "median_ttft_s": round(ttft, 3), "tok_per_s": round(a.prefill_tokens / ttft, 1)}
    print(f"  prefill {a.prefill_tokens}: median TTFT {ttft:.2f} s", flush=True)

    # The cost of prefix caching off (δ-mem, docs/design.md, invariant 3): a session turn re-sends its
    # context. Plain vLLM serves the re-sent prefix from its cache; δ-mem recomputes it.
    ttfts = []
    for _ in range(2):
        base = prompt(a.prefill_tokens)
        await _one(engine, base, sp1, state())
        t0, first, _, _ = await _one(engine, base + prompt(32), sp1, state())
        ttfts.append(first - t0)
    res["resent_prefix"] = {"prefix_tokens": a.prefill_tokens, "new_tokens": 32,
                            "ttft_s": [round(x, 3) for x in ttfts],
                            "median_ttft_s": round(statistics.median(ttfts), 3)}
    print(f"  re-sent {a.prefill_tokens}-token prefix + 32 new: median TTFT "
          f"{statistics.median(ttfts):.2f} s", flush=True)
    return res


async def run_one(kind: str, a, adapter_dir: Path | None) -> dict:
    from server.engine.facade import DeltaMemEngine, EngineConfig

    cfg = EngineConfig(model_dir=a.model, adapter_dir=adapter_dir, memory=kind == "deltamem",
                       dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                       max_num_batched_tokens=a.max_num_batched_tokens,
                       kv_cache_gib=a.kv_cache_gib,
                       # Keep the two engines' Prometheus metrics apart (one process).
                       extra_engine_args={"disable_log_stats": True})
    print(f"[{kind}] starting engine ...", flush=True)
    t = time.perf_counter()
    engine = DeltaMemEngine.start(cfg)
    start_s = time.perf_counter() - t
    try:
        sc = engine.llm.vllm_config.scheduler_config
        load0 = loadavg()
        res = await bench_engine(engine, a, rng_seed=0)
        res["engine"] = {"start_s": round(start_s, 1), "memory": engine.memory,
                         "adapter": engine.adapter.fingerprint() if engine.adapter else None,
                         "max_num_batched_tokens": sc.max_num_batched_tokens,
                         "max_num_seqs": sc.max_num_seqs,
                         "prefix_caching": engine.llm.vllm_config.cache_config
                         .enable_prefix_caching,
                         "loadavg_before": load0, "loadavg_after": loadavg()}
    finally:
        engine.shutdown()
    return res


def table(results: dict, a) -> tuple[str, dict]:
    keys = [("decode_1", "tok_per_s", "decode, 1 stream (tok/s)"),
            (f"decode_{a.concurrency}", "tok_per_s",
             f"decode, {a.concurrency} streams (tok/s)"),
            (f"prefill_{a.prefill_tokens}", "tok_per_s",
             f"prefill {a.prefill_tokens} (tok/s)"),
            (f"prefill_{a.prefill_tokens}", "median_ttft_s",
             f"prefill {a.prefill_tokens} TTFT (s, lower=better)"),
            ("resent_prefix", "median_ttft_s",
             f"re-sent {a.prefill_tokens} prefix +32, TTFT (s)")]
    lines = [f"{'metric':36s} {'plain':>10s} {'δ-mem':>10s} {'δ-mem/plain':>12s}"]
    ratios = {}
    p, d = results.get("plain"), results.get("deltamem")
    for sec, field, label in keys:
        pv = p[sec][field] if p else None
        dv = d[sec][field] if d else None
        ratio = dv / pv if pv and dv else None
        if ratio is not None:
            ratios[f"{sec}.{field}"] = round(ratio, 3)
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")  # noqa: E731
        lines.append(f"{label:36s} {fmt(pv):>10s} {fmt(dv):>10s} "
                     f"{'-' if ratio is None else f'{ratio:.3f}×':>12s}")
    return "\n".join(lines), ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="backbone folder (default: the project's default model)")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="δ-mem adapter folder (default: untrained, seed 0)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engines", default="plain,deltamem",
                    help="comma list of plain, deltamem (run in that order)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--short-prompt", type=int, default=16, help="decode prompts' length")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-repeats", type=int, default=3, help="prefill: median of R")
    ap.add_argument("--decode-repeats", type=int, default=2, help="decode: best of R")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="step token budget (default: vLLM's)")
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("results/bench_engine.json"))
    a = ap.parse_args(argv)

    from deltamem.model_fetch import resolve_model

    a.model = Path(resolve_model(str(a.model) if a.model else None))
    kinds = [k.strip() for k in a.engines.split(",") if k.strip()]
    if not set(kinds) <= {"plain", "deltamem"}:
        ap.error("--engines takes plain and/or deltamem")

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        adapter_dir = a.adapter
        if "deltamem" in kinds and adapter_dir is None:
            from deltamem.adapter import new_adapter_from_checkpoint, save_adapter

            adapter_dir = save_adapter(new_adapter_from_checkpoint(a.model, seed=0),
                                       Path(tmp) / "adapter")
        for kind in kinds:  # one engine at a time, in one event loop each
            results[kind] = asyncio.run(run_one(kind, a, adapter_dir))
            gc.collect()  # finalise the shut-down engine now, not at interpreter exit

    text, ratios = table(results, a)
    machine = machine_info()
    print(f"\nengine benchmark: {a.model.name}, {a.dtype}, {machine['cpu_model']}, "
          f"{machine['cpu_count']} cores, torch threads (main) "
          f"{machine['torch_threads_main_process']}, load avg {loadavg()}")
    print(text)
    doc = {"benchmark": "engine", "model": a.model.name, "dtype": a.dtype,
           "adapter": str(a.adapter) if a.adapter else "untrained default (seed 0)",
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "machine": machine, "results": results, "ratios_deltamem_over_plain": ratios,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    sys.exit(main())
