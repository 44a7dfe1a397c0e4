"""Session store on Redis.

Keys, with cluster hash tags so that all keys of one session share a slot (the commit script
touches only those)::

    {prefix}:{tenant/session}:cur    hash: v, blob, turns, absorbed, created, updated, token
    {prefix}:{tenant/session}:hist   hash: str(version) -> blob, the last K versions
    {prefix}:idx:{tenant}            sorted set, all scores 0: session ids in lexical order
    {prefix}:exp:{tenant}            sorted set: session id -> expiry time (only with a TTL)

'/' separates tenant and session because ids may contain ':' but never '/'.

The tenant index lives on another slot than the session, so a Lua script cannot update both
atomically on a cluster; it is updated right after the compare-and-set instead. That is safe
because the index only serves listing and counting: the session's own keys are the truth.
An entry whose session is gone (expired, or a crash between the two steps of a delete) is
skipped and removed when listed; a session missing from the index (crash right after its
first commit) is added back by its next commit.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .base import SessionStore, _check_ids, _check_list_args
from .errors import SessionNotFound, StoreError, StoreUnavailable, VersionConflict
from .record import SessionRecord, SessionSummary, validate_tenant

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

# KEYS: cur, hist. ARGV: expected, blob, turns, absorbed, created, updated, keep, ttl, token.
# Returns {1, new_version} or {0, current_version}.
_COMMIT_LUA = """
local fields = redis.call('HMGET', KEYS[1], 'v', 'token')
local current = tonumber(fields[1]) or 0
local expected = tonumber(ARGV[1])
if current ~= expected then
  -- A client retry of a commit whose reply was lost: it already landed, report success.
  if current == expected + 1 and fields[2] == ARGV[9] then return {1, current} end
  return {0, current}
end
local new = tostring(expected + 1)
redis.call('HSET', KEYS[1], 'v', new, 'blob', ARGV[2], 'turns', ARGV[3], 'absorbed', ARGV[4],
           'created', ARGV[5], 'updated', ARGV[6], 'token', ARGV[9])
redis.call('HSET', KEYS[2], new, ARGV[2])
local oldest_kept = expected + 2 - tonumber(ARGV[7])
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if tonumber(f) < oldest_kept then redis.call('HDEL', KEYS[2], f) end
end
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {1, expected + 1}
"""

# KEYS: idx, exp. ARGV: now, batch. Drops index entries whose TTL has passed.
_PRUNE_LUA = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #dead > 0 then
  redis.call('ZREM', KEYS[1], unpack(dead))
  redis.call('ZREM', KEYS[2], unpack(dead))
end
return #dead
"""
_PRUNE_BATCH = 500

# Errors that mean "Redis cannot serve right now" rather than "this request is wrong".
_UNAVAILABLE = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.ClusterDownError,
    rex.TryAgainError,
    OSError,
    TimeoutError,
)

_SUMMARY_FIELDS = ("v", "turns", "absorbed", "created", "updated")


