"""Contract tests of memory_store, run against both backends."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

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
    StoreUnavailable,
    UnknownFormat,
    VersionConflict,
    decode_record,
    encode_record,
    open_store,
    validate_session_id,
)
from memory_store.codec import _assemble, _pack_tokens

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
    """Flip one bit of the stored current record, behind the store's back."""
    if isinstance(store, RedisStore):
        cur, hist = store._session_keys(tenant, session_id)
        blob = bytearray(await store._redis.hget(cur, "blob"))
        blob[len(blob) // 2] ^= 0x10
        await store._redis.hset(cur, "blob", bytes(blob))
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


# -- Redis specifics -----------------------------------------------------------------------


async def test_redis_keys_share_one_hash_tag(redis_server: Any) -> None:
    async with RedisStore(redis_server.url, prefix="tags") as store:
        await store.commit(make_record("s:1", tenant="t-1"), 0)
        keys = sorted(k.decode() for k in await store._redis.keys("tags:*"))
    assert keys == ["tags:idx:{t-1}", "tags:{t-1/s:1}:cur", "tags:{t-1/s:1}:hist"]


async def test_redis_ttl_is_set_and_refreshed(redis_server: Any) -> None:
    prefix = f"ttl{uuid.uuid4().hex[:8]}"
    async with RedisStore(redis_server.url, ttl_seconds=100, prefix=prefix) as store:
        assert await store.ttl(TENANT, "s1") == (-2, -2)
        await store.commit(make_record(), 0)
        cur_ttl, hist_ttl = await store.ttl(TENANT, "s1")
        assert 95 <= cur_ttl <= 100 and 95 <= hist_ttl <= 100
        cur, hist = store._session_keys(TENANT, "s1")
        await store._redis.expire(cur, 5)
        await store._redis.expire(hist, 5)
        await store.load(TENANT, "s1")
        assert min(await store.ttl(TENANT, "s1")) >= 95
        await store._redis.expire(cur, 5)
        await store.commit(next_turn(await store.load(TENANT, "s1"), [1], 1), 1)
        assert min(await store.ttl(TENANT, "s1")) >= 95
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
        cur, hist = store._session_keys(TENANT, "s1")
        args = [0, encode_record(make_record()), 1, 11, "1.0", "2.0", 5, 0, "token-1"]
        assert await store._commit_script(keys=[cur, hist], args=args) == [1, 1]
        assert await store._commit_script(keys=[cur, hist], args=args) == [1, 1]
        args[-1] = "token-2"
        assert await store._commit_script(keys=[cur, hist], args=args) == [0, 1]


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
