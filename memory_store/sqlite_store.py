"""Session store on SQLite, for a single machine (one or several server processes).

WAL mode lets readers run beside the one writer, and ``busy_timeout`` makes a second process
wait for the write lock instead of failing. Every commit is a ``BEGIN IMMEDIATE`` transaction,
which takes the write lock before reading the version, so the compare-and-set cannot
interleave with another writer. sqlite3 connections are bound to their thread, so each store
runs all its statements on one dedicated worker thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import SessionStore, _check_ids, _check_list_args
from .errors import SessionNotFound, StoreError, StoreUnavailable, VersionConflict
from .record import SessionRecord, SessionSummary, validate_tenant

__all__ = ["SqliteStore"]

T = TypeVar("T")

_SCHEMA = """
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

_UPSERT_SESSION = """
INSERT INTO sessions (tenant, session_id, version, turns, tokens_absorbed, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, session_id) DO UPDATE SET
    version = excluded.version,
    turns = excluded.turns,
    tokens_absorbed = excluded.tokens_absorbed,
    created_at = excluded.created_at,
    updated_at = excluded.updated_at
"""

_LOAD_CURRENT = """
SELECT v.record FROM sessions s
JOIN versions v
  ON v.tenant = s.tenant AND v.session_id = s.session_id AND v.version = s.version
WHERE s.tenant = ? AND s.session_id = ?
"""


class SqliteStore(SessionStore):
    """Session store in one SQLite file; several processes may share the file."""

    def __init__(self, path: str | Path, keep_versions: int = 5, busy_timeout: float = 5.0) -> None:
        super().__init__(keep_versions)
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
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    # -- primitives (run on the worker thread) -----------------------------------------------

    def _read_sync(self, tenant: str, session_id: str, version: int | None) -> bytes | None:
        db = self._db()
        if version is None:
            row = db.execute(_LOAD_CURRENT, (tenant, session_id)).fetchone()
        else:
            row = db.execute(
                "SELECT record FROM versions WHERE tenant = ? AND session_id = ? AND version = ?",
                (tenant, session_id, version),
            ).fetchone()
        return bytes(row[0]) if row else None

    def _version_sync(self, tenant: str, session_id: str) -> int:
        row = (
            self._db()
            .execute(
                "SELECT version FROM sessions WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            )
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _cas_sync(self, record: SessionRecord, blob: bytes, expected_version: int) -> None:
        db = self._db()
        key = (record.tenant, record.session_id)
        db.execute("BEGIN IMMEDIATE")
        try:
            current = self._version_sync(*key)
            if current != expected_version:
                raise VersionConflict(
                    f"session {record.session_id!r} is at version {current}, "
                    f"not {expected_version}",
                    current_version=current,
                )
            db.execute(
                _UPSERT_SESSION,
                (
                    *key,
                    record.version,
                    record.turns,
                    record.tokens_absorbed,
                    record.created_at,
                    record.updated_at,
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO versions (tenant, session_id, version, record) "
                "VALUES (?, ?, ?, ?)",
                (*key, record.version, blob),
            )
            db.execute(
                "DELETE FROM versions WHERE tenant = ? AND session_id = ? AND version <= ?",
                (*key, record.version - self.keep_versions),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _delete_sync(self, tenant: str, session_id: str) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = db.execute(
                "DELETE FROM sessions WHERE tenant = ? AND session_id = ?", (tenant, session_id)
            ).rowcount
            db.execute(
                "DELETE FROM versions WHERE tenant = ? AND session_id = ?", (tenant, session_id)
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return removed > 0

    def _list_sync(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[SessionSummary], str | None]:
        rows = (
            self._db()
            .execute(
                "SELECT session_id, version, turns, tokens_absorbed, created_at, updated_at "
                "FROM sessions WHERE tenant = ? AND session_id > ? "
                "ORDER BY session_id LIMIT ?",
                (tenant, after or "", limit + 1),
            )
            .fetchall()
        )
        page = [SessionSummary(*row) for row in rows[:limit]]
        return page, (page[-1].session_id if len(rows) > limit else None)

    def _versions_sync(self, tenant: str, session_id: str) -> list[int]:
        rows = (
            self._db()
            .execute(
                "SELECT version FROM versions WHERE tenant = ? AND session_id = ? ORDER BY version",
                (tenant, session_id),
            )
            .fetchall()
        )
        return [int(r[0]) for r in rows]

    def _count_sync(self, tenant: str | None) -> int:
        if tenant is None:
            row = self._db().execute("SELECT COUNT(*) FROM sessions").fetchone()
        else:
            row = (
                self._db()
                .execute("SELECT COUNT(*) FROM sessions WHERE tenant = ?", (tenant,))
                .fetchone()
            )
        return int(row[0])

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- async API ---------------------------------------------------------------------------

    async def _read(self, tenant: str, session_id: str, version: int | None) -> bytes | None:
        return await self._run(self._read_sync, tenant, session_id, version)

    async def _version(self, tenant: str, session_id: str) -> int:
        return await self._run(self._version_sync, tenant, session_id)

    async def _cas(self, record: SessionRecord, blob: bytes, expected_version: int) -> None:
        await self._run(self._cas_sync, record, blob, expected_version)

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
