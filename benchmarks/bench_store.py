"""Latency of session store load/commit for the default model's state.

State float32 (30, 1, 8, 8) with a 1,000-token transcript, on loopback Redis and on SQLite in
a temporary directory. Without --redis-url a private redis-server is started (append-only
file, fsync every second: Redis's recommended durable setting).

    python benchmarks/bench_store.py [--iters 500] [--json results/bench_store.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import RedisServer  # noqa: E402

from memory_store import (  # noqa: E402
    RedisStore,
    SessionRecord,
    SessionStore,
    SqliteStore,
    StateIdentity,
    decode_record,
    encode_record,
)

IDENTITY = StateIdentity(
    backbone="SmolLM2-135M-Instruct@sha256:bench",
    adapter="none",
    num_layers=30,
    num_state_heads=1,
    rank=8,
)
TRANSCRIPT_TOKENS = 1000
WARMUP = 20


def make_record(session_id: str) -> SessionRecord:
    gen = torch.Generator().manual_seed(0)
    transcript = torch.randint(0, 49_152, (TRANSCRIPT_TOKENS,), generator=gen).tolist()
    # About 4 characters a token, split over 10 turns, like the chat that made the transcript.
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "lorem ipsum " * 33}
        for i in range(10)
    ]
    return SessionRecord(
        session_id=session_id,
        tenant="bench",
        identity=IDENTITY,
        state=torch.randn(IDENTITY.state_shape, generator=gen),
        transcript=transcript,
        messages=messages,
        tokens_absorbed=TRANSCRIPT_TOKENS - 1,
        turns=5,
        meta={"window": 512},
    )


def percentile(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[max(0, math.ceil(p / 100 * len(sorted_ms)) - 1)]


def stats(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": percentile(ordered, 50),
        "p99_ms": percentile(ordered, 99),
        "mean_ms": sum(ordered) / len(ordered),
        "n": len(ordered),
    }


async def timed(fn: Callable[[], Awaitable[Any]], iters: int) -> list[float]:
    for _ in range(WARMUP):
        await fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        await fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


async def bench_store(store: SessionStore, iters: int) -> dict[str, Any]:
    session_id = f"bench-{uuid.uuid4().hex[:8]}"
    record = await store.commit(make_record(session_id), 0)

    async def commit() -> None:
        nonlocal record
        record = await store.commit(record, record.version)

    async def load() -> None:
        await store.load("bench", session_id, expected_identity=IDENTITY)

    result = {"commit": stats(await timed(commit, iters)), "load": stats(await timed(load, iters))}
    await store.delete("bench", session_id)
    return result


def bench_codec(iters: int) -> dict[str, Any]:
    record = make_record("codec")
    data = encode_record(record)
    encode, decode = [], []
    for _ in range(iters):
        start = time.perf_counter_ns()
        encode_record(record)
        encode.append((time.perf_counter_ns() - start) / 1e6)
        start = time.perf_counter_ns()
        decode_record(data, IDENTITY)
        decode.append((time.perf_counter_ns() - start) / 1e6)
    return {"encode": stats(encode), "decode": stats(decode)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    record_bytes = len(encode_record(make_record("size-probe")))
    results: dict[str, Any] = {"codec": bench_codec(args.iters)}
    with tempfile.TemporaryDirectory(prefix="dmem-bench-") as tmp:
        async with SqliteStore(Path(tmp) / "sessions.sqlite3") as sqlite_store:
            results["sqlite"] = await bench_store(sqlite_store, args.iters)
        server = None
        url = args.redis_url
        if url is None:
            server = RedisServer(Path(tmp) / "redis", appendfsync="everysec")
            server.start()
            url = server.url
        try:
            prefix = f"dmembench{uuid.uuid4().hex[:6]}"
            async with RedisStore(url, prefix=prefix) as redis_store:
                results["redis"] = await bench_store(redis_store, args.iters)
        finally:
            if server is not None:
                server.close()
    return {
        "config": {
            "state_shape": list(IDENTITY.state_shape),
            "state_dtype": "float32",
            "transcript_tokens": TRANSCRIPT_TOKENS,
            "iters": args.iters,
            "warmup": WARMUP,
            "keep_versions": 5,
            "redis": args.redis_url or "private redis-server, appendonly yes, appendfsync everysec",
            "sqlite": "WAL, synchronous=NORMAL, temp dir",
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "record_bytes": record_bytes,
        "state_bytes": 4 * math.prod(IDENTITY.state_shape),
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"record: {report['record_bytes']} bytes "
        f"(state {report['state_bytes']} B, {TRANSCRIPT_TOKENS}-token transcript)"
    )
    print(f"{'backend':<8} {'op':<8} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for backend in ("redis", "sqlite", "codec"):
        for op, s in report["results"][backend].items():
            print(
                f"{backend:<8} {op:<8} {s['p50_ms']:>9.3f} {s['p99_ms']:>9.3f} {s['mean_ms']:>9.3f}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="results/bench_store.json", help="output JSON path")
    parser.add_argument("--iters", type=int, default=500, help="timed operations per test")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print_table(report)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
