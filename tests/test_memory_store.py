"""Contract tests of memory_store, run against both backends."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import socket
import sqlite3
import struct
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch

import memory_store.base as store_base
from memory_store import (
    CorruptRecord,
    IdentityMismatch,
    InvalidSessionId,
    RedisStore,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    SqliteStore,
    StateIdentity,
    StoreError,
    StoreUnavailable,
    TooManySessions,
    UnknownFormat,
    VersionConflict,
    decode_record,
    encode_record,
    open_store,
    validate_session_id,
)
from memory_store.base import CommitPlan, plan_commit
from memory_store.codec import (
    HEAD_MAGIC,
    _assemble,
    _encode_states,
    _pack_tokens,
    _scalar_header,
    decode_delta,
    decode_head,
    decode_state_blob,
    decode_turns,
    encode_state_blob,
    split_parts,
    state_digest,
)
from memory_store.record import StoredBase

IDENTITY = StateIdentity(
    backbone="SmolLM2-135M-Instruct@sha256:ab12cd34",
    adapter="none",
    num_layers=30,
    num_state_heads=1,
    rank=8,
)
OTHER_BACKBONE = dataclasses.replace(IDENTITY, backbone="Qwen3-4B@sha256:ffff")
TENANT = "default"


def make_record(
    session_id: str = "s1",
    tenant: str = TENANT,
    n_tokens: int = 12,
    seed: int = 0,
    with_state: bool = True,
) -> SessionRecord:
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(IDENTITY.state_shape, generator=gen) if with_state else None
    transcript = torch.randint(0, 49_152, (n_tokens,), generator=gen).tolist()
    return SessionRecord(
        session_id=session_id,
        tenant=tenant,
        identity=IDENTITY,
        state=state,
        transcript=transcript,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"hello #{seed} — ünïcode ✓"},
        ],
        tokens_absorbed=max(0, n_tokens - 1),
        turns=1,
        meta={"window": 512, "nested": {"a": [1, 2.5, None]}},
    )


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
    )


def assert_same_content(a: SessionRecord, b: SessionRecord) -> None:
    assert a.identity == b.identity
    assert same_bits(a.state, b.state)
    assert a.transcript == b.transcript
    assert a.messages == b.messages
    assert a.tokens_absorbed == b.tokens_absorbed
    assert a.turns == b.turns
    assert a.meta == b.meta


def next_turn(record: SessionRecord, delta: list[int], seed: int) -> SessionRecord:
    gen = torch.Generator().manual_seed(seed)
    return dataclasses.replace(
        record,
        state=torch.randn(IDENTITY.state_shape, generator=gen),
        transcript=record.transcript + delta,
        messages=record.messages + [{"role": "user", "content": f"turn {seed}"}],
        tokens_absorbed=len(record.transcript) + len(delta) - 1,
        turns=record.turns + 1,
    )


# -- codec ---------------------------------------------------------------------------------


def test_codec_round_trip_is_bit_exact() -> None:
    record = make_record(n_tokens=1000)
    record.state[0, 0, 0, 0] = float("nan")
    record.state[1, 0, 0, 0] = -0.0
    record.state[2, 0, 0, 0] = float("-inf")
    data = encode_record(record)
    decoded = decode_record(data, IDENTITY)
    assert_same_content(record, decoded)
    assert (decoded.session_id, decoded.tenant, decoded.version) == ("s1", TENANT, 0)
    assert decoded.created_at == record.created_at
    assert encode_record(decoded) == data


def test_codec_fresh_state_and_empty_transcript() -> None:
    record = SessionRecord(session_id="fresh", tenant=TENANT, identity=IDENTITY)
    decoded = decode_record(encode_record(record))
    assert decoded.state is None
    assert decoded.transcript == [] and decoded.messages == [] and decoded.tokens_absorbed == 0


def test_codec_detects_every_flipped_bit() -> None:
    data = encode_record(make_record(n_tokens=50))
    positions = sorted({*range(0, len(data), max(1, len(data) // 151)), len(data) - 1})
    for pos in positions:
        for bit in (0, 7):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(CorruptRecord):
                decode_record(bytes(bad))


def test_codec_detects_truncation_and_trailing_bytes() -> None:
    data = encode_record(make_record())
    for cut in (0, 1, 5, 8, 12, 25, len(data) // 2, len(data) - 32, len(data) - 1):
        with pytest.raises(CorruptRecord, match="truncated"):
            decode_record(data[:cut])
    with pytest.raises(CorruptRecord, match="trailing"):
        decode_record(data + b"\0")


def test_codec_unknown_magic_and_format() -> None:
    data = encode_record(make_record())
    with pytest.raises(UnknownFormat, match="magic"):
        decode_record(b"PK\x03\x04" + data[4:])
    with pytest.raises(UnknownFormat, match="format 2"):
        decode_record(data[:8] + (2).to_bytes(2, "little") + data[10:])
    assert issubclass(UnknownFormat, CorruptRecord)


def test_codec_identity_mismatch() -> None:
    data = encode_record(make_record())
    with pytest.raises(IdentityMismatch, match="backbone"):
        decode_record(data, OTHER_BACKBONE)
    with pytest.raises(IdentityMismatch, match="rank"):
        decode_record(data, dataclasses.replace(IDENTITY, rank=4))


def _forged(state: torch.Tensor, info: Any) -> bytes:
    from safetensors.torch import save

    header = {
        "session_id": "s1",
        "tenant": TENANT,
        "identity": IDENTITY.to_json(),
        "version": 1,
        "turns": 1,
        "tokens_absorbed": 0,
        "created_at": 0.0,
        "updated_at": 0.0,
        "state": info,
        "messages": [],
        "meta": {},
    }
    return _assemble(header, _pack_tokens([1, 2]), save({"state": state}))


def test_codec_rejects_state_of_wrong_dtype_or_shape_even_with_valid_checksum() -> None:
    shape = list(IDENTITY.state_shape)
    good = _forged(torch.zeros(IDENTITY.state_shape), {"dtype": "float32", "shape": shape})
    assert decode_record(good).state is not None
    bad_shape = _forged(torch.zeros(30, 1, 4, 4), {"dtype": "float32", "shape": shape})
    bad_dtype = _forged(
        torch.zeros(IDENTITY.state_shape, dtype=torch.float64), {"dtype": "float32", "shape": shape}
    )
    bad_info = _forged(torch.zeros(IDENTITY.state_shape), {"dtype": "float16", "shape": shape})
    for data in (bad_shape, bad_dtype, bad_info):
        with pytest.raises(CorruptRecord):
            decode_record(data)


def test_encode_rejects_invalid_records() -> None:
    record = make_record()
    for bad in (
        dataclasses.replace(record, state=record.state.double()),
        dataclasses.replace(record, state=torch.zeros(30, 1, 4, 4)),
        dataclasses.replace(record, tokens_absorbed=len(record.transcript) + 1),
        dataclasses.replace(record, transcript=[1, -2]),
        dataclasses.replace(record, transcript=[2**31]),
        dataclasses.replace(record, meta={"x": object()}),
    ):
        with pytest.raises(ValueError):
            encode_record(bad)


def test_validate_session_id() -> None:
    for good in ("a", "A-b_c.d:e", "x" * 128, "0", "chat:2024-01-01.7"):
        assert validate_session_id(good) == good
    for bad in ("", ".hidden", "a/b", "a b", "x" * 129, "{a}", "é", "a\n", None, 5):
        with pytest.raises(InvalidSessionId):
            validate_session_id(bad)


# -- the store contract, for both backends -------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "sqlite":
        backend: SessionStore = SqliteStore(tmp_path / "sessions.sqlite3")
    else:
        server = request.getfixturevalue("redis_server")
        server.start()  # no-op unless an earlier test left it stopped
        # A fresh prefix per test isolates tests that share the server.
        backend = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:12]}")
    yield backend
    await backend.close()


async def test_commit_and_load_round_trip(store: SessionStore) -> None:
    record = make_record()
    before = time.time()
    stored = await store.commit(record, expected_version=0)
    assert stored.version == 1 and stored.updated_at >= before
    assert record.version == 0  # the argument is left alone
    loaded = await store.load(TENANT, "s1", expected_identity=IDENTITY)
    assert_same_content(record, loaded)
    assert loaded.version == 1
    assert loaded.created_at == record.created_at
    assert loaded.updated_at == stored.updated_at

    fresh = SessionRecord(session_id="fresh", tenant=TENANT, identity=IDENTITY)
    await store.commit(fresh, 0)
    assert (await store.load(TENANT, "fresh")).state is None


async def test_commit_conflicts(store: SessionStore) -> None:
    record = make_record()
    await store.commit(record, 0)
    with pytest.raises(VersionConflict) as info:
        await store.commit(record, 0)
    assert info.value.current_version == 1
    with pytest.raises(VersionConflict):
        await store.commit(record, 5)
    with pytest.raises(VersionConflict):
        await store.commit(make_record("absent"), 3)
    assert (await store.load(TENANT, "s1")).version == 1


async def test_concurrent_commits_from_one_version_exactly_one_wins(store: SessionStore) -> None:
    base = await store.commit(make_record(), 0)
    candidates = [next_turn(base, [1000 + i], seed=i) for i in range(50)]
    results = await asyncio.gather(
        *(store.commit(c, base.version) for c in candidates), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, SessionRecord)]
    losers = [r for r in results if isinstance(r, VersionConflict)]
    assert len(winners) == 1 and len(losers) == 49, results
    loaded = await store.load(TENANT, "s1")
    assert loaded.version == 2
    assert_same_content(winners[0], loaded)


async def test_serialised_commits_keep_every_delta_in_order(store: SessionStore) -> None:
    record = SessionRecord(session_id="chat", tenant=TENANT, identity=IDENTITY)
    for i in range(50):
        current = await store.load(TENANT, "chat") if i else record
        record = await store.commit(next_turn(current, [3 * i, 3 * i + 1, 3 * i + 2], i), i)
    loaded = await store.load(TENANT, "chat")
    assert loaded.version == 50 and loaded.turns == 50
    assert loaded.transcript == list(range(150))
    assert [m["content"] for m in loaded.messages] == [f"turn {i}" for i in range(50)]
    assert_same_content(record, loaded)


async def test_load_errors(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        await store.load(TENANT, "nope")
    await store.commit(make_record(), 0)
    with pytest.raises(IdentityMismatch):
        await store.load(TENANT, "s1", expected_identity=OTHER_BACKBONE)
    with pytest.raises(SessionNotFound):
        await store.load("another-tenant", "s1")


async def test_list_pagination_by_session_id(store: SessionStore) -> None:
    ids = [f"sess-{i:02d}" for i in (5, 3, 0, 6, 1, 4, 2)]
    for n, session_id in enumerate(ids):
        await store.commit(make_record(session_id, seed=n), 0)
    await store.commit(make_record("other", tenant="tenant-b"), 0)

    pages: list[list[str]] = []
    cursor = None
    while True:
        page, cursor = await store.list(TENANT, limit=3, after=cursor)
        pages.append([s.session_id for s in page])
        if cursor is None:
            break
    assert pages == [
        ["sess-00", "sess-01", "sess-02"],
        ["sess-03", "sess-04", "sess-05"],
        ["sess-06"],
    ]
    page, cursor = await store.list(TENANT, limit=7)
    assert len(page) == 7 and cursor is None
    summary = page[0]
    assert (summary.version, summary.turns, summary.tokens_absorbed) == (1, 1, 11)
    assert summary.created_at <= summary.updated_at
    assert [s.session_id for s in (await store.list("tenant-b"))[0]] == ["other"]
    assert await store.list("empty-tenant") == ([], None)
    with pytest.raises(ValueError):
        await store.list(TENANT, limit=0)


async def test_versions_and_rollback(store: SessionStore) -> None:
    snapshots = {}
    record = await store.commit(make_record(), 0)
    snapshots[1] = record
    for v in range(2, 8):
        record = await store.commit(next_turn(record, [v], seed=v), record.version)
        snapshots[v] = record
    assert await store.versions(TENANT, "s1") == [3, 4, 5, 6, 7]

    rolled = await store.rollback(TENANT, "s1", 4)
    assert rolled.version == 8
    loaded = await store.load(TENANT, "s1")
    assert loaded.version == 8
    assert_same_content(snapshots[4], loaded)
    assert loaded.created_at == snapshots[1].created_at
    assert await store.versions(TENANT, "s1") == [4, 5, 6, 7, 8]

    with pytest.raises(SessionNotFound):
        await store.rollback(TENANT, "s1", 2)
    with pytest.raises(SessionNotFound):
        await store.rollback(TENANT, "missing", 1)
    with pytest.raises(SessionNotFound):
        await store.versions(TENANT, "missing")
    # The rolled-back state is an ordinary version: the next commit CASes against it.
    await store.commit(next_turn(loaded, [99], seed=99), 8)
    assert (await store.load(TENANT, "s1")).transcript[-1] == 99


async def test_fork(store: SessionStore) -> None:
    source = await store.commit(make_record(), 0)
    source = await store.commit(next_turn(source, [7, 8], seed=1), 1)
    forked = await store.fork(TENANT, "s1", "s1-fork")
    assert forked.version == 1 and forked.session_id == "s1-fork"
    loaded = await store.load(TENANT, "s1-fork")
    assert_same_content(source, loaded)
    assert loaded.version == 1
    assert (await store.load(TENANT, "s1")).version == 2
    with pytest.raises(VersionConflict):
        await store.fork(TENANT, "s1", "s1-fork")
    with pytest.raises(SessionNotFound):
        await store.fork(TENANT, "missing", "x")
    with pytest.raises(InvalidSessionId):
        await store.fork(TENANT, "s1", "bad/id")


async def test_export_import(store: SessionStore) -> None:
    source = await store.commit(make_record(), 0)
    data = await store.export(TENANT, "s1")
    assert decode_record(data).version == 1

    imported = await store.import_("tenant-b", "copy", data, expected_identity=IDENTITY)
    assert imported.version == 1
    loaded = await store.load("tenant-b", "copy")
    assert (loaded.tenant, loaded.session_id) == ("tenant-b", "copy")
    assert_same_content(source, loaded)

    with pytest.raises(VersionConflict):
        await store.import_("tenant-b", "copy", data)
    other = encode_record(make_record(seed=5))
    again = await store.import_("tenant-b", "copy", other, overwrite=True)
    assert again.version == 2
    assert_same_content(make_record(seed=5), await store.load("tenant-b", "copy"))
    assert (await store.import_(TENANT, "new-via-overwrite", data, overwrite=True)).version == 1

    with pytest.raises(IdentityMismatch):
        await store.import_(TENANT, "x", data, expected_identity=OTHER_BACKBONE)
    with pytest.raises(CorruptRecord):
        await store.import_(TENANT, "x", data[:-1])
    with pytest.raises(SessionNotFound):
        await store.export(TENANT, "missing")
    with pytest.raises(SessionNotFound):
        await store.load(TENANT, "x")


async def test_delete(store: SessionStore) -> None:
    record = await store.commit(make_record(), 0)
    await store.commit(next_turn(record, [1], seed=1), 1)
    assert await store.delete(TENANT, "s1") is True
    assert await store.delete(TENANT, "s1") is False
    with pytest.raises(SessionNotFound):
        await store.load(TENANT, "s1")
    with pytest.raises(SessionNotFound):
        await store.versions(TENANT, "s1")
    assert await store.list(TENANT) == ([], None)
    assert (await store.commit(make_record(), 0)).version == 1  # the id is free again
    assert await store.versions(TENANT, "s1") == [1]


async def test_invalid_ids_are_rejected(store: SessionStore) -> None:
    for tenant, session_id in (("ok", "bad/id"), ("ok", ".dot"), ("bad tenant", "ok"), ("", "ok")):
        with pytest.raises(InvalidSessionId):
            await store.load(tenant, session_id)
        with pytest.raises(InvalidSessionId):
            await store.commit(make_record(session_id, tenant=tenant), 0)
        with pytest.raises(InvalidSessionId):
            await store.delete(tenant, session_id)
    with pytest.raises(InvalidSessionId):
        await store.list("bad/tenant")
    with pytest.raises(InvalidSessionId):
        await store.list(TENANT, after="bad/cursor")


async def test_ids_with_colons_do_not_collide(store: SessionStore) -> None:
    await store.commit(make_record("c", tenant="a:b", seed=1), 0)
    await store.commit(make_record("b:c", tenant="a", seed=2), 0)
    assert_same_content(make_record(seed=1), await store.load("a:b", "c"))
    assert_same_content(make_record(seed=2), await store.load("a", "b:c"))


async def test_count(store: SessionStore) -> None:
    assert await store.count() == 0
    for i in range(3):
        await store.commit(make_record(f"s{i}"), 0)
    await store.commit(make_record("x", tenant="tenant-b"), 0)
    assert await store.count(TENANT) == 3
    assert await store.count("tenant-b") == 1
    assert await store.count() == 4
    await store.delete(TENANT, "s0")
    assert await store.count() == 3


async def _corrupt_current(store: SessionStore, tenant: str, session_id: str) -> None:
    """Flip one bit of the stored current record (its head), behind the store's back."""
    if isinstance(store, RedisStore):
        cur, hist = store._session_keys(tenant, session_id)[:2]
        version = (await store._redis.hget(cur, "v")).decode()
        blob = bytearray(await store._redis.hget(hist, version))
        blob[len(blob) // 2] ^= 0x10
        await store._redis.hset(hist, version, bytes(blob))
    else:
        assert isinstance(store, SqliteStore)

        def flip() -> None:
            db = store._db()
            (blob,) = db.execute(
                "SELECT record FROM versions WHERE tenant=? AND session_id=? AND version=1",
                (tenant, session_id),
            ).fetchone()
            blob = bytearray(blob)
            blob[len(blob) // 2] ^= 0x10
            db.execute(
                "UPDATE versions SET record=? WHERE tenant=? AND session_id=? AND version=1",
                (bytes(blob), tenant, session_id),
            )

        await store._run(flip)


async def test_corrupted_stored_record_is_detected(store: SessionStore) -> None:
    await store.commit(make_record(), 0)
    await _corrupt_current(store, TENANT, "s1")
    with pytest.raises(CorruptRecord, match="checksum"):
        await store.load(TENANT, "s1")
    with pytest.raises(CorruptRecord):
        await store.export(TENANT, "s1")


# -- deltas: a commit writes the turn, a load assembles the lineage (both backends) --------

SMALL = StateIdentity(
    backbone="tiny@sha256:00", adapter="none", num_layers=2, num_state_heads=1, rank=4
)
TURN_LOG_KEEP = 64  # what server/sessions.py keeps
LOREM = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 8


def json_size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def server_turn(record: SessionRecord, i: int, n_tokens: int = 100) -> SessionRecord:
    """The record after turn ``i``, shaped as server/sessions.py's finish_turn makes it: 100
    tokens, a user and an assistant message (~4 characters a token), two boundaries, a
    turn-log entry (the last 64 kept), the epoch meta and three small random states."""
    gen = torch.Generator().manual_seed(i)
    start = len(record.transcript)
    half = n_tokens // 2
    messages = [
        {"role": "user", "content": f"q{i:04d} " + LOREM[: 4 * half - 6]},
        {"role": "assistant", "content": f"a{i:04d} " + LOREM[: 4 * half - 6]},
    ]
    entry = {
        "turn": record.turns + 1, "spans": [[0, start + n_tokens]], "write_start": start,
        "prompt_tokens": n_tokens, "generated": half, "finish_reason": "stop", "window": 512,
        "window_start": 0, "new_epoch": False, "cached_tokens": start, "time": 1.7e9 + i,
    }  # fmt: skip
    meta = {
        **record.meta,
        "system": "You are terse.",
        "system_tokens": 12,
        "boundaries": list(record.meta.get("boundaries", [])) + [start, start + half],
        "turn_log": (list(record.meta.get("turn_log", [])) + [entry])[-TURN_LOG_KEEP:],
        "epoch": {"window_start": 0, "write_from": start},
        "block_pos": start + half,
    }

    def state() -> torch.Tensor:
        return torch.randn(SMALL.state_shape, generator=gen)

    return dataclasses.replace(
        record,
        identity=SMALL,
        state=state(),
        extra_states={"epoch": state(), "block": state()},
        transcript=record.transcript + torch.randint(0, 49_152, (n_tokens,), generator=gen).tolist(),
        messages=record.messages + messages,
        tokens_absorbed=start + n_tokens - 1,
        turns=record.turns + 1,
        meta=meta,
    )


def assert_same_record(a: SessionRecord, b: SessionRecord) -> None:
    """Every field, states bit-equal."""
    assert_same_content(a, b)
    assert (a.session_id, a.tenant, a.version) == (b.session_id, b.tenant, b.version)
    assert (a.created_at, a.updated_at) == (b.created_at, b.updated_at)
    assert sorted(a.extra_states) == sorted(b.extra_states)
    for name in a.extra_states:
        assert same_bits(a.extra_states[name], b.extra_states[name])
    assert list(a.meta) == list(b.meta)  # key order too


async def sent_bytes(store: SessionStore, action: Any) -> tuple[SessionRecord, int]:
    """``await action()`` (one commit, rollback, fork...), and the bytes it sent (Redis: the
    server's input bytes, the tenant index update and one INFO included) or wrote (SQLite:
    the blobs of the plan that landed, and 16 bytes a spans or state_refs row: a few small
    values beside the key)."""
    if isinstance(store, RedisStore):
        before = (await store._redis.info("stats"))["total_net_input_bytes"]
        stored = await action()
        after = (await store._redis.info("stats"))["total_net_input_bytes"]
        return stored, after - before
    assert isinstance(store, SqliteStore)
    plans: list[CommitPlan] = []
    write = store._write

    async def spy(plan: CommitPlan, expected_version: int) -> None:
        await write(plan, expected_version)
        plans.append(plan)

    store._write = spy  # type: ignore[method-assign]
    try:
        stored = await action()
    finally:
        del store._write
    [plan] = plans
    rows = len(plan.lineage) + len(plan.log_lineage) + len(plan.state_refs)
    return stored, plan.size + 16 * rows


async def commit_bytes(store: SessionStore, record: SessionRecord, expected: int) -> tuple[
    SessionRecord, int
]:
    """Commit, and the bytes the commit sent or wrote (see :func:`sent_bytes`)."""
    return await sent_bytes(store, lambda: store.commit(record, expected))


async def stored_bytes(store: SessionStore, tenant: str, session_id: str) -> int:
    """Redis: MEMORY USAGE of the session's keys; SQLite: its blobs (+16 a spans or
    state_refs row)."""
    if isinstance(store, RedisStore):
        total = 0
        for key in store._session_keys(tenant, session_id):
            total += await store._redis.memory_usage(key, samples=0) or 0
        return total
    assert isinstance(store, SqliteStore)

    def size() -> int:
        db = store._db()
        key = (tenant, session_id)
        where = "tenant = ? AND session_id = ?"
        blobs = sum(
            int(db.execute(f"SELECT SUM(LENGTH({column})) FROM {table} WHERE {where}", key)
                .fetchone()[0] or 0)
            for table, column in (("versions", "record"), ("deltas", "data"), ("states", "data"))
        )
        rows = sum(int(db.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", key)
                       .fetchone()[0]) for table in ("spans", "state_refs"))
        return blobs + 16 * rows

    return await store._run(size)


async def stored_parts(
    store: SessionStore, tenant: str, session_id: str
) -> tuple[list[int], list[int], list[int]]:
    """Kept heads, versions with a stored delta, versions with a stored turn-log part."""
    if isinstance(store, RedisStore):
        _, hist, delta, _ = store._session_keys(tenant, session_id)
        fields = await store._redis.hkeys(hist)
        heads = sorted(int(f) for f in fields if f.isdigit())
        turns = sorted(int(f[1:]) for f in fields if f.startswith(b"t"))
        items = await store._redis.lrange(delta, 0, -1)
        deltas = sorted(decode_delta(item).version for item in items if item)
        return heads, deltas, turns
    assert isinstance(store, SqliteStore)

    def rows() -> tuple[list[int], list[int], list[int]]:
        db = store._db()
        key = (tenant, session_id)
        heads = [r[0] for r in db.execute(
            "SELECT version FROM versions WHERE tenant = ? AND session_id = ? ORDER BY 1", key)]
        parts = [[r[0] for r in db.execute(
            "SELECT version FROM deltas WHERE tenant = ? AND session_id = ? AND part = ? "
            "ORDER BY 1", (*key, part))] for part in (0, 1)]
        return heads, parts[0], parts[1]

    return await store._run(rows)


async def test_commit_cost_stays_flat_and_the_store_holds_the_content_once(
    store: SessionStore,
) -> None:
    """200 turns of 100 tokens, each loaded then committed as the server does."""
    keep = store.keep_versions
    record = SessionRecord("long", TENANT, SMALL)
    cost: dict[int, int] = {}
    size: dict[int, int] = {}
    committed = record
    for i in range(1, 201):
        if i > 1:
            loaded = await store.load(TENANT, "long", expected_identity=SMALL)
            assert_same_record(committed, loaded)
            record = loaded
        committed, cost[i] = await commit_bytes(store, server_turn(record, i), i - 1)
        if i in (100, 200):
            size[i] = await stored_bytes(store, TENANT, "long")

    loaded = await store.load(TENANT, "long", expected_identity=SMALL)
    assert_same_record(committed, loaded)
    assert len(loaded.transcript) == 20_000 and len(loaded.meta["turn_log"]) == TURN_LOG_KEEP
    # Every commit extended the last: one lineage range, one delta per version.
    assert loaded.stored is not None and loaded.stored.lineage == ((1, 200),)

    # What a commit sends follows the turn, not the conversation.
    print(f"\n{type(store).__name__}: commit bytes turn 10 {cost[10]}, turn 200 {cost[200]}")
    assert cost[200] <= 1.3 * cost[10]
    # ... and is far below the whole record (what every commit used to write).
    assert cost[200] < len(encode_record(loaded)) / 20

    # The store holds the content once, the kept versions' states, and bounded extras.
    state_bytes = 4 * math.prod(SMALL.state_shape) * (1 + len(loaded.extra_states))

    def raw(tokens: int, messages: list[Any]) -> int:
        # The transcript as int32 and the messages as JSON (the boundaries, 2 ints a turn,
        # and the delta framing fit in the 10%).
        return 4 * tokens + json_size(messages)

    # The constant: the turn-log window (<= 64 + keep - 1 entries stored once, each with
    # 40 bytes of framing and, on Redis, a hash entry: under 2x its JSON) and per kept head
    # 1.5 KB beside its states (JSON header ~0.8 KB with identity, small meta, lengths and
    # lineages; safetensors header; digest; lineage text), + 4 KB of key and node overheads.
    constant = 2 * json_size(loaded.meta["turn_log"]) + keep * 1536 + 4096
    content = raw(len(loaded.transcript), loaded.messages)
    budget = 1.1 * (content + keep * state_bytes) + constant
    print(f"{type(store).__name__}: stored {size[200]} B for transcript+messages {content} B, "
          f"states {keep * state_bytes} B (record {len(encode_record(loaded))} B); "
          f"budget {budget:.0f} B")
    assert size[200] <= budget
    # The last 100 turns cost at most 1.1x what they appended, whatever the constant.
    grew = content - raw(10_000, loaded.messages[:200])
    print(f"{type(store).__name__}: turns 101-200 added {size[200] - size[100]} B "
          f"for {grew} B of transcript+messages")
    assert size[200] - size[100] <= 1.1 * grew

    heads, deltas, turns = await stored_parts(store, TENANT, "long")
    assert heads == list(range(201 - keep, 201))
    assert deltas == list(range(1, 201))
    # Turn-log parts of turns no kept version shows any more are gone.
    assert turns == list(range(201 - keep - TURN_LOG_KEEP + 1, 201))


async def test_record_that_does_not_extend_its_base_is_stored_whole(store: SessionStore) -> None:
    """A commit never stores a wrong record: one that does not extend the version it was
    loaded as is stored whole (its lineage is the new version alone)."""
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 4):
        record = await store.commit(server_turn(record, i), i - 1)

    def rewrites(rec: SessionRecord) -> list[SessionRecord]:
        other = server_turn(rec, 99)
        edited = copy.deepcopy(rec.messages)
        edited[0]["content"] = "edited"
        same_len = list(rec.transcript)
        same_len[0] ^= 1
        return [
            dataclasses.replace(rec, transcript=other.transcript[::-1]),  # longer, another
            dataclasses.replace(rec, transcript=same_len),  # same length, another
            dataclasses.replace(rec, transcript=rec.transcript[:-5],
                                tokens_absorbed=len(rec.transcript) - 6),  # shorter
            dataclasses.replace(rec, messages=edited),
            dataclasses.replace(rec, messages=rec.messages[1:] + rec.messages[:1]),
            dataclasses.replace(rec, meta={**rec.meta, "boundaries": [7]}),
            dataclasses.replace(rec, meta={k: v for k, v in rec.meta.items()
                                           if k != "boundaries"}),
            dataclasses.replace(rec, meta={**rec.meta, "turn_log": [{"other": 1}]}),
        ]

    for n, bad in enumerate(rewrites(await store.load(TENANT, "s"))):
        version = 3 + n
        stored = await store.commit(bad, version)
        loaded = await store.load(TENANT, "s")
        assert_same_record(stored, loaded)
        assert loaded.transcript == bad.transcript and loaded.messages == bad.messages
        assert loaded.meta == bad.meta
        assert loaded.stored is not None and loaded.stored.lineage == ((version + 1,) * 2,)

    # In-place edits of what load returned are caught too: the store compares against its
    # own copy, not against the objects it handed out.
    loaded = await store.load(TENANT, "s")
    loaded.messages[0]["content"] = "edited in place"
    loaded.transcript[1] += 1
    v = loaded.version
    stored = await store.commit(server_turn(loaded, 50), v)
    assert_same_record(stored, await store.load(TENANT, "s"))
    assert (await store.load(TENANT, "s")).messages[0]["content"] == "edited in place"

    # An extension after a whole write is a delta again.
    stored = await store.commit(server_turn(await store.load(TENANT, "s"), 51), v + 1)
    loaded = await store.load(TENANT, "s")
    assert_same_record(stored, loaded)
    assert loaded.stored is not None and loaded.stored.lineage == ((v + 1, v + 2),)


async def test_rollback_reuses_the_lineage_and_keeps_later_versions(store: SessionStore) -> None:
    snapshots: dict[int, SessionRecord] = {}
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 7):
        record = await store.commit(server_turn(record, i), i - 1)
        snapshots[i] = record
    assert await store.versions(TENANT, "s") == [2, 3, 4, 5, 6]

    rolled = await store.rollback(TENANT, "s", 3)  # version 7 = version 3
    assert rolled.version == 7
    loaded = await store.load(TENANT, "s")
    assert_same_content(snapshots[3], loaded)
    assert loaded.meta == snapshots[3].meta and loaded.created_at == snapshots[1].created_at
    assert loaded.stored is not None and loaded.stored.lineage == ((1, 3),)  # nothing copied
    heads, deltas, _ = await stored_parts(store, TENANT, "s")
    assert heads == [3, 4, 5, 6, 7] and deltas == [1, 2, 3, 4, 5, 6]

    # A turn on the rolled-back branch extends version 3's lineage.
    eight = await store.commit(server_turn(loaded, 8), 7)
    loaded = await store.load(TENANT, "s")
    assert_same_record(eight, loaded)
    assert loaded.stored is not None and loaded.stored.lineage == ((1, 3), (8, 8))
    # The versions after 3 stay rollback-able.
    await store.rollback(TENANT, "s", 6)  # version 9
    assert_same_content(snapshots[6], await store.load(TENANT, "s"))
    await store.rollback(TENANT, "s", 8)  # version 10
    assert_same_record(
        dataclasses.replace(eight, version=10, updated_at=0.0),
        dataclasses.replace(await store.load(TENANT, "s"), updated_at=0.0),
    )
    assert await store.versions(TENANT, "s") == [6, 7, 8, 9, 10]
    heads, deltas, _ = await stored_parts(store, TENANT, "s")
    assert deltas == [1, 2, 3, 4, 5, 6, 8]

    # Once no kept version names the abandoned branch (4-6), its deltas go.
    record = await store.load(TENANT, "s")
    for v in range(10, 15):
        record = await store.commit(server_turn(record, v + 1), v)
    assert await store.versions(TENANT, "s") == [11, 12, 13, 14, 15]
    heads, deltas, turns = await stored_parts(store, TENANT, "s")
    assert deltas == [1, 2, 3, 8, 11, 12, 13, 14, 15]
    assert turns == [1, 2, 3, 8, 11, 12, 13, 14, 15]
    assert_same_record(record, await store.load(TENANT, "s"))
    assert [m["content"][:5] for m in record.messages[::2]] == [
        "q0001", "q0002", "q0003", "q0008", "q0011", "q0012", "q0013", "q0014", "q0015"]


