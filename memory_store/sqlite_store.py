"""Session store on SQLite, for a single machine (one or several server processes).

Tables::

    sessions  (tenant, session_id) -> version, turns, tokens_absorbed, created_at,
              updated_at, token
              one row a session: its summary (what ``list`` shows) and its compare-and-set;
              ``token`` is the current head's id (a random hex string per commit; NULL for a
              session last written by the previous layout)
    versions  (tenant, session_id, version) -> record BLOB
              the head of each kept version (codec.encode_head), the last ``keep_versions``;
              rows of earlier layouts hold heads with inline states (head format 1) or whole
              records (codec.encode_record)
    spans     (tenant, session_id, version, part, lo) -> hi
              the lineages of each kept head, one row per range: part 0 names the deltas
              making its content, part 1 the turn-log parts holding its visible turn log
    deltas    (tenant, session_id, part, version) -> data BLOB
              part 0: the delta of a version (codec.encode_delta: the tokens, messages and
              boundaries it appended); part 1: its turn-log part (codec.encode_turns); a row
              exists while some kept head's spans name it
    states    (tenant, session_id, digest) -> data BLOB
              each state tensor once (codec.encode_state_blob), by its digest, while some
              kept head names it
    state_refs (tenant, session_id, version, digest)
              the state digests each kept head names

A commit is one transaction: compare ``sessions.version`` (and, for a commit that builds on
stored deltas, ``sessions.token``: the head its record was read as must still be current,
else the record is stored whole; the states the new head names and the commit does not
send must be in ``states``, else likewise), then write one ``sessions`` row, one ``versions``
row, its few ``spans`` and ``state_refs`` rows, at most one ``deltas`` row of each part, and
the ``states`` rows of the states its base head did not name: the new head and what the turn
appended or changed, never the history. It then deletes the heads (and their spans and state
refs) older than the last ``keep_versions`` versions and, of the deltas those spans named,
the ones no kept head's spans name, and the states no kept head names. Loading a version is
one SELECT: the head, the deltas and turn-log parts its spans name, and its states.

A file written by an earlier layout is upgraded in place when opened (the tables and the
``token`` column it lacks are added); its sessions load as they are (whole records, or heads
with inline states) and their first commit stores the whole content and the states once. (A
server running the previous code cannot read these heads: do not serve one file with both.)

With ``ttl_seconds``, a session whose last commit (``updated_at``) is older than that is
gone: every read skips it (load and versions say SessionNotFound, list and count leave it
out, a commit finds version 0), and its rows are purged lazily, a batch at a time, by the
next commit of any session (one indexed range query on ``updated_at`` when nothing has
expired). Unlike Redis, a load does not refresh the TTL: that would turn every read into a
write; a session's turns commit, so an active conversation never expires.

With ``max_sessions_per_tenant``, a commit that creates a session counts the tenant's live
sessions inside its write transaction, so the limit holds exactly, also across processes.

WAL mode lets readers run beside the one writer, and ``busy_timeout`` makes a second process
wait for the write lock instead of failing. Every commit is a ``BEGIN IMMEDIATE`` transaction,
which takes the write lock before reading the version, so the compare-and-set cannot
interleave with another writer. sqlite3 connections are bound to their thread, so each store
runs all its statements on one dedicated worker thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    CommitPlan,
    Fetched,
    SessionStore,
    StaleBase,
    _check_ids,
    _check_list_args,
    subtract,
)
from .errors import SessionNotFound, StoreError, StoreUnavailable, VersionConflict
from .record import SessionSummary, validate_tenant

__all__ = ["SqliteStore"]

T = TypeVar("T")

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS sessions (
    tenant          TEXT    NOT NULL,
    session_id      TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    turns           INTEGER NOT NULL,
    tokens_absorbed INTEGER NOT NULL,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    token           TEXT,
    PRIMARY KEY (tenant, session_id)
)""",
    """
CREATE TABLE IF NOT EXISTS versions (
    tenant     TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    record     BLOB    NOT NULL,
    PRIMARY KEY (tenant, session_id, version)
)""",
    """
CREATE TABLE IF NOT EXISTS spans (
    tenant     TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    part       INTEGER NOT NULL,
    lo         INTEGER NOT NULL,
    hi         INTEGER NOT NULL,
    PRIMARY KEY (tenant, session_id, version, part, lo)
) WITHOUT ROWID""",
    """
CREATE TABLE IF NOT EXISTS deltas (
    tenant     TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    part       INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (tenant, session_id, part, version)
)""",
    """
CREATE TABLE IF NOT EXISTS states (
    tenant     TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (tenant, session_id, digest)
)""",
    """
CREATE TABLE IF NOT EXISTS state_refs (
    tenant     TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    digest     TEXT    NOT NULL,
    PRIMARY KEY (tenant, session_id, version, digest)
) WITHOUT ROWID""",
    # Finds the sessions a TTL has expired (the lazy purge).
    "CREATE INDEX IF NOT EXISTS sessions_by_updated ON sessions (updated_at)",
)
# Expired sessions a commit purges at most (the rest go with the next commits).
_PURGE_BATCH = 100
_SESSION_TABLES = ("sessions", "versions", "spans", "deltas", "states", "state_refs")
_DELTA, _TURNS = 0, 1  # spans.part / deltas.part
_STATE_ROW = 3  # the kind of the fetch's state rows (deltas and turn-log parts: 1 + part)

