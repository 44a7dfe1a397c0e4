"""Typed errors of the session store; the API layer maps each one to an HTTP status."""

from __future__ import annotations

__all__ = [
    "CorruptRecord",
    "IdentityMismatch",
    "InvalidSessionId",
    "SessionNotFound",
    "StoreError",
    "StoreUnavailable",
    "TooManySessions",
    "UnknownFormat",
    "VersionConflict",
]


class StoreError(Exception):
    """Base class of every error raised by the session store."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or is not answering (API: 503)."""


class VersionConflict(StoreError):
    """A compare-and-set lost: the stored version is not the one expected (API: 409)."""

    def __init__(self, message: str, *, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version


class SessionNotFound(StoreError):
    """No such session, or no such kept version of it (API: 404)."""


class InvalidSessionId(StoreError, ValueError):
    """A session or tenant id outside the allowed alphabet or length (API: 400)."""


class CorruptRecord(StoreError):
    """Stored bytes fail the checksum, are truncated, or do not parse."""


class UnknownFormat(CorruptRecord):
    """Bytes that are not a session record, or one of a format this build cannot read."""


class IdentityMismatch(StoreError):
    """The record was made with another backbone or adapter than the one expected."""


class TooManySessions(StoreError):
    """A commit would create a session for a tenant that already has ``limit`` of them (the
    store's ``max_sessions_per_tenant``; API: 429)."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit
