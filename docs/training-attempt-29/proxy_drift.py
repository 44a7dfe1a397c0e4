"""Attempt 29: is the proxy's gap to the served replay the cache's drift? An adapter's
teacher-forced held-out measure (attempt 28's e2e_copy.evaluate) on caches collected with
different source adapters: the shipped adapter's (what training sees) and the adapter's own
(what serving it sees). A one-off (not project code).

    PYTHONPATH=<as e2e_grouped.py> .venv/bin/python docs/training-attempt-29/proxy_drift.py \\
        --adapter A --caches /tmp/att28_heldout_0_16.pt /tmp/att29A_heldout_0_16.pt
"""

import argparse

import torch
from diagnose import replay_runtime
from e2e_copy import copy_slots, evaluate, far_only


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--caches", nargs="+", required=True)
    args = ap.parse_args()
    _, rt, _, _ = replay_runtime(args.adapter)
    slots = copy_slots(rt)
    for path in args.caches:
        held = far_only(torch.load(path, mmap=True))
        print(f"{args.adapter} on {path}: {evaluate(rt, held, slots)}", flush=True)


if __name__ == "__main__":
    main()