async def test_fork_export_import_of_a_long_session(store: SessionStore) -> None:
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 31):
        record = await store.commit(server_turn(record, i), i - 1)
    data = await store.export(TENANT, "s")
    assert data == encode_record(await store.load(TENANT, "s"))  # today's single blob
    assert_same_record(record, decode_record(data))

    forked = await store.fork(TENANT, "s", "f")
    loaded = await store.load(TENANT, "f")
    assert forked.version == loaded.version == 1
    assert_same_content(record, loaded)
    assert loaded.meta == record.meta
    assert loaded.stored is not None and loaded.stored.lineage == ((1, 1),)
    assert (await stored_parts(store, TENANT, "f"))[1:] == ([1], [1])

    imported = await store.import_("tenant-b", "i", data)
    assert_same_content(record, await store.load("tenant-b", "i"))
    # Overwriting with an import starts a new lineage; the old deltas go with the old heads.
    other = encode_record(server_turn(SessionRecord("x", TENANT, SMALL), 1))
    imported = await store.import_(TENANT, "s", other, overwrite=True)
    assert imported.version == 31
    for v in range(31, 36):
        imported = await store.commit(server_turn(imported, v + 1), v)
    assert_same_record(imported, await store.load(TENANT, "s"))
    heads, deltas, turns = await stored_parts(store, TENANT, "s")
    assert heads == [32, 33, 34, 35, 36] and deltas == [31, 32, 33, 34, 35, 36]
    assert turns == [31, 32, 33, 34, 35, 36]


