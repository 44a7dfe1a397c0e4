"""Persistent, versioned storage of δ-mem session records (state, transcript, messages).

Backends: :class:`RedisStore` (shared by any number of server replicas) and
:class:`SqliteStore` (one machine). Both implement :class:`SessionStore`; pick one with
:func:`open_store`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .base import SessionStore
from .codec import FORMAT_VERSION, decode_record, encode_record, validate_record
from .errors import (
    CorruptRecord,
    IdentityMismatch,
    InvalidSessionId,
    SessionNotFound,
    StoreError,
    StoreUnavailable,
    TooManySessions,
    UnknownFormat,
    VersionConflict,
)
from .record import (
    SessionRecord,
    SessionSummary,
    StateIdentity,
    validate_session_id,
    validate_tenant,
)
from .redis_store import RedisStore
from .sqlite_store import SqliteStore

__all__ = [
    "FORMAT_VERSION",
    "CorruptRecord",
    "IdentityMismatch",
    "InvalidSessionId",
    "RedisStore",
    "SessionNotFound",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "SqliteStore",
    "StateIdentity",
    "StoreError",
    "StoreUnavailable",
    "TooManySessions",
    "UnknownFormat",
    "VersionConflict",
    "decode_record",
    "encode_record",
    "open_store",
    "validate_record",
    "validate_session_id",
    "validate_tenant",
]

SQLITE_FILENAME = "sessions.sqlite3"


def open_store(
    url: str | None,
    data_dir: str | os.PathLike[str],
    *,
    ttl_seconds: int | None = None,
    keep_versions: int = 5,
    max_sessions_per_tenant: int | None = None,
) -> SessionStore:
    """Open the store a server is configured with.

    ``url`` None or empty: SQLite at ``{data_dir}/sessions.sqlite3``. ``redis://``,
    ``rediss://`` or ``unix://``: Redis. ``sqlite:///abs/path`` : SQLite at that path.
    ``ttl_seconds`` (idle sessions expire), ``keep_versions`` and ``max_sessions_per_tenant``
    (None or 0: no limit) apply to either backend.
    """
    options = {
        "keep_versions": keep_versions,
        "ttl_seconds": ttl_seconds,
        "max_sessions_per_tenant": max_sessions_per_tenant,
    }
    if not url:
        return SqliteStore(Path(data_dir) / SQLITE_FILENAME, **options)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, **options)
    if scheme == "sqlite":
        path = unquote(urlsplit(url).path)
        if not path:
            raise ValueError(f"sqlite store URL has no path: {url!r}")
        return SqliteStore(path, **options)
    raise ValueError(f"unsupported session store URL scheme {scheme!r} (use redis:// or none)")
