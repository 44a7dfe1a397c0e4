"""`deltamem bench`: the benchmarks, each a script under benchmarks/ that prints a table and
saves JSON. This runs them in turn (one process each, so one's threads don't skew another)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {
    "scan": "benchmarks/bench_scan.py",
    "store": "benchmarks/bench_store.py",
    "served": "benchmarks/bench_served.py",
    "multiturn": "benchmarks/bench_multiturn.py",
}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", choices=[*BENCHES, []], default=[],
                   help=f"benchmarks to run (default: all of {', '.join(BENCHES)})")
    p.add_argument("--out-dir", type=Path, default=Path("results"),
                   help="where the JSON results go (default: results/)")


def run(args) -> int:
    names = args.names or list(BENCHES)
    rc = 0
    for name in names:
        script = ROOT / BENCHES[name]
        if not script.is_file():
            print(f"[bench] {name}: {script} not present, skipped", file=sys.stderr)
            continue
        print(f"\n== {name} ==", flush=True)
        out = args.out_dir / f"bench_{name}.json"
        rc |= subprocess.call([sys.executable, str(script), "--json", str(out)])
    return rc