async def test_stale_base_after_delete_and_recreate_is_stored_whole(
    store: SessionStore, tmp_path: Path
) -> None:
    """A record loaded before the session was deleted and made again (same version
    numbers, other content) commits as before (compare-and-set on the version), whole."""
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 3):
        record = await store.commit(server_turn(record, i), i - 1)
    stale = await store.load(TENANT, "s")
    assert await store.delete(TENANT, "s")
    other = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 3):
        other = await store.commit(server_turn(other, 100 + i), i - 1)
    stored = await store.commit(server_turn(stale, 3), 2)
    loaded = await store.load(TENANT, "s")
    assert_same_record(stored, loaded)
    assert loaded.transcript == stale.transcript + loaded.transcript[len(stale.transcript):]
    assert loaded.stored is not None and loaded.stored.lineage == ((3, 3),)

    # A record of another store, at the same version there: stored whole as well.
    async with SqliteStore(tmp_path / "elsewhere.sqlite3") as elsewhere:
        foreign = SessionRecord("s", TENANT, SMALL)
        for i in range(1, 4):
            foreign = await elsewhere.commit(server_turn(foreign, 200 + i), i - 1)
        foreign = await elsewhere.load(TENANT, "s")
    stored = await store.commit(server_turn(foreign, 204), 3)
    assert_same_record(stored, await store.load(TENANT, "s"))

    # Conflicts are still conflicts.
    with pytest.raises(VersionConflict) as info:
        await store.commit(server_turn(stale, 3), 2)
    assert info.value.current_version == 4


