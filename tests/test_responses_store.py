"""The store operations the Responses API builds on: loading a kept older version and forking
from one (memory_store/base.py), against both backends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_memory_store import TENANT, assert_same_content, make_record, next_turn

from memory_store import RedisStore, SessionNotFound, SessionStore, SqliteStore


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "sqlite":
        backend: SessionStore = SqliteStore(tmp_path / "sessions.sqlite3", keep_versions=3)
    else:
        server = request.getfixturevalue("redis_server")
        server.start()
        backend = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:12]}", keep_versions=3)
    yield backend
    await backend.close()


async def _three_versions(store: SessionStore):
    v1 = await store.commit(make_record(), 0)
    v2 = await store.commit(next_turn(v1, [7, 8], seed=1), 1)
    v3 = await store.commit(next_turn(v2, [9], seed=2), 2)
    return v1, v2, v3


async def test_load_a_kept_version(store: SessionStore) -> None:
    v1, v2, v3 = await _three_versions(store)
    for want in (v1, v2, v3):
        got = await store.load(TENANT, "s1", version=want.version)
        assert got.version == want.version
        assert_same_content(want, got)
    # version=None is the current one, as before
    assert (await store.load(TENANT, "s1")).version == 3
    # A newer commit leaves the older heads readable as they were.
    await store.commit(next_turn(v3, [10], seed=3), 3)
    assert_same_content(v2, await store.load(TENANT, "s1", version=2))
    for missing in (0, 1, 5, 99):  # 1: beyond keep_versions (3) now
        with pytest.raises(SessionNotFound, match="not kept"):
            await store.load(TENANT, "s1", version=missing)
    with pytest.raises(SessionNotFound):
        await store.load(TENANT, "nope", version=1)
    with pytest.raises(SessionNotFound):
        await store.load("tenant-b", "s1", version=2)  # tenants stay apart


async def test_a_loaded_older_version_commits_whole_elsewhere(store: SessionStore) -> None:
    """A record read at an older version does not extend the current one: committing it on
    top of the current version stores it whole, never a wrong delta."""
    v1, v2, v3 = await _three_versions(store)
    old = await store.load(TENANT, "s1", version=2)
    turned = await store.commit(next_turn(old, [42], seed=7), 3)
    assert turned.version == 4
    loaded = await store.load(TENANT, "s1")
    assert loaded.transcript == v2.transcript + [42]
    assert_same_content(v3, await store.load(TENANT, "s1", version=3))


async def test_fork_from_a_kept_version(store: SessionStore) -> None:
    v1, v2, v3 = await _three_versions(store)
    fork = await store.fork(TENANT, "s1", "s1-branch", version=2)
    assert fork.version == 1 and fork.session_id == "s1-branch"
    loaded = await store.load(TENANT, "s1-branch")
    assert_same_content(v2, loaded)
    # The branch continues on its own; the source keeps its newer versions.
    await store.commit(next_turn(loaded, [5], seed=5), 1)
    assert (await store.load(TENANT, "s1-branch")).transcript == v2.transcript + [5]
    src = await store.load(TENANT, "s1")
    assert src.version == 3
    assert_same_content(v3, src)
    # No version: the current one, as before.
    cur = await store.fork(TENANT, "s1", "s1-copy")
    assert_same_content(v3, cur)
    with pytest.raises(SessionNotFound):
        await store.fork(TENANT, "s1", "s1-nothing", version=9)
