"""Scan benchmark: the reference per-token loop against the fast paths, one run.

Shape of the default model's prefill: T tokens, one row per layer (batch = 30), H = 1, r = 8.
Prints a table and writes JSON; ratios are against the loop measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from deltamem.scan import (
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
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
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({
        "tokens": a.tokens, "batch": a.batch, "threads": torch.get_num_threads(),
        "machine": platform.node(), "loop_s": t_loop, "fast_s": t_fast, "chunked_s": t_chunk,
        "fast_speedup": t_loop / t_fast, "chunked_speedup": t_loop / t_chunk}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
