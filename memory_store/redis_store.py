"""Session store on Redis.

Keys, with cluster hash tags so that all keys of one session share a slot (the scripts touch
only those)::

    {prefix}:{tenant/session}:cur    hash: v, turns, absorbed, created, updated, token
    {prefix}:{tenant/session}:hist   hash: "<n>"  -> head of kept version n (codec.encode_head)
                                           "l<n>" -> n's lineages as text, "1-40,43-45|40-45"
                                                     (content ranges | turn-log ranges)
                                           "t<n>" -> turn-log part of version n (the turn-log
                                                     entries n appended), while a kept
                                                     head's log lineage names it
                                           "s<n>" -> the state digests head n names,
                                                     "<hex>,<hex>" (none without a state)
    {prefix}:{tenant/session}:delta  list: one element per version, oldest first; the element
                                     of version n is at index n - v - 1 from the end (v the
                                     current version): n's delta (codec.encode_delta), or ""
                                     when n appended nothing (a rollback) or no kept head
                                     names it any more; versions no kept head needs are
                                     trimmed from the front
    {prefix}:{tenant/session}:states hash: "<digest>" -> a state (codec.encode_state_blob),
                                     stored once while some kept head names it
    {prefix}:idx:{tenant}            sorted set, all scores 0: session ids in lexical order
    {prefix}:exp:{tenant}            sorted set: session id -> expiry time (only with a TTL)
    {prefix}:tenants                 set: every tenant that has had a session, and "" once
                                     the set is known complete (see counting below)

``cur`` is the session's summary (what ``list`` shows) and its compare-and-set: ``v`` the
current version, ``token`` the current head's id (a random hex string per commit). The
current version's head is ``hist["<v>"]``.

A commit is one Lua script over ``cur``, ``hist``, ``delta`` and ``states``: compare ``v``
(and, for a commit that builds on stored deltas, ``token``: the head its record was read as
must still be current, and every state the new head names but the commit does not send must
be in ``states``, else the record is stored whole), write ``cur``, the new head, its lineage
text and state digests, push the new delta (or "") and set the new turn-log part and the
states sent; then drop the heads older than the last ``keep_versions`` versions and, of the
deltas and turn-log parts their lineages named, those no kept head names (LTRIM of the list's
front, "" in its middle, HDEL of "t<n>"), and the states no kept head names; then set the TTL
on all four keys. It sends the new head, delta and turn-log part and the states the base head
did not name, never the history. Loading a version is one Lua script too: read ``cur`` and
the head, LRANGE the lineage's ranges of ``delta``, HMGET the log lineage's ``t<n>`` and the
head's states, and return the deltas and the turn-log parts concatenated (each part says its
own length) and the states in the order of ``s<n>``.

Sessions written by the previous layouts load as they are: heads holding their states
inline (head format 1, no ``s<n>``, no ``states``), and before those whole records (``cur``
holding ``blob``, the whole current record; ``hist["<n>"]`` whole records, no ``l<n>``; no
``delta``). Their first commit stores the whole content and the states once (and removes
``blob``). (The other way round does not work: a server running the previous code cannot read
these heads, so do not serve one store with both.)

Every key of a session has the same TTL, set by each commit and refreshed by each load. A
version is no longer one self-contained blob: run Redis with ``maxmemory-policy noeviction``,
since any eviction policy may evict one key of a session and not the others, which leaves it
unreadable (detected: a CorruptRecord, never a wrong record).

'/' separates tenant and session because ids may contain ':' but never '/'.

A delete is one Lua script too: it removes ``cur``, ``hist``, ``delta`` and ``states`` at
once, so no reader (and no new session of that id) ever sees a session half gone; the index
entries go right after. A commit that creates a session (version 0) first deletes whatever
``hist``, ``delta`` and ``states`` hold (the leftovers of a gone session), so it starts clean.

The tenant index lives on another slot than the session, so a Lua script cannot update both
atomically on a cluster; it is updated right after the compare-and-set instead. That is safe
because the index only serves listing, counting and the per-tenant limit: the session's own
keys are the truth. An entry whose session is gone (expired, or a crash between the two
steps of a delete) is skipped and removed when listed; a session missing from the index
(crash right after its first commit) is added back by its next commit.

**Counting.** ``count(tenant)`` is one ZCARD of the tenant's index (after dropping expired
entries, with a TTL). ``count()`` of all tenants must not walk the keyspace (a SCAN is
O(keys), and it is what a metrics scrape calls): every commit also adds its tenant to
``{prefix}:tenants`` (in the same round trip as the index), and ``count()`` is one SMEMBERS
and one pipelined ZCARD (and, with a TTL, one prune script) per tenant: O(tenants), where
tenants are API keys, few next to sessions. A tenant stays in the set when its last session
goes (removing it would race with a commit of that tenant on another slot; an empty index
costs one ZCARD). Keys written before the set existed are found once: the first ``count()``
on a set without the "" member SCANs for the tenant indexes, adds them and "" (commits made
meanwhile add themselves), and no later one scans.

**Sessions per tenant.** With ``max_sessions_per_tenant``, a commit that creates a session
first reads the tenant's index size (ZCARD, after pruning expired entries) and whether the
session exists, and refuses with TooManySessions at the limit. The check and the commit are
on different slots, so it is not atomic: commits racing to create sessions of one tenant
can overshoot the limit by as many as race. That bounds abuse, which is its purpose; the
SQLite store, with one write lock, holds it exactly.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .base import (
    CommitPlan,
    Fetched,
    SessionStore,
    StaleBase,
    _check_ids,
    _check_list_args,
)
from .codec import split_parts
from .errors import (
    CorruptRecord,
    SessionNotFound,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)
from .record import SessionSummary, validate_tenant

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

_LUA_LINEAGE = """
local function ranges(s)
  local r = {}
  for a, b in string.gmatch(s, '(%d+)-(%d+)') do r[#r + 1] = {tonumber(a), tonumber(b)} end
  return r
end
-- "1-40,43-45|40-45" -> content ranges, turn-log ranges
local function lineages(text)
  local bar = string.find(text or '', '|', 1, true)
  if not bar then return {}, {} end
  return ranges(string.sub(text, 1, bar - 1)), ranges(string.sub(text, bar + 1))
end
"""

# KEYS: cur, hist, delta, states. ARGV: expected, head, lineage text, delta, turn-log part,
# turns, absorbed, created, updated, keep, ttl, token, base token ("" = builds on nothing
# stored), the head's state digests ("<hex>,<hex>"), then a digest and a blob for each state
# sent. Returns {1, new_version}, {0, current_version} (conflict) or {2, current_version}
# (the current head is not the base token's, or a state the head names and the commit does
# not send is not stored: the caller stores the whole content and every state instead).
_COMMIT_LUA = _LUA_LINEAGE + """
-- The parts of ranges `cands` that no range of `keeps` covers.
local function subtract(cands, keeps)
  table.sort(keeps, function(x, y) return x[1] < y[1] end)
  local out = {}
  for _, c in ipairs(cands) do
    local lo, hi = c[1], c[2]
    for _, k in ipairs(keeps) do
      if k[2] >= lo and k[1] <= hi then
        if k[1] > lo then out[#out + 1] = {lo, k[1] - 1} end
        if k[2] + 1 > lo then lo = k[2] + 1 end
        if lo > hi then break end
      end
    end
    if lo <= hi then out[#out + 1] = {lo, hi} end
  end
  return out
end

local fields = redis.call('HMGET', KEYS[1], 'v', 'token')
local current = tonumber(fields[1]) or 0
local expected = tonumber(ARGV[1])
if current ~= expected then
  -- A client retry of a commit whose reply was lost: it already landed, report success.
  if current == expected + 1 and fields[2] == ARGV[12] then return {1, current} end
  return {0, current}
end
if ARGV[13] ~= '' and fields[2] ~= ARGV[13] then return {2, current} end
if not string.find(ARGV[3], '|', 1, true) then return redis.error_reply('bad lineage') end
if #ARGV % 2 ~= 0 then return redis.error_reply('bad state arguments') end
-- A state the head names and the commit does not send must be stored (it is while the base
-- head is current; checked, so that no head ever names a missing state). Before any write.
local sent = {}
for i = 15, #ARGV, 2 do sent[ARGV[i]] = true end
for d in string.gmatch(ARGV[14], '[^,]+') do
  if not sent[d] and (current == 0 or redis.call('HEXISTS', KEYS[4], d) == 0) then
    return {2, current}
  end
end
local new = expected + 1
if current == 0 then
  -- Nothing may be left of a session that is gone (a crashed delete, an old writer).
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
end
redis.call('HSET', KEYS[1], 'v', new, 'turns', ARGV[6], 'absorbed', ARGV[7],
           'created', ARGV[8], 'updated', ARGV[9], 'token', ARGV[12])
redis.call('HDEL', KEYS[1], 'blob')
redis.call('HSET', KEYS[2], tostring(new), ARGV[2], 'l' .. new, ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 't' .. new, ARGV[5]) end
if ARGV[14] ~= '' then redis.call('HSET', KEYS[2], 's' .. new, ARGV[14]) end
if #ARGV > 14 then redis.call('HSET', KEYS[4], unpack(ARGV, 15)) end
redis.call('RPUSH', KEYS[3], ARGV[4])

local oldest_kept = new + 1 - tonumber(ARGV[10])
local dropped = {}
local kept = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  local n = tonumber(f)
  if n and string.match(f, '^%d+$') then
    if n < oldest_kept then dropped[#dropped + 1] = f else kept[#kept + 1] = f end
  end
end
if #dropped > 0 then
  local gone_d, gone_t, keep_d, keep_t = {}, {}, {}, {}
  for _, f in ipairs(dropped) do
    local d, t = lineages(redis.call('HGET', KEYS[2], 'l' .. f))
    for _, r in ipairs(d) do gone_d[#gone_d + 1] = r end
    for _, r in ipairs(t) do gone_t[#gone_t + 1] = r end
    redis.call('HDEL', KEYS[2], f, 'l' .. f, 's' .. f)
  end
  local first = new + 1
  for _, f in ipairs(kept) do
    local d, t = lineages(redis.call('HGET', KEYS[2], 'l' .. f))
    for _, r in ipairs(d) do
      keep_d[#keep_d + 1] = r
      if r[1] < first then first = r[1] end
    end
    for _, r in ipairs(t) do keep_t[#keep_t + 1] = r end
  end
  -- Deltas: cut the front no kept head needs, blank the holes left by abandoned branches.
  local have = new - redis.call('LLEN', KEYS[3]) + 1
  if first > new then
    redis.call('DEL', KEYS[3])
  elseif first > have then
    redis.call('LTRIM', KEYS[3], first - new - 1, -1)
    have = first
  end
  if first <= new then
    for _, r in ipairs(subtract(gone_d, keep_d)) do
      local lo = r[1]
      if lo < have then lo = have end
      for x = lo, r[2] do redis.call('LSET', KEYS[3], x - new - 1, '') end
    end
  end
  for _, r in ipairs(subtract(gone_t, keep_t)) do
    for x = r[1], r[2] do redis.call('HDEL', KEYS[2], 't' .. x) end
  end
  -- States: keep those a kept head names (a few per head), drop the rest.
  local live = {}
  for _, f in ipairs(kept) do
    local refs = redis.call('HGET', KEYS[2], 's' .. f)
    if refs then
      for d in string.gmatch(refs, '[^,]+') do live[d] = true end
    end
  end
  local dead = {}
  for _, d in ipairs(redis.call('HKEYS', KEYS[4])) do
    if not live[d] then dead[#dead + 1] = d end
  end
  if #dead > 0 then redis.call('HDEL', KEYS[4], unpack(dead)) end
end
local ttl = tonumber(ARGV[11])
if ttl > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return {1, new}
"""

# KEYS: cur, hist, delta, states. ARGV: version ("" = current), ttl (0 = leave the TTL
# alone). Returns {} when the session does not exist, else {current version, token, created,
# data, deltas, turn-log parts, state digests, states}: data is false when the version is not
# kept; the deltas its lineage names and the turn-log parts its log lineage names come
# concatenated (each says its own length), one bulk reply each rather than one per part; the
# states its head names ("<hex>,<hex>", "" for none) come as a list in that order (nil where
# missing).
_LOAD_LUA = _LUA_LINEAGE + """
local c = redis.call('HMGET', KEYS[1], 'v', 'token', 'created', 'blob')
if not c[1] then return {} end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
local ver = ARGV[1]
if ver == '' then
  if c[4] then return {c[1], c[2] or '', c[3], c[4], '', '', '', {}} end  -- whole records
  ver = c[1]
end
local h = redis.call('HMGET', KEYS[2], ver, 'l' .. ver, 's' .. ver)
if not h[1] or not h[2] then return {c[1], c[2] or '', c[3], h[1], '', '', '', {}} end
local refs = h[3] or ''
local digests = {}
for d in string.gmatch(refs, '[^,]+') do digests[#digests + 1] = d end
local states = {}
if #digests > 0 then states = redis.call('HMGET', KEYS[4], unpack(digests)) end
local cv = tonumber(c[1])
local d, t = lineages(h[2])
local deltas = {}
for _, r in ipairs(d) do
  for _, item in ipairs(redis.call('LRANGE', KEYS[3], r[1] - cv - 1, r[2] - cv - 1)) do
    deltas[#deltas + 1] = item
  end
end
local turns = {}
local fields = {}
local function fetch()
  for _, item in ipairs(redis.call('HMGET', KEYS[2], unpack(fields))) do
    turns[#turns + 1] = item or ''
  end
  fields = {}
end
for _, r in ipairs(t) do
  for x = r[1], r[2] do
    fields[#fields + 1] = 't' .. x
    if #fields == 1000 then fetch() end
  end
end
if #fields > 0 then fetch() end
return {c[1], c[2] or '', c[3], h[1], table.concat(deltas), table.concat(turns), refs, states}
"""

# KEYS: cur, hist, delta, states. Removes every key of the session in one step; 1 if it
# existed.
_DELETE_LUA = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return existed
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

# The member of the tenant set that says it holds every tenant (no valid tenant id is empty).
_TENANTS_COMPLETE = b""


class RedisStore(SessionStore):
    """Session store on one Redis server (keys are laid out to work on a cluster too)."""

    def __init__(
        self,
        url: str,
        ttl_seconds: int | None = None,
        keep_versions: int = 5,
        prefix: str = "dmem",
        socket_timeout: float = 2.0,
        *,
        max_sessions_per_tenant: int | None = None,
    ) -> None:
        super().__init__(keep_versions, ttl_seconds=ttl_seconds,
                         max_sessions_per_tenant=max_sessions_per_tenant)
        if re.fullmatch(r"[A-Za-z0-9._:-]+", prefix) is None:
            # Braces would break the hash tags, glob characters the SCAN in count().
            raise ValueError(f"invalid key prefix {prefix!r}: use [A-Za-z0-9._:-]")
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
        self._load_script = self._redis.register_script(_LOAD_LUA)
        self._prune_script = self._redis.register_script(_PRUNE_LUA)
        self._delete_script = self._redis.register_script(_DELETE_LUA)

    # -- keys --------------------------------------------------------------------------------

    def _session_keys(self, tenant: str, session_id: str) -> tuple[str, str, str, str]:
        """``cur``, ``hist``, ``delta`` and ``states``: every key of one session."""
        base = f"{self.prefix}:{{{tenant}/{session_id}}}"
        return f"{base}:cur", f"{base}:hist", f"{base}:delta", f"{base}:states"

    def _index_keys(self, tenant: str) -> tuple[str, str]:
        return f"{self.prefix}:idx:{{{tenant}}}", f"{self.prefix}:exp:{{{tenant}}}"

    @property
    def _tenants_key(self) -> str:
        return f"{self.prefix}:tenants"

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

    async def _fetch(self, tenant: str, session_id: str, version: int | None) -> Fetched | None:
        keys = self._session_keys(tenant, session_id)
        args = ["" if version is None else str(version), self.ttl_seconds or 0]
        with self._translate():
            if self.ttl_seconds is None:
                reply = await self._load_script(keys=list(keys), args=args)
            else:
                # The expiry index sits on another slot: refresh it in the same round trip.
                _, exp = self._index_keys(tenant)
                reply = await self._eval_with(
                    self._load_script,
                    keys,
                    args,
                    lambda pipe: pipe.zadd(
                        exp, {session_id: time.time() + self.ttl_seconds}, xx=True
                    ),
                )
        if not reply:
            return None
        current, token, created, data, deltas, turns, refs, states = reply
        digests = refs.decode().split(",") if refs else []
        if len(digests) != len(states):
            raise CorruptRecord(f"session {tenant}/{session_id}: {len(digests)} state digests, "
                                f"{len(states)} states read")
        return Fetched(
            current_version=int(current),
            token=token.decode() if token else "",
            created_at=float(created) if created is not None else 0.0,
            data=data,
            # A missing part shows as a short list (the assembly then refuses the record).
            deltas=split_parts(deltas),
            turns=list(split_parts(turns)),
            states=dict(zip(digests, states, strict=True)),
        )

    async def _eval_with(self, script: Any, keys: tuple[str, ...], args: list[Any],
                         also: Any) -> Any:
        """Run ``script`` and the commands ``also`` queues in one pipelined round trip
        (loading the script first if the server does not have it)."""
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            also(pipe)
            results = await pipe.execute(raise_on_error=False)
            if isinstance(results[0], rex.NoScriptError) and attempt == 0:
                await self._redis.script_load(script.script)
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results[0]
        raise AssertionError("unreachable")

    async def _version(self, tenant: str, session_id: str) -> int:
        cur = self._session_keys(tenant, session_id)[0]
        with self._translate():
            value = await self._redis.hget(cur, "v")
        return int(value) if value is not None else 0

    def _commit_args(self, plan: CommitPlan, expected_version: int) -> list[Any]:
        record = plan.record
        return [
            expected_version,
            plan.head,
            plan.lineage_text,
            plan.delta,
            plan.turns,
            record.turns,
            record.tokens_absorbed,
            repr(float(record.created_at)),
            repr(float(record.updated_at)),
            self.keep_versions,
            self.ttl_seconds or 0,
            plan.token,
            plan.base_token,
            plan.state_refs_text,
            *(item for digest, blob in plan.states.items() for item in (digest, blob)),
        ]

    async def _write(self, plan: CommitPlan, expected_version: int) -> None:
        record = plan.record
        tenant, session_id = record.tenant, record.session_id
        keys = self._session_keys(tenant, session_id)
        if expected_version == 0 and self.max_sessions_per_tenant is not None:
            await self._check_room(tenant, session_id)
        with self._translate():
            status, current = await self._commit_script(
                keys=list(keys), args=self._commit_args(plan, expected_version)
            )
        if status == 0:
            raise VersionConflict(
                f"session {session_id!r} is at version {current}, not {expected_version}",
                current_version=int(current),
            )
        if status == 2:
            raise StaleBase(f"session {session_id!r} has another head at version {current}")
        idx, exp = self._index_keys(tenant)
        try:
            with self._translate():
                pipe = self._redis.pipeline(transaction=False)
                pipe.zadd(idx, {session_id: 0})
                pipe.sadd(self._tenants_key, tenant)
                if self.ttl_seconds is not None:
                    pipe.zadd(exp, {session_id: time.time() + self.ttl_seconds})
                await pipe.execute()
        except StoreError as exc:
            # The commit itself landed; failing it now would make the caller retry into a 409.
            log.warning("session %s/%s committed but not indexed: %s", tenant, session_id, exc)

    async def _check_room(self, tenant: str, session_id: str) -> None:
        """TooManySessions if creating ``session_id`` would pass the tenant's limit. Not
        atomic with the commit (another slot): racing creations may overshoot it."""
        limit = self.max_sessions_per_tenant
        assert limit is not None
        await self._prune(tenant)
        idx, _ = self._index_keys(tenant)
        with self._translate():
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcard(idx)
            pipe.zscore(idx, session_id)
            pipe.exists(self._session_keys(tenant, session_id)[0])
            have, listed, exists = await pipe.execute()
        if exists:
            return  # not a new session: the commit answers (a conflict, or a replay)
        if listed is not None:
            have -= 1  # a stale entry of this very id: the new session takes its place
        if have >= limit:
            raise self._too_many(tenant, int(have))

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
        keys = self._session_keys(tenant, session_id)
        idx, exp = self._index_keys(tenant)
        with self._translate():
            existed = await self._delete_script(keys=list(keys))
        try:
            with self._translate():
                pipe = self._redis.pipeline(transaction=False)
                pipe.zrem(idx, session_id)
                pipe.zrem(exp, session_id)
                await pipe.execute()
        except StoreError as exc:
            # The session is gone; its stale index entry is dropped when listed.
            log.warning("session %s/%s deleted but still indexed: %s", tenant, session_id, exc)
        return bool(existed)

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
        cur, hist, _, _ = self._session_keys(tenant, session_id)
        with self._translate():
            # One transaction (one slot): a ``hist`` without ``cur`` is what a gone session
            # left behind, not versions of this one.
            pipe = self._redis.pipeline(transaction=True)
            pipe.exists(cur)
            pipe.hkeys(hist)
            exists, fields = await pipe.execute()
        kept = sorted(int(f) for f in fields if f.isdigit())
        if not exists or not kept:
            raise SessionNotFound(f"session {session_id!r} not found")
        return kept

    async def count(self, tenant: str | None = None) -> int:
        if tenant is not None:
            validate_tenant(tenant)
            await self._prune(tenant)
            with self._translate():
                return int(await self._redis.zcard(self._index_keys(tenant)[0]))
        tenants = await self._tenants()
        now = time.time()
        with self._translate():
            pipe = self._redis.pipeline(transaction=False)
            for tenant_id in tenants:
                idx, exp = self._index_keys(tenant_id)
                if self.ttl_seconds is not None:
                    await self._prune_script(keys=[idx, exp], args=[now, _PRUNE_BATCH],
                                             client=pipe)
                pipe.zcard(idx)
            results = await pipe.execute()
        if self.ttl_seconds is None:
            return sum(int(n) for n in results)
        total = 0
        for tenant_id, pruned, n in zip(tenants, results[::2], results[1::2], strict=True):
            if pruned == _PRUNE_BATCH:  # more expired entries than one batch: finish them
                n = await self.count(tenant_id)
            total += int(n)
        return total

    async def _tenants(self) -> list[str]:
        """Every tenant that has had a session (see the module docstring)."""
        with self._translate():
            members = await self._redis.smembers(self._tenants_key)
            if _TENANTS_COMPLETE not in members:
                # Keys written before the set existed: find their tenants once.
                head = f"{self.prefix}:idx:{{".encode()
                found = [key[len(head) : -1] async for key in
                         self._redis.scan_iter(match=head + b"*}")]
                await self._redis.sadd(self._tenants_key, _TENANTS_COMPLETE, *found)
                members = {*members, *found}
        return sorted(m.decode() for m in members if m != _TENANTS_COMPLETE)

    async def ping(self) -> None:
        with self._translate():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    async def ttl(self, tenant: str, session_id: str) -> tuple[int, int]:
        """Remaining TTL in seconds of the session's current key and of its history (the
        least over ``hist``, ``delta`` and ``states``, of those present); -1: none, -2:
        missing. For operations and tests; :meth:`key_ttls` has every key's."""
        ttls = await self.key_ttls(tenant, session_id)
        cur, *others = ttls.values()
        present = [t for t in others if t != -2]
        return cur, (min(present) if present else -2)

    async def key_ttls(self, tenant: str, session_id: str) -> dict[str, int]:
        """Remaining TTL in seconds of each key of the session (-1: none, -2: missing)."""
        _check_ids(tenant, session_id)
        keys = self._session_keys(tenant, session_id)
        with self._translate():
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.ttl(key)
            values = await pipe.execute()
        return {key: int(value) for key, value in zip(keys, values, strict=True)}
