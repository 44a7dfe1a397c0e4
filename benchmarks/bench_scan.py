"""Scan benchmark: the reference per-token loop against the fast paths, one run.

Shape of the default model's prefill: T tokens, one row per layer (batch = 30), H = 1, r = 8.
Then training (forward and backward): the chunked path with its blocks kept for backward
against the checkpointed one the dispatcher uses under autograd, in time and in memory kept.
Then the engine's memory path for one step, all layers (server/engine/model.py: step layout,
projections, the `deltamem::scan` op, read-out), eager and compiled with inductor as vLLM
compiles it, for decode steps of 1 and 16 requests and a prefill chunk: the fixed cost δ-mem
adds to each engine step. Prints tables and writes JSON; ratios are against a baseline measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from deltamem.scan import (
    DEFAULT_CHUNK,
    delta_rule_scan,
    delta_rule_scan_chunked,
    delta_rule_scan_reference,
    random_inputs,
)


def _time(fn, args, repeats):
    fn(*args)  # warm-up (and the kernel's compile)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def _train_step(fn, leaves, mask):
    """Seconds of one forward and backward, and the bytes kept for the backward pass."""
    kept = 0

    def pack(t):
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    for x in leaves:
        x.grad = None
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reads, state = fn(*leaves, mask)
    (reads.sum() + state.sum()).backward()
    return time.perf_counter() - t, kept


def _bench_training(batch, tokens, heads, repeats):
    args = random_inputs(batch, tokens, heads, 8, dtype=torch.float32, seed=1)
    leaves = [x.requires_grad_(True) for x in args[:5]]
    out = {}
    for name, fn in (("kept", delta_rule_scan_chunked), ("checkpointed", delta_rule_scan)):
        _train_step(fn, leaves, args[5])  # warm-up
        runs = [_train_step(fn, leaves, args[5]) for _ in range(repeats)]
        out[name] = (min(r[0] for r in runs), runs[0][1])
    return out


def _bench_engine_step(adapter_dir: Path | None, repeats: int, dtype: torch.dtype) -> dict:
    """Milliseconds of the memory path of one engine step, all layers, eager and compiled."""
    from types import SimpleNamespace

    from deltamem.adapter import load_adapter, new_adapter_from_checkpoint
    from server.engine.build import SHIPPED_ADAPTERS
    from server.engine.model import EXTRA_ARGS_KEY, DeltaMemRuntime, memory_corrections

    if adapter_dir is None:
        shipped = sorted(SHIPPED_ADAPTERS.glob("*/adapter_config.json"))
        adapter_dir = shipped[0].parent if shipped else None
    if adapter_dir is not None:
        adapter = load_adapter(adapter_dir)
    else:
        from deltamem.model_fetch import resolve_model

        adapter = new_adapter_from_checkpoint(resolve_model(None), seed=0)
    rt = DeltaMemRuntime(adapter.module, torch.device("cpu"))
    layers = {}
    for i in rt.layer_ids:
        layers[i] = torch.nn.Module()
        rt.install(layers[i], i, dtype=dtype)
    d = adapter.config.hidden_size

    def step(x):  # each layer's corrections, as the engine's attention forwards add them
        for i in rt.layer_ids:
            dq, do = memory_corrections(layers[i], x)
            x = x + 1e-3 * do
        return x

    compiled = torch.compile(step, dynamic=True)
    out = {"adapter": str(adapter_dir or "untrained"), "dtype": str(dtype),
           "layers": len(rt.layer_ids),
           "heads": adapter.config.num_state_heads}
    for label, lens in (("decode, 1 request", [1]), ("decode, 16 requests", [1] * 16),
                        ("prefill, 512 tokens", [512])):
        ids = [f"r{b}" for b in range(len(lens))]
        reqs = {r: SimpleNamespace(sampling_params=SimpleNamespace(
            extra_args={EXTRA_ARGS_KEY: {"key": r}})) for r in ids}
        row = {}
        for name, fn in (("eager", step), ("compiled", compiled)):
            pos, times = [0] * len(lens), []
            with torch.inference_mode():
                for it in range(repeats * 10 + 3):
                    x = torch.randn(sum(lens), d, dtype=dtype)
                    t = time.perf_counter()
                    rt.plan_step(ids, lens, pos, reqs)
                    rt.begin_forward(x.shape[0])
                    fn(x)
                    rt.end_forward()
                    if it >= 3:  # after warm-up (and compiles)
                        times.append(time.perf_counter() - t)
                    pos = [p + n for p, n in zip(pos, lens, strict=True)]
            rt.requests.clear()
            row[name] = sorted(times)[len(times) // 2]
        out[label] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=4,
                    help="episodes of the training comparison (default 4)")
    ap.add_argument("--train-tokens", type=int, default=1000,
                    help="history tokens an episode in the training comparison (default 1000)")
    ap.add_argument("--train-heads", type=int, default=5,
                    help="state heads in the training comparison (default 5)")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="adapter of the engine-step comparison (default: the shipped one)")
    ap.add_argument("--dtype", default="auto",
                    help="engine dtype of the engine-step comparison (default: as deltamem "
                    "serve resolves auto on this machine)")
    ap.add_argument("--json", type=Path, default=Path("results/bench_scan.json"))
    a = ap.parse_args(argv)
    args = random_inputs(a.batch, a.tokens, 1, 8, dtype=torch.float32)
    t_loop = _time(delta_rule_scan_reference, args, max(1, a.repeats // 2))
    t_fast = _time(delta_rule_scan, args, a.repeats)
    t_chunk = _time(delta_rule_scan_chunked, args, a.repeats)
    rows = [("reference loop", t_loop), ("fast path (default, CPU kernel)", t_fast),
            ("chunked (autograd / GPU path)", t_chunk)]
    print(f"scan T={a.tokens} B={a.batch} H=1 r=8 float32, torch threads="
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'path':34s} {'ms':>10s} {'speed-up vs loop':>18s}")
    for name, t in rows:
        print(f"{name:34s} {t * 1e3:10.2f} {t_loop / t:17.1f}x")
    tr = _bench_training(a.train_batch, a.train_tokens, a.train_heads, max(1, a.repeats // 2))
    (t_kept, m_kept), (t_ckpt, m_ckpt) = tr["kept"], tr["checkpointed"]
    print(f"\ntraining, one layer: forward + backward, B={a.train_batch} T={a.train_tokens} "
          f"H={a.train_heads} r=8 float32, chunk {DEFAULT_CHUNK.get('cpu')}")
    print(f"{'chunked path':34s} {'ms':>10s} {'MB kept':>10s} {'time vs kept':>14s}")
    for name, t, m in (("blocks kept for backward", t_kept, m_kept),
                       ("checkpointed (default)", t_ckpt, m_ckpt)):
        print(f"{name:34s} {t * 1e3:10.1f} {m / 1e6:10.1f} {t / t_kept:13.2f}x")
    from server.engine.build import resolve_dtype

    st = _bench_engine_step(a.adapter, a.repeats, getattr(torch, resolve_dtype(a.dtype)))
    print(f"\nengine step, memory path of all {st['layers']} layers ({st['heads']} state heads, "
          f"{st['adapter']}, {st['dtype']}), median")
    print(f"{'step':34s} {'eager ms':>10s} {'compiled ms':>12s} {'µs a layer':>11s} "
          f"{'compiled vs eager':>18s}")
    for label in ("decode, 1 request", "decode, 16 requests", "prefill, 512 tokens"):
        e, c = st[label]["eager"], st[label]["compiled"]
        print(f"{label:34s} {e * 1e3:10.2f} {c * 1e3:12.2f} {c / st['layers'] * 1e6:11.0f} "
              f"{c / e:17.2f}x")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({
        "engine_step_s": st,
        "tokens": a.tokens, "batch": a.batch, "threads": torch.get_num_threads(),
        "machine": platform.node(), "loop_s": t_loop, "fast_s": t_fast, "chunked_s": t_chunk,
        "fast_speedup": t_loop / t_fast, "chunked_speedup": t_loop / t_chunk,
        "train": {"batch": a.train_batch, "tokens": a.train_tokens, "heads": a.train_heads,
                  "kept_s": t_kept, "kept_bytes": m_kept, "checkpointed_s": t_ckpt,
                  "checkpointed_bytes": m_ckpt}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