_UPSERT_SESSION = """
INSERT INTO sessions (tenant, session_id, version, turns, tokens_absorbed, created_at, updated_at,
                      token)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, session_id) DO UPDATE SET
    version = excluded.version,
    turns = excluded.turns,
    tokens_absorbed = excluded.tokens_absorbed,
    created_at = excluded.created_at,
    updated_at = excluded.updated_at,
    token = excluded.token
"""

# One SELECT, so one consistent snapshot: first a row with the version's head (NULL when that
# version is not kept) and the session's current version, token and creation time (no row at
# all: no such session); then its deltas (kind 1) and turn-log parts (kind 2) in order, and
# the states its head names (kind 3: digest, data; NULL data where the state is missing).
_FETCH = """
WITH c AS (SELECT version, token, created_at FROM sessions
           WHERE tenant = :t AND session_id = :s AND updated_at >= :cut),
     h AS (SELECT COALESCE(:v, (SELECT version FROM c)) AS v)
SELECT 0, h.v, r.record, c.version, c.token, c.created_at
  FROM c CROSS JOIN h
  LEFT JOIN versions r ON r.tenant = :t AND r.session_id = :s AND r.version = h.v
UNION ALL
SELECT 1 + p.part, d.version, d.data, NULL, NULL, NULL
  FROM h
  JOIN spans p ON p.tenant = :t AND p.session_id = :s AND p.version = h.v
  JOIN deltas d ON d.tenant = :t AND d.session_id = :s AND d.part = p.part
               AND d.version BETWEEN p.lo AND p.hi
UNION ALL
SELECT 3, r.digest, st.data, NULL, NULL, NULL
  FROM h
  JOIN state_refs r ON r.tenant = :t AND r.session_id = :s AND r.version = h.v
  LEFT JOIN states st ON st.tenant = :t AND st.session_id = :s AND st.digest = r.digest
ORDER BY 1, 2
"""