async def test_corrupt_or_missing_delta_is_detected(store: SessionStore) -> None:
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 4):
        record = await store.commit(server_turn(record, i), i - 1)
    if isinstance(store, RedisStore):
        delta = store._session_keys(TENANT, "s")[2]
        blob = bytearray(await store._redis.lindex(delta, -2))  # version 2's delta
        blob[len(blob) // 2] ^= 0x01
        await store._redis.lset(delta, -2, bytes(blob))
    else:
        assert isinstance(store, SqliteStore)

        def flip() -> None:
            db = store._db()
            where = "tenant=? AND session_id=? AND part=0 AND version=2"
            (blob,) = db.execute(f"SELECT data FROM deltas WHERE {where}",
                                 (TENANT, "s")).fetchone()
            blob = bytearray(blob)
            blob[len(blob) // 2] ^= 0x01
            db.execute(f"UPDATE deltas SET data=? WHERE {where}", (bytes(blob), TENANT, "s"))

        await store._run(flip)
    with pytest.raises(CorruptRecord, match="checksum"):
        await store.load(TENANT, "s")
    with pytest.raises(CorruptRecord):
        await store.export(TENANT, "s")
    with pytest.raises(CorruptRecord):
        await store.rollback(TENANT, "s", 3)

    if isinstance(store, RedisStore):
        await store._redis.lset(delta, -2, b"")
    else:
        await store._run(lambda: store._db().execute(
            "DELETE FROM deltas WHERE tenant=? AND session_id=? AND version=2", (TENANT, "s")))
    with pytest.raises(CorruptRecord, match="missing|found"):
        await store.load(TENANT, "s")


def test_head_delta_and_turn_log_blobs_detect_corruption() -> None:
    record = dataclasses.replace(server_turn(SessionRecord("s", TENANT, SMALL), 1), version=1)
    plan = plan_commit(record, None)
    assert decode_head(plan.head, SMALL).lineage == ((1, 1),)
    assert decode_delta(plan.delta).version == 1
    assert decode_turns(plan.turns)[0] == 1
    assert split_parts(plan.delta + plan.delta + plan.turns) == [plan.delta] * 2 + [plan.turns]
    with pytest.raises(IdentityMismatch):
        decode_head(plan.head, OTHER_BACKBONE)
    with pytest.raises(UnknownFormat):
        decode_head(encode_record(record))  # a record is not a head
    # The head names its three states by digest and holds none of them.
    head = decode_head(plan.head, SMALL)
    assert head.record.state is None and head.record.extra_states == {}
    assert head.states is not None and head.states.digests() == set(plan.states)
    assert set(plan.state_refs) == set(plan.states) and len(plan.states) == 3
    assert same_bits(decode_state_blob(plan.states[head.states.state], head.states.state,
                                       SMALL.state_shape), record.state)
    digest, state_blob = next(iter(plan.states.items()))
    with pytest.raises(CorruptRecord, match="shape"):
        decode_state_blob(state_blob, digest, (2, 1, 4, 5))

    def decode_state(data: bytes) -> torch.Tensor:
        return decode_state_blob(data, digest, SMALL.state_shape)

    for blob, decode in ((plan.head, decode_head), (plan.delta, decode_delta),
                         (plan.turns, decode_turns), (state_blob, decode_state)):
        for pos in sorted({*range(0, len(blob), max(1, len(blob) // 97)), len(blob) - 1}):
            bad = bytearray(blob)
            bad[pos] ^= 0x04
            with pytest.raises(CorruptRecord):
                decode(bytes(bad))
        for cut in (0, 3, len(blob) // 2, len(blob) - 1):
            with pytest.raises(CorruptRecord):
                decode(blob[:cut])
    with pytest.raises(CorruptRecord):
        split_parts(plan.delta[:-1])


async def test_token_ids_of_every_width_round_trip(store: SessionStore) -> None:
    """Deltas pack ids in 2, 3 or 4 bytes (the fewest that hold the largest)."""
    record = SessionRecord("w", TENANT, SMALL)
    for i, top in enumerate((2**16 - 1, 2**24 - 1, 2**31 - 1, 5, 2**16), start=1):
        ids = [0, top, top // 3, 1, top - 1]
        record = await store.commit(
            dataclasses.replace(record, transcript=record.transcript + ids), i - 1
        )
    loaded = await store.load(TENANT, "w")
    assert loaded.transcript == record.transcript
    assert max(loaded.transcript) == 2**31 - 1
    with pytest.raises(ValueError):
        await store.commit(dataclasses.replace(loaded, transcript=loaded.transcript + [-1]), 5)
    with pytest.raises(ValueError):
        await store.commit(dataclasses.replace(loaded, transcript=loaded.transcript + [2**31]), 5)
    assert (await store.load(TENANT, "w")).version == 5


@pytest.mark.parametrize("keep", [1, 2])
async def test_few_kept_versions(keep: int, tmp_path: Path, redis_server: Any) -> None:
    for store in (
        SqliteStore(tmp_path / "few.sqlite3", keep_versions=keep),
        RedisStore(redis_server.url, keep_versions=keep, prefix=f"few{uuid.uuid4().hex[:8]}"),
    ):
        async with store:
            record = SessionRecord("s", TENANT, SMALL)
            for i in range(1, 71):
                record = await store.commit(server_turn(record, i), i - 1)
            assert_same_record(record, await store.load(TENANT, "s"))
            await store.rollback(TENANT, "s", 71 - keep)
            assert await store.versions(TENANT, "s") == list(range(72 - keep, 72))
            heads, deltas, turns = await stored_parts(store, TENANT, "s")
            assert deltas == list(range(1, 71))  # version 70's lineage, kept or rolled to
            # The turn-log parts the kept versions show, no more.
            assert len(turns) == TURN_LOG_KEEP + keep - 1


async def test_turn_log_cut_shorter_keeps_the_rest(store: SessionStore) -> None:
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 11):
        record = await store.commit(server_turn(record, i), i - 1)
    loaded = await store.load(TENANT, "s")
    cut = dataclasses.replace(loaded, meta={**loaded.meta, "turn_log": loaded.meta["turn_log"][-3:]})
    stored = await store.commit(cut, 10)
    loaded = await store.load(TENANT, "s")
    assert_same_record(stored, loaded)
    assert loaded.meta["turn_log"] == record.meta["turn_log"][-3:]
    assert loaded.stored is not None and loaded.stored.lineage == ((1, 10),)  # still a delta
    for v in range(11, 16):
        loaded = await store.commit(server_turn(loaded, v + 1), v)
    assert_same_record(loaded, await store.load(TENANT, "s"))
    assert len(loaded.meta["turn_log"]) == 3 + 5
    _, _, turns = await stored_parts(store, TENANT, "s")
    assert turns == list(range(8, 11)) + list(range(12, 17))


# -- sessions stored by the previous layout (one whole record blob per version) ------------

_OLD_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant          TEXT    NOT NULL,
    session_id      TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    turns           INTEGER NOT NULL,
    tokens_absorbed INTEGER NOT NULL,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    PRIMARY KEY (tenant, session_id)
);
CREATE TABLE IF NOT EXISTS versions (
    tenant     TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    record     BLOB    NOT NULL,
    PRIMARY KEY (tenant, session_id, version)
);
"""


async def write_old_layout(store: SessionStore, records: list[SessionRecord]) -> None:
    """Store ``records`` (versions 1..n of one session) the way the previous code did: each
    version's whole ``encode_record`` blob as the current record and in the history (the
    last ``keep_versions``)."""
    for rec in records:
        blob = encode_record(rec)
        if isinstance(store, RedisStore):
            cur, hist = store._session_keys(rec.tenant, rec.session_id)[:2]
            await store._redis.hset(cur, mapping={
                "v": rec.version, "blob": blob, "turns": rec.turns,
                "absorbed": rec.tokens_absorbed, "created": repr(float(rec.created_at)),
                "updated": repr(float(rec.updated_at)), "token": uuid.uuid4().hex})
            await store._redis.hset(hist, str(rec.version), blob)
            old = rec.version - store.keep_versions
            if old > 0:
                await store._redis.hdel(hist, str(old))
            await store._redis.zadd(store._index_keys(rec.tenant)[0], {rec.session_id: 0})
        else:
            assert isinstance(store, SqliteStore)
            with sqlite3.connect(store.path) as db:
                db.executescript(_OLD_SQLITE_SCHEMA)
                key = (rec.tenant, rec.session_id)
                db.execute(
                    "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, rec.version, rec.turns, rec.tokens_absorbed, rec.created_at,
                     rec.updated_at))
                db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)",
                           (*key, rec.version, blob))
                db.execute("DELETE FROM versions WHERE tenant=? AND session_id=? AND version<=?",
                           (*key, rec.version - store.keep_versions))
            db.close()


async def test_sessions_of_the_previous_layout_still_work(store: SessionStore) -> None:
    old: list[SessionRecord] = []
    record = SessionRecord("old", TENANT, SMALL, created_at=1000.0)
    for i in range(1, 8):
        record = dataclasses.replace(server_turn(record, i), version=i, updated_at=1000.0 + i)
        old.append(record)
    await write_old_layout(store, old)  # (SQLite: before the store first opens the file)

    loaded = await store.load(TENANT, "old", expected_identity=SMALL)
    assert_same_record(old[-1], loaded)
    assert await store.versions(TENANT, "old") == [3, 4, 5, 6, 7]
    assert [s.session_id for s in (await store.list(TENANT))[0]] == ["old"]
    assert await store.count(TENANT) == 1
    assert await store.export(TENANT, "old") == encode_record(old[-1])
    forked = await store.fork(TENANT, "old", "old-fork")
    assert_same_content(old[-1], await store.load(TENANT, "old-fork"))
    assert forked.version == 1

    # A rollback to a version of the previous layout, then turns on top of it.
    rolled = await store.rollback(TENANT, "old", 5)
    assert rolled.version == 8
    assert_same_content(old[4], await store.load(TENANT, "old"))
    record = await store.load(TENANT, "old")
    for v in range(8, 10):  # versions 9 and 10
        record = await store.commit(server_turn(record, v + 1), v)
        assert_same_record(record, await store.load(TENANT, "old"))
    # The first commit of the upgraded session (the rollback) stored it whole; the next
    # ones are deltas.
    loaded = await store.load(TENANT, "old")
    assert loaded.stored is not None and loaded.stored.lineage == ((8, 10),)
    assert loaded.turns == old[4].turns + 2
    # Versions of both layouts are kept side by side, and both roll back.
    assert await store.versions(TENANT, "old") == [6, 7, 8, 9, 10]
    await store.rollback(TENANT, "old", 7)  # previous layout: stored whole, as version 11
    assert_same_content(old[-1], await store.load(TENANT, "old"))
    await store.rollback(TENANT, "old", 10)  # this one
    assert_same_record(dataclasses.replace(record, version=12, updated_at=0.0),
                       dataclasses.replace(await store.load(TENANT, "old"), updated_at=0.0))
    heads, deltas, turns = await stored_parts(store, TENANT, "old")
    assert heads == [8, 9, 10, 11, 12]
    assert deltas == [8, 9, 10, 11] and turns == [8, 9, 10, 11]
    assert await store.delete(TENANT, "old")
    with pytest.raises(SessionNotFound):
        await store.load(TENANT, "old")
    if isinstance(store, SqliteStore):
        def leftovers() -> int:
            db = store._db()
            return sum(db.execute(f"SELECT COUNT(*) FROM {t} WHERE session_id='old'").fetchone()[0]
                       for t in ("sessions", "versions", "spans", "deltas", "states",
                                 "state_refs"))
        assert await store._run(leftovers) == 0
    else:
        assert not await store._redis.exists(*store._session_keys(TENANT, "old"))


async def test_leftovers_of_a_gone_session_do_not_leak_into_a_new_one(
    store: SessionStore,
) -> None:
    record = SessionRecord("s", TENANT, SMALL)
    for i in range(1, 4):
        record = await store.commit(server_turn(record, i), i - 1)
    # A crash half-way through a delete (or an old writer's delete) leaves the history.
    if isinstance(store, RedisStore):
        await store._redis.delete(store._session_keys(TENANT, "s")[0])
    else:
        await store._run(lambda: store._db().execute("DELETE FROM sessions"))
    fresh = await store.commit(server_turn(SessionRecord("s", TENANT, SMALL), 9), 0)
    assert_same_record(fresh, await store.load(TENANT, "s"))
    assert await store.versions(TENANT, "s") == [1]
    assert (await stored_parts(store, TENANT, "s"))[1:] == ([1], [1])
    # Not one state of the gone session is left (they would never be pruned: no head names
    # them).
    assert set(await stored_states(store, TENANT, "s")) == digests_of(fresh)


# -- states stored by digest, once a session (both backends) --------------------------------

# The shipped adapter's state: 30 layers x 12 heads x 8x8 float32, 92,160 bytes.
SHIPPED = StateIdentity(
    backbone="SmolLM2-135M-Instruct@sha256:ab12cd34", adapter="shipped",
    num_layers=30, num_state_heads=12, rank=8,
)
STATE_BYTES = 4 * math.prod(SHIPPED.state_shape)
# What a commit sends beside its states: head (~1 KB), delta, turn-log part, protocol.
BESIDE_STATES = 8192
EPOCH_TURNS = 10


def epoch_turn(record: SessionRecord, i: int) -> SessionRecord:
    """Turn ``i`` (server_turn's content) with 92 KB states set as server/sessions.py's
    finish_turn sets them: ``state`` new every turn; ``extra_states["epoch"]`` the state at
    the start of the current epoch, the same across the epoch (a new epoch on turns 2, 12,
    22, ...: the previous turn's state); ``extra_states["block"]`` a new snapshot on even
    turns (the turn passed a KV-block boundary), the previous one kept on odd turns."""
    gen = torch.Generator().manual_seed(100_000 + i)
    extra: dict[str, torch.Tensor] = {}
    epoch = record.state if i % EPOCH_TURNS == 2 else record.extra_states.get("epoch")
    if epoch is not None:
        extra["epoch"] = epoch
    if i % 2 == 0 or "block" not in record.extra_states:
        extra["block"] = torch.randn(SHIPPED.state_shape, generator=gen)
    else:
        extra["block"] = record.extra_states["block"]
    return dataclasses.replace(
        server_turn(record, i), identity=SHIPPED,
        state=torch.randn(SHIPPED.state_shape, generator=gen), extra_states=extra,
    )


def states_of(record: SessionRecord) -> list[torch.Tensor]:
    assert record.state is not None
    return [record.state, *record.extra_states.values()]


def digests_of(record: SessionRecord) -> set[str]:
    """The addresses of the record's states (the state and every extra state)."""
    return {state_digest(encode_state_blob(t)) for t in states_of(record)}


def assert_same_states(a: SessionRecord, b: SessionRecord) -> None:
    assert same_bits(a.state, b.state)
    assert sorted(a.extra_states) == sorted(b.extra_states)
    for name in a.extra_states:
        assert same_bits(a.extra_states[name], b.extra_states[name]), name


async def stored_states(store: SessionStore, tenant: str, session_id: str) -> dict[str, bytes]:
    """The state blobs stored for a session, by digest."""
    if isinstance(store, RedisStore):
        states = store._session_keys(tenant, session_id)[3]
        return {k.decode(): v for k, v in (await store._redis.hgetall(states)).items()}
    assert isinstance(store, SqliteStore)

    def rows() -> dict[str, bytes]:
        return {d: bytes(b) for d, b in store._db().execute(
            "SELECT digest, data FROM states WHERE tenant = ? AND session_id = ?",
            (tenant, session_id))}

    return await store._run(rows)


async def kept_digests(store: SessionStore, tenant: str, session_id: str) -> set[str]:
    """The addresses of the states every kept version holds (loaded, then hashed here)."""
    out: set[str] = set()
    for v in await store.versions(tenant, session_id):
        out |= digests_of(await store.load(tenant, session_id, version=v))
    return out


async def test_states_are_stored_once_and_a_commit_sends_only_new_ones(
    store: SessionStore,
) -> None:
    """40 turns with states shaped as the server's: a turn that changes only ``state``
    sends one state, not three; the store holds each distinct state of the kept versions
    once; rollback to every kept version sends none and gives back exactly its states; a
    fork outlives its original."""
    keep = store.keep_versions
    record = SessionRecord("s", TENANT, SHIPPED)
    snapshots: dict[int, SessionRecord] = {}
    cost: dict[int, int] = {}
    for i in range(1, 41):
        if i > 1:
            record = await store.load(TENANT, "s", expected_identity=SHIPPED)
            assert_same_record(snapshots[i - 1], record)
        record, cost[i] = await commit_bytes(store, epoch_turn(record, i), i - 1)
        snapshots[i] = record
    print(f"\n{type(store).__name__}: commit bytes turn 10 {cost[10]}, 11 {cost[11]}, "
          f"39 {cost[39]}, 40 {cost[40]} (a state is {STATE_BYTES})")
    for i in range(2, 41):
        # Odd turns change the state only (the epoch and block snapshot are the last turn's):
        # one state. Even turns take a new block snapshot too; a new epoch's state is the
        # last turn's state, stored already.
        states = 1 if i % 2 else 2
        assert states * STATE_BYTES < cost[i] < states * STATE_BYTES + BESIDE_STATES, (i, cost)

    kept = await store.versions(TENANT, "s")
    assert kept == list(range(41 - keep, 41))
    distinct = set().union(*(digests_of(snapshots[v]) for v in kept))
    # Versions 36-40: five states, their blocks of turns 36, 38 and 40, one epoch (turn 32's).
    assert len(distinct) == keep + 3 + 1
    stored = await stored_states(store, TENANT, "s")
    assert set(stored) == distinct  # no orphan: states no kept head names are gone
    assert await kept_digests(store, TENANT, "s") == distinct

    # Store bytes: the distinct states once, the transcript and messages once, + 10% and a
    # constant (as test_commit_cost_stays_flat_and_the_store_holds_the_content_once).
    last = snapshots[40]
    content = 4 * len(last.transcript) + json_size(last.messages)
    constant = 2 * json_size(last.meta["turn_log"]) + keep * 1536 + 4096
    budget = 1.1 * (len(distinct) * STATE_BYTES + content) + constant
    size = await stored_bytes(store, TENANT, "s")
    print(f"{type(store).__name__}: stored {size} B for {len(distinct)} distinct states "
          f"({len(distinct) * STATE_BYTES} B) + content {content} B; budget {budget:.0f} B; "
          f"three states a kept head would be {3 * keep * STATE_BYTES} B")
    assert size <= budget
    assert size < 3 * keep * STATE_BYTES * 0.75

    # Rollback to every kept version: its head's states are all stored, none is sent, and
    # the version comes back with exactly its states.
    current = 40
    for v in kept:
        rolled, sent = await sent_bytes(store, lambda v=v: store.rollback(TENANT, "s", v))
        current += 1
        assert rolled.version == current
        assert sent < BESIDE_STATES, (v, sent)
        loaded = await store.load(TENANT, "s", expected_identity=SHIPPED)
        assert_same_content(snapshots[v], loaded)
        assert_same_states(snapshots[v], loaded)
        snapshots[current] = loaded
    assert await store.versions(TENANT, "s") == list(range(current - keep + 1, current + 1))
    assert set(await stored_states(store, TENANT, "s")) == await kept_digests(store, TENANT, "s")

    # A turn on top of a rollback: one state (the block and the epoch are the rolled-to's).
    loaded = await store.load(TENANT, "s")
    odd = dataclasses.replace(epoch_turn(loaded, 41), state=torch.ones(SHIPPED.state_shape))
    _, sent = await commit_bytes(store, odd, current)
    assert STATE_BYTES < sent < STATE_BYTES + BESIDE_STATES

    # Fork, then delete the original: the fork has its own states, and goes on.
    source = await store.load(TENANT, "s")
    forked = await store.fork(TENANT, "s", "f")
    assert set(await stored_states(store, TENANT, "f")) == digests_of(source)
    assert await store.delete(TENANT, "s")
    assert await stored_states(store, TENANT, "s") == {}
    loaded = await store.load(TENANT, "f", expected_identity=SHIPPED)
    assert_same_content(source, loaded)
    assert_same_states(source, loaded)
    nxt = await store.commit(epoch_turn(loaded, 42), forked.version)
    assert_same_record(nxt, await store.load(TENANT, "f"))
    # Export is the whole record, as before; an import stores its states again.
    data = await store.export(TENANT, "f")
    assert_same_states(nxt, decode_record(data))
    imported = await store.import_(TENANT, "i", data)
    assert set(await stored_states(store, TENANT, "i")) == digests_of(nxt)
    assert_same_states(nxt, await store.load(TENANT, "i"))
    assert imported.version == 1


def inline_head(plan: CommitPlan) -> bytes:
    """The head the previous layout wrote for ``plan`` (head format 1): the record's states
    inline as safetensors, nothing named by digest (byte for byte what its encode_head
    made)."""
    record = plan.record
    small, positions, lists = store_base.split_meta(record.meta)
    state_bytes, state_info = _encode_states(record)
    header = {
        **_scalar_header(record),
        "state": state_info,
        "meta": small,
        "lists": positions,
        "lengths": {"tokens": len(record.transcript), "messages": len(record.messages),
                    **{k: len(v) for k, v in lists.items()}},
        "lineage": [list(r) for r in plan.lineage],
        "log_lineage": [list(r) for r in plan.log_lineage],
    }
    return _assemble(header, b"", state_bytes, HEAD_MAGIC)


def plan_inline(record: SessionRecord, base: StoredBase | None) -> CommitPlan:
    """plan_commit as the previous layout planned: heads with inline states."""
    plan = plan_commit(record, base)
    return dataclasses.replace(
        plan, head=inline_head(plan), state_refs=(), states={},
        new_base=dataclasses.replace(plan.new_base, states=frozenset()),
    )


async def test_heads_with_inline_states_still_load_and_move_to_states_by_digest(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_base, "plan_commit", plan_inline)
    record = SessionRecord("s", TENANT, SHIPPED)
    old: dict[int, SessionRecord] = {}
    for i in range(1, 8):
        if i > 1:
            record = await store.load(TENANT, "s")
        record = old[i] = await store.commit(epoch_turn(record, i), i - 1)
    assert await stored_states(store, TENANT, "s") == {}  # all inline
    monkeypatch.undo()

    loaded = await store.load(TENANT, "s", expected_identity=SHIPPED)
    assert_same_record(old[7], loaded)
    assert loaded.stored is not None and not loaded.stored.states
    assert_same_states(old[4], await store.load(TENANT, "s", version=4))
    # The next commit stores its states by digest: all three (none was stored apart), not
    # the content (still a delta).
    eight, sent = await commit_bytes(store, epoch_turn(loaded, 8), 7)
    assert 3 * STATE_BYTES < sent < 3 * STATE_BYTES + BESIDE_STATES
    assert set(await stored_states(store, TENANT, "s")) == digests_of(eight)
    loaded = await store.load(TENANT, "s", expected_identity=SHIPPED)
    assert_same_record(eight, loaded)
    assert loaded.stored is not None and loaded.stored.lineage == ((1, 8),)
    assert loaded.stored.states == digests_of(eight)
    # ... and the one after sends the changed state only.
    _, sent = await commit_bytes(store, epoch_turn(loaded, 9), 8)
    assert STATE_BYTES < sent < STATE_BYTES + BESIDE_STATES

    # A rollback to an inline version: its states are stored by digest from then on.
    rolled = await store.rollback(TENANT, "s", 5)
    assert rolled.version == 10
    loaded = await store.load(TENANT, "s", expected_identity=SHIPPED)
    assert_same_content(old[5], loaded)
    assert_same_states(old[5], loaded)
    assert loaded.stored is not None and loaded.stored.states == digests_of(old[5])
    for v in range(10, 15):
        loaded = await store.commit(epoch_turn(loaded, v + 1), v)
    assert_same_record(loaded, await store.load(TENANT, "s"))
    # No inline head is kept any more; every state stored is one a kept head names.
    assert await store.versions(TENANT, "s") == [11, 12, 13, 14, 15]
    assert set(await stored_states(store, TENANT, "s")) == await kept_digests(store, TENANT, "s")
    assert await store.delete(TENANT, "s")
    assert await stored_states(store, TENANT, "s") == {}


async def test_a_corrupt_or_missing_state_is_detected_and_never_relied_on(
    store: SessionStore,
) -> None:
    record = SessionRecord("s", TENANT, SHIPPED)
    for i in range(1, 4):
        record = await store.commit(epoch_turn(record, i), i - 1)
    base = await store.load(TENANT, "s")
    epoch = state_digest(encode_state_blob(base.extra_states["epoch"]))
    current = state_digest(encode_state_blob(base.state))

    async def put(digest: str, blob: bytes | None) -> None:
        """Replace (or with None, remove) a stored state behind the store's back."""
        if isinstance(store, RedisStore):
            states = store._session_keys(TENANT, "s")[3]
            if blob is None:
                await store._redis.hdel(states, digest)
            else:
                await store._redis.hset(states, digest, blob)
            return
        assert isinstance(store, SqliteStore)
        where = "tenant = ? AND session_id = ? AND digest = ?"
        if blob is None:
            await store._run(lambda: store._db().execute(
                f"DELETE FROM states WHERE {where}", (TENANT, "s", digest)))
        else:
            await store._run(lambda: store._db().execute(
                f"UPDATE states SET data = ? WHERE {where}", (blob, TENANT, "s", digest)))

    good = (await stored_states(store, TENANT, "s"))[current]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    await put(current, bytes(bad))
    with pytest.raises(CorruptRecord, match="checksum"):
        await store.load(TENANT, "s")
    with pytest.raises(CorruptRecord):
        await store.export(TENANT, "s")
    await put(current, good)
    assert_same_record(record, await store.load(TENANT, "s"))

    # The epoch state goes missing: the head that names it no longer loads, and a commit
    # whose base head named it (so would not send it) is stored whole, with every state.
    await put(epoch, None)
    with pytest.raises(CorruptRecord, match="missing"):
        await store.load(TENANT, "s")
    nxt = epoch_turn(base, 4)
    assert epoch in digests_of(nxt)
    stored, sent = await commit_bytes(store, nxt, 3)
    assert sent > 3 * STATE_BYTES
    loaded = await store.load(TENANT, "s")
    assert_same_record(stored, loaded)
    assert loaded.stored is not None and loaded.stored.lineage == ((4, 4),)
    assert epoch in await stored_states(store, TENANT, "s")


# -- Redis specifics -----------------------------------------------------------------------


async def test_redis_keys_share_one_hash_tag(redis_server: Any) -> None:
    async with RedisStore(redis_server.url, prefix="tags") as store:
        await store.commit(make_record("s:1", tenant="t-1"), 0)
        keys = sorted(k.decode() for k in await store._redis.keys("tags:*"))
    # The layout has a third session key since deltas: "delta", and a fourth since states
    # are stored by digest: "states", on the same hash tag; and one key of the whole store,
    # the set of tenants (counting without a SCAN).
    assert keys == [
        "tags:idx:{t-1}",
        "tags:tenants",
        "tags:{t-1/s:1}:cur",
        "tags:{t-1/s:1}:delta",
        "tags:{t-1/s:1}:hist",
        "tags:{t-1/s:1}:states",
    ]


async def test_redis_ttl_is_set_and_refreshed(redis_server: Any) -> None:
    prefix = f"ttl{uuid.uuid4().hex[:8]}"
    async with RedisStore(redis_server.url, ttl_seconds=100, prefix=prefix) as store:
        assert await store.ttl(TENANT, "s1") == (-2, -2)
        await store.commit(make_record(), 0)
        cur_ttl, hist_ttl = await store.ttl(TENANT, "s1")
        assert 95 <= cur_ttl <= 100 and 95 <= hist_ttl <= 100
        # Every key of the session has the TTL.
        keys = store._session_keys(TENANT, "s1")
        assert all(95 <= t <= 100 for t in (await store.key_ttls(TENANT, "s1")).values())
        assert len(keys) == 4 and await store._redis.exists(*keys) == 4
        cur, hist, delta, states = keys
        for key in keys:
            await store._redis.expire(key, 5)
        await store.load(TENANT, "s1")
        assert min(await store.ttl(TENANT, "s1")) >= 95
        assert min((await store.key_ttls(TENANT, "s1")).values()) >= 95
        await store._redis.expire(cur, 5)
        await store._redis.expire(delta, 5)
        await store._redis.expire(states, 5)
        await store.commit(next_turn(await store.load(TENANT, "s1"), [1], 1), 1)
        assert min(await store.ttl(TENANT, "s1")) >= 95
        assert min((await store.key_ttls(TENANT, "s1")).values()) >= 95
    async with RedisStore(redis_server.url, prefix=prefix) as no_ttl:
        # A store configured without TTL neither refreshes nor clears an existing one.
        await no_ttl.load(TENANT, "s1")
        assert min(await no_ttl.ttl(TENANT, "s1")) > 0


async def test_redis_expired_sessions_leave_list_and_count(redis_server: Any) -> None:
    prefix = f"exp{uuid.uuid4().hex[:8]}"
    async with RedisStore(redis_server.url, ttl_seconds=1, prefix=prefix) as store:
        await store.commit(make_record("short"), 0)
        assert await store.count(TENANT) == 1
        await asyncio.sleep(1.3)
        with pytest.raises(SessionNotFound):
            await store.load(TENANT, "short")
        assert await store.list(TENANT) == ([], None)
        assert await store.count(TENANT) == 0
        assert await store.count() == 0


async def test_redis_outage_then_recovery(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, prefix=f"out{uuid.uuid4().hex[:8]}")
    try:
        first = await store.commit(make_record(), 0)
        last = await store.commit(next_turn(first, [5, 6], seed=3), 1)
        redis_server.stop()
        for attempt in (
            store.load(TENANT, "s1"),
            store.commit(next_turn(last, [7], seed=4), 2),
            store.ping(),
            store.list(TENANT),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await attempt
            assert time.monotonic() - started < 5
        redis_server.start()
        loaded = await store.load(TENANT, "s1")
        assert loaded.version == 2
        assert_same_content(last, loaded)
        assert (await store.commit(next_turn(loaded, [7], seed=4), 2)).version == 3
    finally:
        redis_server.start()
        await store.close()


async def test_redis_unreachable_fails_fast() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with RedisStore(f"redis://user:secret@127.0.0.1:{port}/0") as store:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.ping()
        assert time.monotonic() - started < 5
        assert "secret" not in str(info.value)


async def test_redis_replayed_commit_script_is_not_a_conflict(redis_server: Any) -> None:
    # redis-py re-sends a command once after a dropped connection; if the first send had
    # already run, the replay must report the same success instead of a 409.
    async with RedisStore(redis_server.url, prefix=f"rep{uuid.uuid4().hex[:8]}") as store:
        keys = list(store._session_keys(TENANT, "s1"))
        plan = plan_commit(dataclasses.replace(make_record(), version=1), None)
        plan.token = "token-1"
        args = store._commit_args(plan, 0)
        assert await store._commit_script(keys=keys, args=args) == [1, 1]
        assert await store._commit_script(keys=keys, args=args) == [1, 1]
        plan.token = "token-2"
        args = store._commit_args(plan, 0)
        assert await store._commit_script(keys=keys, args=args) == [0, 1]
        assert_same_content(make_record(), await store.load(TENANT, "s1"))


# -- SQLite specifics ----------------------------------------------------------------------


async def test_sqlite_two_instances_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    async with SqliteStore(path) as a, SqliteStore(path) as b:
        first = await a.commit(make_record(), 0)
        assert_same_content(first, await b.load(TENANT, "s1"))
        second = await b.commit(next_turn(first, [1, 2], seed=1), 1)
        loaded = await a.load(TENANT, "s1")
        assert loaded.version == 2
        assert_same_content(second, loaded)
        with pytest.raises(VersionConflict):
            await a.commit(next_turn(first, [3], seed=2), 1)
        results = await asyncio.gather(
            *(s.commit(next_turn(second, [i], seed=i), 2) for i, s in enumerate([a, b] * 5)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, SessionRecord) for r in results) == 1
        assert sum(isinstance(r, VersionConflict) for r in results) == 9
        assert await a.count() == await b.count() == 1


async def test_sqlite_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    async with SqliteStore(blocker / "sessions.sqlite3") as store:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.load(TENANT, "s1")


async def test_open_store(tmp_path: Path, redis_server: Any) -> None:
    data_dir = tmp_path / "data"
    store = open_store(None, data_dir)
    assert isinstance(store, SqliteStore)
    assert store.path == data_dir / "sessions.sqlite3"
    await store.commit(make_record(), 0)
    await store.close()
    assert (data_dir / "sessions.sqlite3").exists()

    redis_store = open_store(redis_server.url, data_dir, ttl_seconds=60)
    assert isinstance(redis_store, RedisStore) and redis_store.ttl_seconds == 60
    await redis_store.ping()
    await redis_store.close()

    with pytest.raises(ValueError):
        open_store("ftp://example", data_dir)


# -- hardening: atomic delete, clean re-creation, import validation, the event loop, TTL on
#    both backends, counting without SCAN, the per-tenant session limit ---------------------


def _open(backend: str, tmp_path: Path, redis_server: Any, **options: Any) -> SessionStore:
    """A store of ``backend`` with ``options``, isolated from other tests."""
    if backend == "sqlite":
        return SqliteStore(tmp_path / f"{uuid.uuid4().hex[:8]}.sqlite3", **options)
    redis_server.start()
    return RedisStore(redis_server.url, prefix=f"h{uuid.uuid4().hex[:12]}", **options)


async def _monitored(redis_server: Any, store: RedisStore, action: Any) -> tuple[Any, list[dict]]:
    """Run ``action()`` under MONITOR; its result and the commands the server saw (those that
    scripts issued included, marked ``client_type == "lua"``)."""
    watcher = aioredis.from_url(redis_server.url)
    try:
        async with watcher.monitor() as monitor:
            result = await action()
            sentinel = f"end-{uuid.uuid4().hex}"
            await store._redis.echo(sentinel)
            seen = []
            while sentinel not in (command := await monitor.next_command())["command"]:
                seen.append(command)
    finally:
        await watcher.aclose()
    return result, seen


async def test_redis_delete_removes_every_key_in_one_command(redis_server: Any) -> None:
    async with RedisStore(redis_server.url, prefix=f"del{uuid.uuid4().hex[:8]}") as store:
        record = SessionRecord("s", TENANT, SMALL)
        for i in range(1, 4):
            record = await store.commit(server_turn(record, i), i - 1)
        await store.commit(make_record("warm-up"), 0)
        assert await store.delete(TENANT, "warm-up")  # the server now has the script
        keys = store._session_keys(TENANT, "s")
        assert await store._redis.exists(*keys) == 4

        deleted, seen = await _monitored(redis_server, store, lambda: store.delete(TENANT, "s"))
        assert deleted is True
        # One command removes the head, the kept versions and the deltas together: no reader
        # (or new session) ever sees a session half gone.
        touching = [c["command"] for c in seen
                    if c["client_type"] != "lua" and any(k in c["command"] for k in keys)]
        assert len(touching) == 1, touching
        assert all(k in touching[0] for k in keys)
        assert await store._redis.exists(*keys) == 0
        idx, exp = store._index_keys(TENANT)
        assert await store._redis.zscore(idx, "s") is None
        assert await store.count(TENANT) == 0
        assert await store.delete(TENANT, "s") is False


async def test_recreated_session_starts_clean(store: SessionStore) -> None:
    record = await store.commit(make_record("s"), 0)
    for v in (2, 3):
        record = await store.commit(next_turn(record, [v], seed=v), v - 1)
    assert await store.versions(TENANT, "s") == [1, 2, 3]
    assert await store.delete(TENANT, "s")
    fresh = make_record("s", seed=7)
    assert (await store.commit(fresh, 0)).version == 1
    assert await store.versions(TENANT, "s") == [1]
    with pytest.raises(SessionNotFound):
        await store.rollback(TENANT, "s", 2)
    assert_same_content(fresh, await store.load(TENANT, "s"))

    # Leftovers of a gone session (a delete cut short, an old writer's) show nowhere, and
    # the next session of that id does not inherit them.
    record = await store.commit(make_record("t"), 0)
    for v in (2, 3):
        record = await store.commit(next_turn(record, [v], seed=v), v - 1)
    if isinstance(store, RedisStore):
        await store._redis.delete(store._session_keys(TENANT, "t")[0])
    else:
        assert isinstance(store, SqliteStore)
        await store._run(lambda: store._db().execute(
            "DELETE FROM sessions WHERE session_id = 't'"))
    with pytest.raises(SessionNotFound):
        await store.versions(TENANT, "t")
    with pytest.raises(SessionNotFound):
        await store.rollback(TENANT, "t", 2)
    fresh = make_record("t", seed=8)
    await store.commit(fresh, 0)
    assert await store.versions(TENANT, "t") == [1]
    with pytest.raises(SessionNotFound):
        await store.rollback(TENANT, "t", 2)
    assert_same_content(fresh, await store.load(TENANT, "t"))


def _valid_import() -> SessionRecord:
    """A record as the server makes it (decoded, so that editing it forges an export)."""
    record = SessionRecord("s", TENANT, SMALL)
    for i in (1, 2):
        record = server_turn(record, i)
    return decode_record(encode_record(record))


def _forge(record: SessionRecord, tokens: list[int] | None = None,
           tensors: dict[str, torch.Tensor] | None = None, **header: Any) -> bytes:
    """``record`` framed and checksummed as encode_record does, with ``header`` fields,
    ``tokens`` and ``tensors`` the encoder itself would refuse."""
    from safetensors.torch import save

    state_bytes, info = _encode_states(record)
    if tensors is not None:
        state_bytes = save(tensors)
    packed = _pack_tokens(record.transcript) if tokens is None else struct.pack(
        f"<{len(tokens)}i", *tokens)
    fields = {**_scalar_header(record), "state": info, "messages": record.messages,
              "meta": record.meta, **header}
    return _assemble(fields, packed, state_bytes)


def _edited(edit: Any) -> bytes:
    record = _valid_import()
    edit(record)
    return encode_record(record)


def _set(obj: Any, key: Any, value: Any) -> Any:
    obj[key] = value


NAN_STATE = torch.full(SMALL.state_shape, float("nan"))
INF_STATE = torch.zeros(SMALL.state_shape).index_fill_(0, torch.tensor([1]), float("inf"))

FORGED_IMPORTS = {
    "messages not a list": (lambda: _edited(lambda r: setattr(r, "messages", {"a": 1})),
                            r"messages"),
    "message not an object": (lambda: _edited(lambda r: _set(r.messages, 1, "hi")),
                              r"messages\[1\]"),
    "role not a string": (lambda: _edited(lambda r: _set(r.messages[0], "role", 3)),
                          r"messages\[0\]"),
    "content missing": (lambda: _edited(lambda r: r.messages[2].pop("content")),
                        r"messages\[2\]"),
    "content not a string": (lambda: _edited(lambda r: _set(r.messages[3], "content", [1])),
                             r"messages\[3\]"),
    "boundaries not sorted": (
        lambda: _edited(lambda r: _set(r.meta, "boundaries", [0, 150, 100, 160])),
        r"boundaries"),
    "boundary past the transcript": (
        lambda: _edited(lambda r: _set(r.meta, "boundaries", [0, 100, 201])), r"boundaries"),
    "boundary negative": (lambda: _edited(lambda r: _set(r.meta, "boundaries", [-1, 100])),
                          r"boundaries"),
    "boundary not an int": (lambda: _edited(lambda r: _set(r.meta, "boundaries", [0, 1.5])),
                            r"boundaries"),
    "boundaries not a list": (lambda: _edited(lambda r: _set(r.meta, "boundaries", "0,50")),
                              r"boundaries"),
    "tokens_absorbed behind the transcript": (
        lambda: _edited(lambda r: setattr(r, "tokens_absorbed", 150)), r"tokens_absorbed"),
    "tokens_absorbed past the transcript": (
        lambda: _forge(_valid_import(), tokens_absorbed=201), r"tokens_absorbed"),
    "tokens_absorbed of an empty transcript": (
        lambda: _forge(dataclasses.replace(_valid_import(), transcript=[], messages=[],
                                           meta={}), tokens_absorbed=1),
        r"tokens_absorbed"),
    "turns negative": (lambda: _forge(_valid_import(), turns=-1), r"turns"),
    "token id negative": (lambda: _forge(_valid_import(), tokens=[5] * 199 + [-7]),
                          r"transcript"),
    "state NaN": (lambda: _edited(lambda r: setattr(r, "state", NAN_STATE)), r"state"),
    "state inf": (lambda: _edited(lambda r: setattr(r, "state", INF_STATE)), r"state"),
    "extra state NaN": (lambda: _edited(lambda r: _set(r.extra_states, "epoch", NAN_STATE)),
                        r"extra_states\['epoch'\]"),
    "state of another shape": (
        lambda: _forge(_valid_import(), tensors={"state": torch.zeros(2, 1, 2, 8)},
                       state={"dtype": "float32", "shape": [2, 1, 2, 8]}),
        r"state"),
    "extra state of another shape": (
        lambda: _forge(_valid_import(), tensors={
            "state": torch.zeros(SMALL.state_shape), "extra.block": torch.zeros(2, 1, 4, 2),
            "extra.epoch": torch.zeros(SMALL.state_shape)}),
        r"block"),
    "epoch past the transcript": (
        lambda: _edited(lambda r: _set(r.meta, "epoch", {"window_start": 500,
                                                         "write_from": 100})),
        r"epoch"),
}


@pytest.mark.parametrize("case", sorted(FORGED_IMPORTS))
async def test_import_refuses_forged_records(store: SessionStore, case: str) -> None:
    make, match = FORGED_IMPORTS[case]
    data = make()
    with pytest.raises(CorruptRecord, match=match):
        await store.import_(TENANT, "forged", data, expected_identity=SMALL)
    with pytest.raises(SessionNotFound):
        await store.load(TENANT, "forged")


async def test_import_checks_token_ids_against_the_vocabulary(store: SessionStore) -> None:
    data = encode_record(_valid_import())
    top = max(_valid_import().transcript)
    with pytest.raises(CorruptRecord, match=r"transcript.*vocab"):
        await store.import_(TENANT, "v", data, vocab_size=top)
    imported = await store.import_(TENANT, "v", data, expected_identity=SMALL,
                                   vocab_size=top + 1)
    assert_same_content(_valid_import(), await store.load(TENANT, "v"))
    assert imported.version == 1
    # An empty session and one that never had a state are fine.
    empty = encode_record(SessionRecord("e", TENANT, SMALL))
    assert (await store.import_(TENANT, "e", empty, vocab_size=10)).version == 1


async def test_large_records_are_coded_off_the_event_loop(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large record's encoding and decoding runs on a worker thread, so other requests'
    tasks keep running meanwhile. Each coding step is slowed here by a sleep that blocks its
    thread: a ticker task must tick inside every one of those windows."""
    windows: list[tuple[str, float, float]] = []

    def slowed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                time.sleep(0.2)
                windows.append((name, start, time.monotonic()))
        return wrapper

    for name in ("assemble", "plan_commit", "encode_record", "decode_record"):
        monkeypatch.setattr(store_base, name, slowed(name, getattr(store_base, name)))

    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    big = dataclasses.replace(server_turn(SessionRecord("big", TENANT, SMALL), 1),
                              transcript=list(range(100_000)), tokens_absorbed=99_999)
    task = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0.01)
        await store.commit(big, 0)
        await store.load(TENANT, "big")
        data = await store.export(TENANT, "big")
        await store.import_(TENANT, "big-copy", data)
    finally:
        task.cancel()
    names = {name for name, _, _ in windows}
    assert names == {"assemble", "plan_commit", "encode_record", "decode_record"}, names
    for name, start, end in windows:
        assert any(start < t < end for t in ticks), f"the event loop stood still in {name}"
    assert_same_content(big, await store.load(TENANT, "big-copy"))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_ttl_expires_idle_sessions_on_both_backends(
    backend: str, tmp_path: Path, redis_server: Any
) -> None:
    async with _open(backend, tmp_path, redis_server, ttl_seconds=1) as store:
        await store.commit(make_record("idle"), 0)
        await store.commit(make_record("idle-b", tenant="tenant-b"), 0)
        await asyncio.sleep(1.5)
        kept = await store.commit(make_record("kept"), 0)
        with pytest.raises(SessionNotFound):
            await store.load(TENANT, "idle")
        with pytest.raises(SessionNotFound):
            await store.versions(TENANT, "idle")
        with pytest.raises(SessionNotFound):
            await store.export(TENANT, "idle")
        assert_same_content(kept, await store.load(TENANT, "kept"))
        assert [s.session_id for s in (await store.list(TENANT))[0]] == ["kept"]
        assert await store.list("tenant-b") == ([], None)
        assert await store.count(TENANT) == 1
        assert await store.count("tenant-b") == 0
        assert await store.count() == 1
        # The id is free again, and starts clean.
        assert (await store.commit(make_record("idle", seed=3), 0)).version == 1
        assert await store.versions(TENANT, "idle") == [1]
        with pytest.raises(VersionConflict):
            await store.commit(make_record("idle-b", tenant="tenant-b"), 1)


async def test_sqlite_ttl_purges_expired_rows(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "ttl.sqlite3", ttl_seconds=1) as store:
        record = await store.commit(make_record("old"), 0)
        await store.commit(next_turn(record, [1], seed=1), 1)
        await store.commit(make_record("old-b", tenant="tenant-b"), 0)
        await asyncio.sleep(1.5)
        await store.commit(make_record("new"), 0)  # purges what has expired

        def rows() -> dict[str, int]:
            db = store._db()
            return {t: db.execute(f"SELECT COUNT(*) FROM {t} WHERE session_id LIKE 'old%'")
                    .fetchone()[0] for t in ("sessions", "versions", "spans", "deltas",
                                             "states", "state_refs")}

        assert await store._run(rows) == {"sessions": 0, "versions": 0, "spans": 0,
                                          "deltas": 0, "states": 0, "state_refs": 0}
        assert await store.delete(TENANT, "old") is False
    with pytest.raises(ValueError):
        SqliteStore(tmp_path / "x.sqlite3", ttl_seconds=0)


async def test_open_store_passes_the_options_to_both_backends(
    tmp_path: Path, redis_server: Any
) -> None:
    for url in (None, f"sqlite://{tmp_path}/other.sqlite3", redis_server.url):
        store = open_store(url, tmp_path, ttl_seconds=30, keep_versions=3,
                           max_sessions_per_tenant=7)
        try:
            assert store.ttl_seconds == 30 and store.keep_versions == 3
            assert store.max_sessions_per_tenant == 7
        finally:
            await store.close()


async def _scans(store: RedisStore) -> int:
    stats = await store._redis.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_redis_count_of_all_tenants_does_not_scan(redis_server: Any) -> None:
    async with RedisStore(redis_server.url, prefix=f"cnt{uuid.uuid4().hex[:8]}") as store:
        # A store that predates the tenant set: its first count of all tenants finds them
        # once (the only walk of the keyspace), later ones read the set.
        await store._redis.zadd(store._index_keys("legacy")[0], {"x": 0})
        await store._redis.hset(store._session_keys("legacy", "x")[0], mapping={"v": 1})
        for tenant, n in (("a", 3), ("b", 1), ("c", 2)):
            for i in range(n):
                await store.commit(make_record(f"s{i}", tenant=tenant), 0)
        assert await store.count() == 7

        before = await _scans(store)
        assert await store.count() == 7
        await store.delete("a", "s0")
        await store.commit(make_record("s9", tenant="d"), 0)
        assert await store.count() == 7
        await store.delete("b", "s0")
        assert await store.count() == 6
        assert await store.count("a") == 2
        assert await _scans(store) == before
    # Another store on the same keys: the set is already there.
    async with RedisStore(redis_server.url, prefix=store.prefix) as again:
        before = await _scans(again)
        assert await again.count() == 6
        assert await _scans(again) == before


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_max_sessions_per_tenant(backend: str, tmp_path: Path, redis_server: Any) -> None:
    async with _open(backend, tmp_path, redis_server, max_sessions_per_tenant=2) as store:
        first = await store.commit(make_record("s1"), 0)
        await store.commit(make_record("s2"), 0)
        with pytest.raises(TooManySessions, match=r"2 sessions.*max_sessions_per_tenant=2"
                                                  r".*delete") as info:
            await store.commit(make_record("s3"), 0)
        assert isinstance(info.value, StoreError) and info.value.limit == 2
        data = await store.export(TENANT, "s1")
        with pytest.raises(TooManySessions):
            await store.fork(TENANT, "s1", "s1-fork")
        with pytest.raises(TooManySessions):
            await store.import_(TENANT, "s3", data)
        with pytest.raises(TooManySessions):
            await store.import_(TENANT, "s3", data, overwrite=True)
        # Existing sessions go on; an existing id is still a conflict; other tenants have
        # their own room.
        await store.commit(next_turn(first, [1], seed=1), 1)
        assert (await store.import_(TENANT, "s2", data, overwrite=True)).version == 2
        await store.rollback(TENANT, "s2", 1)
        with pytest.raises(VersionConflict):
            await store.commit(make_record("s1"), 0)
        await store.commit(make_record("s1", tenant="tenant-b"), 0)
        assert await store.count(TENANT) == 2
        # Deleting one makes room.
        assert await store.delete(TENANT, "s2")
        assert (await store.fork(TENANT, "s1", "s1-fork")).version == 1
        with pytest.raises(SessionNotFound):
            await store.load(TENANT, "s3")
    for bad in (-1,):
        with pytest.raises(ValueError):
            _open(backend, tmp_path, redis_server, max_sessions_per_tenant=bad)