class RedisStore(SessionStore):
    """Session store on one Redis server (keys are laid out to work on a cluster too)."""

    def __init__(
        self,
        url: str,
        ttl_seconds: int | None = None,
        keep_versions: int = 5,
        prefix: str = "dmem",
        socket_timeout: float = 2.0,
    ) -> None:
        super().__init__(keep_versions)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive or None")
        if re.fullmatch(r"[A-Za-z0-9._:-]+", prefix) is None:
            # Braces would break the hash tags, glob characters the SCAN in count().
            raise ValueError(f"invalid key prefix {prefix!r}: use [A-Za-z0-9._:-]")
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        parts = urlsplit(url)
        # Never echo credentials from the URL into error messages.
        self._where = f"{parts.hostname or parts.path}:{parts.port or 6379}"
        self._redis = aioredis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # One immediate retry re-dials a pooled connection that died with a restarted
            # server; more retries with back-off would only delay the 503 when Redis is down.
            # Timeouts are not retried: the command may have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,)),
            decode_responses=False,
        )
        self._commit_script = self._redis.register_script(_COMMIT_LUA)
        self._prune_script = self._redis.register_script(_PRUNE_LUA)

    # -- keys --------------------------------------------------------------------------------

    def _session_keys(self, tenant: str, session_id: str) -> tuple[str, str]:
        base = f"{self.prefix}:{{{tenant}/{session_id}}}"
        return f"{base}:cur", f"{base}:hist"

    def _index_keys(self, tenant: str) -> tuple[str, str]:
        return f"{self.prefix}:idx:{{{tenant}}}", f"{self.prefix}:exp:{{{tenant}}}"

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"Redis at {self._where} is unavailable: {type(exc).__name__}: {exc}"
            ) from exc
        except rex.RedisError as exc:
            raise StoreError(f"Redis at {self._where} failed: {type(exc).__name__}: {exc}") from exc

    # -- primitives --------------------------------------------------------------------------

    async def _read(self, tenant: str, session_id: str, version: int | None) -> bytes | None:
        cur, hist = self._session_keys(tenant, session_id)
        with self._translate():
            if version is not None:
                return await self._redis.hget(hist, str(version))
            if self.ttl_seconds is None:
                return await self._redis.hget(cur, "blob")
            _, exp = self._index_keys(tenant)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(cur, "blob")
            pipe.expire(cur, self.ttl_seconds)
            pipe.expire(hist, self.ttl_seconds)
            pipe.zadd(exp, {session_id: time.time() + self.ttl_seconds}, xx=True)
            blob, *_ = await pipe.execute()
            return blob

    async def _version(self, tenant: str, session_id: str) -> int:
        cur, _ = self._session_keys(tenant, session_id)
        with self._translate():
            value = await self._redis.hget(cur, "v")
        return int(value) if value is not None else 0

    async def _cas(self, record: SessionRecord, blob: bytes, expected_version: int) -> None:
        tenant, session_id = record.tenant, record.session_id
        cur, hist = self._session_keys(tenant, session_id)
        args = [
            expected_version,
            blob,
            record.turns,
            record.tokens_absorbed,
            repr(float(record.created_at)),
            repr(float(record.updated_at)),
            self.keep_versions,
            self.ttl_seconds or 0,
            uuid.uuid4().hex,
        ]
        with self._translate():
            ok, current = await self._commit_script(keys=[cur, hist], args=args)
        if not ok:
            raise VersionConflict(
                f"session {session_id!r} is at version {current}, not {expected_version}",
                current_version=int(current),
            )
        idx, exp = self._index_keys(tenant)
        try:
            with self._translate():
                pipe = self._redis.pipeline(transaction=False)
                pipe.zadd(idx, {session_id: 0})
                if self.ttl_seconds is not None:
                    pipe.zadd(exp, {session_id: time.time() + self.ttl_seconds})
                await pipe.execute()
        except StoreError as exc:
            # The commit itself landed; failing it now would make the caller retry into a 409.
            log.warning("session %s/%s committed but not indexed: %s", tenant, session_id, exc)

    async def _prune(self, tenant: str) -> None:
        if self.ttl_seconds is None:
            return
        idx, exp = self._index_keys(tenant)
        with self._translate():
            while True:
                removed = await self._prune_script(
                    keys=[idx, exp], args=[time.time(), _PRUNE_BATCH]
                )
                if removed < _PRUNE_BATCH:
                    return

    # -- public operations -------------------------------------------------------------------

    async def delete(self, tenant: str, session_id: str) -> bool:
        _check_ids(tenant, session_id)
        cur, hist = self._session_keys(tenant, session_id)
        idx, exp = self._index_keys(tenant)
        with self._translate():
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(cur)
            pipe.delete(hist)
            pipe.zrem(idx, session_id)
            pipe.zrem(exp, session_id)
            removed, *_ = await pipe.execute()
        return bool(removed)

    async def list(
        self, tenant: str, limit: int = 20, after: str | None = None
    ) -> tuple[list[SessionSummary], str | None]:
        _check_list_args(tenant, limit, after)
        await self._prune(tenant)
        idx, _ = self._index_keys(tenant)
        low = b"-" if after is None else b"(" + after.encode()
        with self._translate():
            members = await self._redis.zrangebylex(idx, low, b"+", start=0, num=limit + 1)
            page = [m.decode() for m in members[:limit]]
            pipe = self._redis.pipeline(transaction=False)
            for session_id in page:
                pipe.hmget(self._session_keys(tenant, session_id)[0], _SUMMARY_FIELDS)
            rows = await pipe.execute()
            summaries: list[SessionSummary] = []
            stale: list[str] = []
            for session_id, row in zip(page, rows, strict=True):
                if row[0] is None:
                    stale.append(session_id)
                    continue
                version, turns, absorbed, created, updated = row
                summaries.append(
                    SessionSummary(
                        session_id=session_id,
                        version=int(version),
                        turns=int(turns),
                        tokens_absorbed=int(absorbed),
                        created_at=float(created),
                        updated_at=float(updated),
                    )
                )
            if stale:
                await self._redis.zrem(idx, *stale)
        next_cursor = page[-1] if len(members) > limit else None
        return summaries, next_cursor

    async def versions(self, tenant: str, session_id: str) -> list[int]:
        _check_ids(tenant, session_id)
        _, hist = self._session_keys(tenant, session_id)
        with self._translate():
            fields = await self._redis.hkeys(hist)
        if not fields:
            raise SessionNotFound(f"session {session_id!r} not found")
        return sorted(int(f) for f in fields)

    async def count(self, tenant: str | None = None) -> int:
        if tenant is not None:
            validate_tenant(tenant)
            await self._prune(tenant)
            with self._translate():
                return int(await self._redis.zcard(self._index_keys(tenant)[0]))
        head = f"{self.prefix}:idx:{{"
        total = 0
        with self._translate():
            keys = [k.decode() async for k in self._redis.scan_iter(match=f"{head}*}}")]
        for key in keys:
            total += await self.count(key[len(head) : -1])
        return total

    async def ping(self) -> None:
        with self._translate():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    async def ttl(self, tenant: str, session_id: str) -> tuple[int, int]:
        """Remaining TTL in seconds of the session's current and history keys (-1: none,
        -2: missing); for operations and tests."""
        _check_ids(tenant, session_id)
        cur, hist = self._session_keys(tenant, session_id)
        with self._translate():
            return int(await self._redis.ttl(cur)), int(await self._redis.ttl(hist))