class SqliteStore(SessionStore):
    """Session store in one SQLite file; several processes may share the file."""

    def __init__(
        self,
        path: str | Path,
        keep_versions: int = 5,
        busy_timeout: float = 5.0,
        *,
        ttl_seconds: int | None = None,
        max_sessions_per_tenant: int | None = None,
    ) -> None:
        super().__init__(keep_versions, ttl_seconds=ttl_seconds,
                         max_sessions_per_tenant=max_sessions_per_tenant)
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dmem-sqlite"
        )

    # -- thread plumbing ---------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError("SQLite store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except (sqlite3.OperationalError, OSError) as exc:
            # Locked past busy_timeout, unreadable file, full or failing disk: transient.
            raise StoreUnavailable(f"SQLite store {self.path} is unavailable: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path} failed: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives a process crash; only power loss can drop the
                # last commits.
                conn.execute("PRAGMA synchronous=NORMAL")
                _migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _cutoff(self) -> float:
        """Sessions last committed before this are expired (-inf without a TTL)."""
        if self.ttl_seconds is None:
            return float("-inf")
        return time.time() - self.ttl_seconds

    # -- primitives (run on the worker thread) -----------------------------------------------

    def _fetch_sync(self, tenant: str, session_id: str, version: int | None) -> Fetched | None:
        rows = (
            self._db()
            .execute(_FETCH, {"t": tenant, "s": session_id, "v": version,
                              "cut": self._cutoff()})
            .fetchall()
        )
        if not rows or rows[0][0] != 0:
            return None
        _, _, data, current, token, created = rows[0]
        return Fetched(
            current_version=int(current),
            token=token or "",
            created_at=float(created),
            data=None if data is None else bytes(data),
            deltas=[bytes(r[2]) for r in rows[1:] if r[0] == 1 + _DELTA],
            turns=[bytes(r[2]) for r in rows[1:] if r[0] == 1 + _TURNS],
            states={str(r[1]): None if r[2] is None else bytes(r[2])
                    for r in rows[1:] if r[0] == _STATE_ROW},
        )

    def _version_sync(self, tenant: str, session_id: str) -> int:
        row = (
            self._db()
            .execute(
                "SELECT version FROM sessions WHERE tenant = ? AND session_id = ? "
                "AND updated_at >= ?",
                (tenant, session_id, self._cutoff()),
            )
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _write_sync(self, plan: CommitPlan, expected_version: int) -> None:
        db = self._db()
        record = plan.record
        key = (record.tenant, record.session_id)
        new = record.version
        cut = self._cutoff()
        db.execute("BEGIN IMMEDIATE")
        try:
            if self.ttl_seconds is not None:
                self._purge(db, cut)
            row = db.execute(
                "SELECT version, token FROM sessions WHERE tenant = ? AND session_id = ? "
                "AND updated_at >= ?", (*key, cut)
            ).fetchone()
            current, token = (int(row[0]), row[1]) if row else (0, None)
            if current != expected_version:
                raise VersionConflict(
                    f"session {record.session_id!r} is at version {current}, "
                    f"not {expected_version}",
                    current_version=current,
                )
            if plan.base_token and token != plan.base_token:
                raise StaleBase(f"session {record.session_id!r} has another head")
            if current == 0:
                if self.max_sessions_per_tenant is not None:
                    # Inside the write transaction: exact, whatever other writers do.
                    (have,) = db.execute(
                        "SELECT COUNT(*) FROM sessions WHERE tenant = ? AND session_id != ? "
                        "AND updated_at >= ?", (*key, cut)
                    ).fetchone()
                    if have >= self.max_sessions_per_tenant:
                        raise self._too_many(record.tenant, have)
                # Nothing may be left of a session that is gone (expired, an old writer's
                # delete): the new one starts clean, no kept version, delta or state of the
                # old.
                for table in _SESSION_TABLES[1:]:
                    db.execute(f"DELETE FROM {table} WHERE tenant = ? AND session_id = ?", key)
            # A state the head names and the commit does not send must be stored (it is while
            # the base head is current; checked, so that no head names a missing state).
            unsent = [d for d in plan.state_refs if d not in plan.states]
            if unsent:
                (have,) = db.execute(
                    "SELECT COUNT(*) FROM states WHERE tenant = ? AND session_id = ? AND digest "
                    f"IN ({','.join('?' * len(unsent))})", (*key, *unsent)
                ).fetchone()
                if have != len(unsent):
                    raise StaleBase(f"session {record.session_id!r} lacks a state its base "
                                    "head named")
            db.execute(
                _UPSERT_SESSION,
                (
                    *key,
                    new,
                    record.turns,
                    record.tokens_absorbed,
                    record.created_at,
                    record.updated_at,
                    plan.token,
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO versions (tenant, session_id, version, record) "
                "VALUES (?, ?, ?, ?)",
                (*key, new, plan.head),
            )
            db.executemany(
                "INSERT OR REPLACE INTO spans (tenant, session_id, version, part, lo, hi) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(*key, new, _DELTA, lo, hi) for lo, hi in plan.lineage]
                + [(*key, new, _TURNS, lo, hi) for lo, hi in plan.log_lineage],
            )
            db.executemany(
                "INSERT OR REPLACE INTO state_refs (tenant, session_id, version, digest) "
                "VALUES (?, ?, ?, ?)",
                [(*key, new, digest) for digest in plan.state_refs],
            )
            db.executemany(
                "INSERT OR REPLACE INTO states (tenant, session_id, digest, data) "
                "VALUES (?, ?, ?, ?)",
                [(*key, digest, data) for digest, data in plan.states.items()],
            )
            for part, data in ((_DELTA, plan.delta), (_TURNS, plan.turns)):
                if data:
                    db.execute(
                        "INSERT OR REPLACE INTO deltas (tenant, session_id, part, version, data) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (*key, part, new, data),
                    )
            self._trim(db, key, new + 1 - self.keep_versions)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _purge(db: sqlite3.Connection, cut: float) -> None:
        """Delete a batch of the sessions last committed before ``cut``, with their rows."""
        gone = db.execute(
            "SELECT tenant, session_id FROM sessions WHERE updated_at < ? LIMIT ?",
            (cut, _PURGE_BATCH),
        ).fetchall()
        for key in gone:
            for table in _SESSION_TABLES:
                db.execute(f"DELETE FROM {table} WHERE tenant = ? AND session_id = ?", key)

    @staticmethod
    def _trim(db: sqlite3.Connection, key: tuple[str, str], oldest_kept: int) -> None:
        """Drop the heads older than ``oldest_kept`` and the deltas and states only they
        named."""
        where = "tenant = ? AND session_id = ? AND version < ?"
        gone = db.execute(f"SELECT part, lo, hi FROM spans WHERE {where}",
                          (*key, oldest_kept)).fetchall()
        dropped = db.execute(f"DELETE FROM versions WHERE {where}", (*key, oldest_kept)).rowcount
        db.execute(f"DELETE FROM spans WHERE {where}", (*key, oldest_kept))
        db.execute(f"DELETE FROM state_refs WHERE {where}", (*key, oldest_kept))
        if dropped:
            # A few states a kept head: the sweep reads only this session's rows.
            db.execute(
                "DELETE FROM states WHERE tenant = ? AND session_id = ? AND digest NOT IN "
                "(SELECT digest FROM state_refs WHERE tenant = ? AND session_id = ?)",
                (*key, *key),
            )
        if not gone:
            return
        kept = db.execute(
            "SELECT part, lo, hi FROM spans WHERE tenant = ? AND session_id = ?", key
        ).fetchall()
        for part in (_DELTA, _TURNS):
            for lo, hi in subtract(
                [(lo, hi) for p, lo, hi in gone if p == part],
                [(lo, hi) for p, lo, hi in kept if p == part],
            ):
                db.execute(
                    "DELETE FROM deltas WHERE tenant = ? AND session_id = ? AND part = ? "
                    "AND version BETWEEN ? AND ?",
                    (*key, part, lo, hi),
                )

    def _delete_sync(self, tenant: str, session_id: str) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            # An expired session is gone already: its rows go, but it was not there to delete.
            existed = db.execute(
                "SELECT 1 FROM sessions WHERE tenant = ? AND session_id = ? AND updated_at >= ?",
                (tenant, session_id, self._cutoff()),
            ).fetchone()
            for table in _SESSION_TABLES:
                db.execute(
                    f"DELETE FROM {table} WHERE tenant = ? AND session_id = ?",
                    (tenant, session_id),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return existed is not None

    def _list_sync(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[SessionSummary], str | None]:
        rows = (
            self._db()
            .execute(
                "SELECT session_id, version, turns, tokens_absorbed, created_at, updated_at "
                "FROM sessions WHERE tenant = ? AND session_id > ? AND updated_at >= ? "
                "ORDER BY session_id LIMIT ?",
                (tenant, after or "", self._cutoff(), limit + 1),
            )
            .fetchall()
        )
        page = [SessionSummary(*row) for row in rows[:limit]]
        return page, (page[-1].session_id if len(rows) > limit else None)

    def _versions_sync(self, tenant: str, session_id: str) -> list[int]:
        rows = (
            self._db()
            .execute(
                # Only a live session's: rows a gone session left behind (a delete of the
                # previous code cut short, an expired one not purged yet) are not versions.
                "SELECT v.version FROM versions v JOIN sessions s "
                "ON s.tenant = v.tenant AND s.session_id = v.session_id "
                "WHERE v.tenant = ? AND v.session_id = ? AND s.updated_at >= ? "
                "ORDER BY v.version",
                (tenant, session_id, self._cutoff()),
            )
            .fetchall()
        )
        return [int(r[0]) for r in rows]

    def _count_sync(self, tenant: str | None) -> int:
        cut = self._cutoff()
        if tenant is None:
            row = self._db().execute(
                "SELECT COUNT(*) FROM sessions WHERE updated_at >= ?", (cut,)
            ).fetchone()
        else:
            row = (
                self._db()
                .execute("SELECT COUNT(*) FROM sessions WHERE tenant = ? AND updated_at >= ?",
                         (tenant, cut))
                .fetchone()
            )
        return int(row[0])

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- async API ---------------------------------------------------------------------------

    async def _fetch(self, tenant: str, session_id: str, version: int | None) -> Fetched | None:
        return await self._run(self._fetch_sync, tenant, session_id, version)

    async def _version(self, tenant: str, session_id: str) -> int:
        return await self._run(self._version_sync, tenant, session_id)

    async def _write(self, plan: CommitPlan, expected_version: int) -> None:
        await self._run(self._write_sync, plan, expected_version)

    async def delete(self, tenant: str, session_id: str) -> bool:
        _check_ids(tenant, session_id)
        return await self._run(self._delete_sync, tenant, session_id)

    async def list(
        self, tenant: str, limit: int = 20, after: str | None = None
    ) -> tuple[list[SessionSummary], str | None]:
        _check_list_args(tenant, limit, after)
        return await self._run(self._list_sync, tenant, limit, after)

    async def versions(self, tenant: str, session_id: str) -> list[int]:
        _check_ids(tenant, session_id)
        kept = await self._run(self._versions_sync, tenant, session_id)
        if not kept:
            raise SessionNotFound(f"session {session_id!r} not found")
        return kept

    async def count(self, tenant: str | None = None) -> int:
        if tenant is not None:
            validate_tenant(tenant)
        return await self._run(self._count_sync, tenant)

    async def ping(self) -> None:
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the tables, or bring a file of the previous layout up to this one."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
        if "token" not in columns:
            conn.execute("ALTER TABLE sessions ADD COLUMN token TEXT")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
