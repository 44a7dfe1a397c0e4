"""Headless locust load test against a running δ-mem server: `make load`.

    python -m deploy.load --host http://127.0.0.1:8000 --users 8 --spawn-rate 2 \
        --run-time 60s --out results/load

Runs deploy/locustfile.py headless (locust in a child process: it monkey-patches the standard
library with gevent), bounded in users (--max-users) and time (--run-time, at most
--max-run-time), waits first for /health, writes locust's CSV files (OUT/load_stats.csv,
load_stats_history.csv, load_failures.csv, load_exceptions.csv), its HTML report
(OUT/report.html), its log (OUT/locust.log) and OUT/summary.json, prints a summary
(requests/s, p50/p95 latency, failures per request kind) and exits non-zero on any failed
request, on no request at all, or when locust itself fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
CSV_PREFIX = "load"
HTML = "report.html"


def parse_duration(text: str) -> int:
    """'90', '90s', '2m', '1h30m' -> seconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text)
    if not text or not parts:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 2m, 1h)")
    h, m, s = (int(x or 0) for x in parts.groups())
    return h * 3600 + m * 60 + s


def wait_healthy(host: str, timeout: float) -> None:
    """Wait until GET /health answers 200 (at least one try)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(host.rstrip("/") + "/health", timeout=10) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= deadline:
            raise SystemExit(f"error: {host}/health is not healthy ({last}); is the server up?")
        time.sleep(2)


def _num(row: dict, key: str) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:  # 'N/A' when a kind had no request
        return 0.0


def summarize(out: Path) -> dict:
    """Read OUT/load_stats.csv (and failures): totals and per request kind."""
    stats = out / f"{CSV_PREFIX}_stats.csv"
    rows = list(csv.DictReader(stats.open())) if stats.is_file() else []
    kinds = []
    total = None
    for row in rows:
        item = {
            "type": row["Type"], "name": row["Name"],
            "requests": int(_num(row, "Request Count")),
            "failures": int(_num(row, "Failure Count")),
            "rps": _num(row, "Requests/s"),
            "p50_ms": _num(row, "50%"), "p95_ms": _num(row, "95%"), "p99_ms": _num(row, "99%"),
            "avg_ms": _num(row, "Average Response Time"),
            "max_ms": _num(row, "Max Response Time"),
        }
        if row["Name"] == "Aggregated":
            total = item
        else:
            kinds.append(item)
    failures_csv = out / f"{CSV_PREFIX}_failures.csv"
    failures = list(csv.DictReader(failures_csv.open())) if failures_csv.is_file() else []
    return {"total": total or {"requests": 0, "failures": 0, "rps": 0.0, "p50_ms": 0.0,
                               "p95_ms": 0.0, "p99_ms": 0.0},
            "kinds": kinds,
            "failure_messages": [{"name": f.get("Name"), "error": f.get("Error"),
                                  "occurrences": int(_num(f, "Occurrences"))}
                                 for f in failures]}


def print_summary(summary: dict, out: Path, file=sys.stdout) -> None:
    for k in summary["kinds"]:
        k["label"] = f"{k['type']} {k['name']}"
    w = max([len(k["label"]) for k in summary["kinds"]] + [10]) + 2
    print(f"\n{'request':<{w}}{'count':>7}{'fail':>6}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'max ms':>9}", file=file)
    for k in [*summary["kinds"], {**summary["total"], "label": "total"}]:
        print(f"{k['label']:<{w}}{k['requests']:>7}{k['failures']:>6}{k['rps']:>8.2f}"
              f"{k['p50_ms']:>9.0f}{k['p95_ms']:>9.0f}{k.get('max_ms', 0):>9.0f}", file=file)
    for f in summary["failure_messages"]:
        print(f"FAILED {f['occurrences']}x {f['name']}: {f['error']}", file=file)
    t = summary["total"]
    print(f"\n{t['requests']} requests, {t['rps']:.2f} req/s, p50 {t['p50_ms']:.0f} ms, "
          f"p95 {t['p95_ms']:.0f} ms, {t['failures']} failed; report {out / HTML}", file=file)


def run_load(host: str, users: int, spawn_rate: float, run_time: int, out: Path,
             locustfile: Path = LOCUSTFILE, stop_timeout: int = 60, env: dict | None = None,
             log_level: str = "WARNING") -> tuple[int, dict]:
    """Run locust headless; return (locust's exit code, summary). Writes into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{CSV_PREFIX}_*.csv"):
        old.unlink()
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
           "--host", host, "--users", str(users), "--spawn-rate", str(spawn_rate),
           "--run-time", f"{run_time}s", "--stop-timeout", str(stop_timeout),
           "--csv", str(out / CSV_PREFIX), "--html", str(out / HTML), "--only-summary",
           "--exit-code-on-error", "1", "--loglevel", log_level,
           "--logfile", str(out / "locust.log")]
    # A run that hangs past its time and stop timeout is a failure too.
    limit = run_time + stop_timeout + 120
    try:
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=limit,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        rc, output = 124, (e.stdout or b"").decode(errors="replace") \
            if isinstance(e.stdout, bytes) else (e.stdout or "")
    (out / "locust.out").write_text(output)
    summary = summarize(out)
    summary.update(host=host, users=users, spawn_rate=spawn_rate, run_time_s=run_time,
                   locust_exit_code=rc)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return rc, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=os.environ.get("DELTAMEM_LOAD_HOST", "http://127.0.0.1:8000"),
                   help="server base URL [env DELTAMEM_LOAD_HOST; default %(default)s]")
    p.add_argument("--users", type=int, default=8, help="concurrent users (default %(default)s)")
    p.add_argument("--spawn-rate", type=float, default=2.0,
                   help="users started per second (default %(default)s)")
    p.add_argument("--run-time", type=parse_duration, default=60,
                   help="how long to run, e.g. 60s, 2m (default 60s)")
    p.add_argument("--out", type=Path, default=Path("results/load"),
                   help="output folder for CSV, HTML report, log (default %(default)s)")
    p.add_argument("--max-users", type=int, default=200,
                   help="refuse more users than this (default %(default)s)")
    p.add_argument("--max-run-time", type=parse_duration, default=3600,
                   help="refuse a longer --run-time (default 1h)")
    p.add_argument("--stop-timeout", type=int, default=60,
                   help="seconds users get to finish their request at the end (default %(default)s)")
    p.add_argument("--wait-healthy", type=parse_duration, default=0,
                   help="wait up to this long for /health first (default: one check)")
    p.add_argument("--locustfile", type=Path, default=LOCUSTFILE, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.users <= args.max_users:
        raise SystemExit(f"error: --users must be between 1 and {args.max_users}")
    if not 1 <= args.run_time <= args.max_run_time:
        raise SystemExit(f"error: --run-time must be between 1 s and {args.max_run_time} s")
    if args.spawn_rate <= 0:
        raise SystemExit("error: --spawn-rate must be positive")
    wait_healthy(args.host, args.wait_healthy)
    print(f"locust: {args.users} users (spawn rate {args.spawn_rate}/s) for {args.run_time}s "
          f"against {args.host}; output in {args.out}", flush=True)
    rc, summary = run_load(args.host, args.users, args.spawn_rate, args.run_time, args.out,
                           args.locustfile, args.stop_timeout)
    print_summary(summary, args.out)
    total = summary["total"]
    if rc != 0 or total["failures"] or not total["requests"]:
        tail = "\n".join((args.out / "locust.out").read_text().splitlines()[-15:])
        print(f"\nFAIL (locust exit code {rc}, {total['failures']} failed of "
              f"{total['requests']} requests)\n{tail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
