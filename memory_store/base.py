"""The session store interface and the operations every backend shares."""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from types import TracebackType

from .codec import decode_record, encode_record
from .errors import CorruptRecord, SessionNotFound
from .record import (
    SessionRecord,
    SessionSummary,
    StateIdentity,
    validate_session_id,
    validate_tenant,
)

__all__ = ["SessionStore"]

MAX_LIST_LIMIT = 1000


class SessionStore(ABC):
    """Persistent, versioned per-conversation records.

    Every write goes through :meth:`commit`, an atomic compare-and-set on the session's
    version, so a turn that started from version ``n`` lands only if nobody else committed
    since. Backends implement the raw primitives (``_read``, ``_version``, ``_cas``) and the
    listing/maintenance methods; rollback, fork, export and import are built on top here.
    """

    def __init__(self, keep_versions: int = 5) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.keep_versions = keep_versions

    # -- backend primitives ------------------------------------------------------------------

    @abstractmethod
    async def _read(self, tenant: str, session_id: str, version: int | None) -> bytes | None:
        """Raw bytes of the current record (``version`` None) or of a kept version."""

    @abstractmethod
    async def _version(self, tenant: str, session_id: str) -> int:
        """Current version, 0 when the session does not exist."""

    @abstractmethod
    async def _cas(self, record: SessionRecord, blob: bytes, expected_version: int) -> None:
        """Store ``blob`` as version ``record.version`` iff the current version is
        ``expected_version``; raise VersionConflict otherwise."""

    @abstractmethod
    async def delete(self, tenant: str, session_id: str) -> bool:
        """Remove a session and its kept versions; False if there was none."""

    @abstractmethod
    async def list(
        self, tenant: str, limit: int = 20, after: str | None = None
    ) -> tuple[list[SessionSummary], str | None]:
        """One page of the tenant's sessions in session id order, and the next cursor."""

    @abstractmethod
    async def versions(self, tenant: str, session_id: str) -> list[int]:
        """Kept versions, oldest first (the current one included)."""

    @abstractmethod
    async def count(self, tenant: str | None = None) -> int:
        """Number of sessions stored, for one tenant or all."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable if the backend does not answer."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    # -- shared operations -------------------------------------------------------------------

    async def load(
        self, tenant: str, session_id: str, expected_identity: StateIdentity | None = None
    ) -> SessionRecord:
        _check_ids(tenant, session_id)
        data = await self._read(tenant, session_id, None)
        if data is None:
            raise SessionNotFound(f"session {session_id!r} not found")
        return _decode(data, tenant, session_id, expected_identity)

    async def commit(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """Store ``record`` as version ``expected_version + 1``.

        ``record.version`` is ignored: ``expected_version`` (0 = must not exist yet) is what
        the compare-and-set checks. Returns a new record with the stored version and
        ``updated_at``; it shares the state tensor and lists with ``record``.
        """
        _check_ids(record.tenant, record.session_id)
        if expected_version < 0:
            raise ValueError("expected_version must be >= 0")
        stored = dataclasses.replace(record, version=expected_version + 1, updated_at=time.time())
        blob = encode_record(stored)
        await self._cas(stored, blob, expected_version)
        return stored

    async def rollback(self, tenant: str, session_id: str, to_version: int) -> SessionRecord:
        """Make kept version ``to_version`` current again, as a new version.

        Raises VersionConflict if another commit lands in between.
        """
        current = await self.load(tenant, session_id)
        data = await self._read(tenant, session_id, to_version)
        if data is None:
            raise SessionNotFound(f"version {to_version} of session {session_id!r} is not kept")
        old = _decode(data, tenant, session_id, None)
        return await self.commit(
            dataclasses.replace(old, created_at=current.created_at), current.version
        )

    async def fork(self, tenant: str, session_id: str, new_session_id: str) -> SessionRecord:
        """Copy a session's current content to a new session (version 1)."""
        validate_session_id(new_session_id)
        source = await self.load(tenant, session_id)
        now = time.time()
        clone = dataclasses.replace(
            source, session_id=new_session_id, version=0, created_at=now, updated_at=now
        )
        return await self.commit(clone, 0)

    async def export(self, tenant: str, session_id: str) -> bytes:
        """The current record's bytes, verified, ready for :meth:`import_` anywhere."""
        _check_ids(tenant, session_id)
        data = await self._read(tenant, session_id, None)
        if data is None:
            raise SessionNotFound(f"session {session_id!r} not found")
        _decode(data, tenant, session_id, None)
        return data

    async def import_(
        self,
        tenant: str,
        session_id: str,
        data: bytes,
        expected_identity: StateIdentity | None = None,
        overwrite: bool = False,
    ) -> SessionRecord:
        """Store exported bytes under ``tenant``/``session_id``.

        Without ``overwrite`` the session must not exist (VersionConflict otherwise); with it
        the import becomes the existing session's next version.
        """
        _check_ids(tenant, session_id)
        record = decode_record(data, expected_identity)
        expected = await self._version(tenant, session_id) if overwrite else 0
        record = dataclasses.replace(record, tenant=tenant, session_id=session_id)
        return await self.commit(record, expected)

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _check_ids(tenant: str, session_id: str) -> None:
    validate_tenant(tenant)
    validate_session_id(session_id)


def _check_list_args(tenant: str, limit: int, after: str | None) -> None:
    validate_tenant(tenant)
    if after is not None:
        validate_session_id(after)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be in [1, {MAX_LIST_LIMIT}]")


def _decode(
    data: bytes, tenant: str, session_id: str, expected_identity: StateIdentity | None
) -> SessionRecord:
    record = decode_record(data, expected_identity)
    # Guards against a backend handing back another session's bytes (key mix-up, bad restore).
    if record.tenant != tenant or record.session_id != session_id:
        raise CorruptRecord(
            f"record stored as {tenant}/{session_id} belongs to {record.tenant}/{record.session_id}"
        )
    return record
