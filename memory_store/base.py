"""The session store interface and the operations every backend shares.

How a session is stored (both backends): every version has a **head** and most versions a
**delta**.

* The head holds what a version *is* apart from its append-only content: scalars, identity,
  the digests of its states (``state`` and ``extra_states``), the small meta (every meta key
  but the append-only lists), the content's lengths, and the version's **lineage**: the
  versions whose deltas, in order, make its content, as inclusive ranges
  (``((1, 40), (43, 45))``). It also has a **log lineage**: the versions whose turn-log parts
  hold its visible turn log.
* Each state tensor is stored once per session, addressed by its digest
  (``codec.state_digest``), while some kept head names it. The server's epoch state stays the
  same for a whole epoch and its block snapshot for the turns that pass no KV-block boundary:
  stored once, not once a turn and once a kept version.
* The delta of version ``n`` holds what ``n`` appended to its parent: tokens, messages and
  ``meta["boundaries"]`` entries. Its **turn-log part** holds the ``meta["turn_log"]``
  entries it appended. A delta is kept while some kept head's lineage names it; a turn-log
  part while some kept head's log lineage does (the server shows the last 64 entries, so the
  parts of older turns go once every kept version has moved past them).

A commit sends the new head and the new delta and turn-log part only, and of the states
those its base head did not name: its cost follows the turn, not the conversation. Loading a
version reads its head, the deltas and parts its lineages name and the states it names in one
round trip, and assembles an ordinary :class:`SessionRecord`.

A record remembers what is stored of it (``SessionRecord.stored``, set by load and commit).
If it was loaded as the version a commit expects, the commit's delta is what the record holds
beyond that version (checked to extend it), and the states that version's head named are
not sent again (the store checks that it holds them); otherwise, or if the record does not
extend it, the commit stores the record's whole content as one delta with a lineage of the
new version alone, and all its states. Sessions stored by earlier layouts (one record blob per
version; heads holding their states inline) still load; their first commit stores the whole
content and the states once.

Encoding and decoding a record is CPU work in the calling thread: for records above
``OFFLOAD_BYTES`` (a long conversation, a large state) the async operations run it on a
worker thread (``asyncio.to_thread``), so that one session's load or export does not stall
every other request on the event loop; small ones stay inline, where a thread hop would cost
more than the work.

Options every backend shares: ``keep_versions``; ``ttl_seconds`` (a session idle that long,
i.e. not committed, or on Redis also not loaded, is gone); ``max_sessions_per_tenant`` (a
commit that would create a session beyond it raises TooManySessions).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch

from .codec import (
    CONTENT_LISTS,
    MAGIC,
    WINDOW_LIST,
    StateRefs,
    decode_delta,
    decode_head,
    decode_record,
    decode_state_blob,
    decode_turns,
    delta_tokens,
    encode_delta,
    encode_head,
    encode_record,
    encode_states_by_ref,
    encode_turns,
    parse_delta_json,
    parse_turns_json,
    validate_record,
)
from .errors import CorruptRecord, SessionNotFound, TooManySessions
from .record import (
    Lineage,
    SessionRecord,
    SessionSummary,
    StateIdentity,
    StoredBase,
    validate_session_id,
    validate_tenant,
)

__all__ = ["SessionStore"]

log = logging.getLogger(__name__)

MAX_LIST_LIMIT = 1000

# Records above this many bytes are encoded and decoded on a worker thread (see above).
OFFLOAD_BYTES = 64 * 1024

T = TypeVar("T")


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``: on a worker thread when ``size`` (the bytes it codes) is large."""
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def record_size(record: SessionRecord) -> int:
    """About how many bytes coding ``record`` touches (transcript, states, message text)."""
    size = 4 * len(record.transcript)
    for t in (record.state, *record.extra_states.values()):
        if t is not None:
            size += 4 * t.numel()
    if size > OFFLOAD_BYTES:
        return size
    return size + sum(len(str(m.get("content", ""))) if isinstance(m, dict) else 0
                      for m in record.messages)


@dataclass
class Fetched:
    """One consistent read of a session, as a backend hands it to the shared code."""

    current_version: int
    token: str  # the current head's id ("" for a session stored by the previous layout)
    created_at: float  # the current version's
    data: bytes | None  # head (or whole legacy record) of the version asked for; None: not kept
    deltas: list[bytes]  # the deltas its lineage names, in order, as found
    turns: list[bytes | None]  # the turn-log parts its log lineage names, in order, as found
    # The states the store lists for that head: digest -> blob (None: listed, not found).
    states: dict[str, bytes | None]


@dataclass
class CommitPlan:
    """What a commit writes; backends store it with one compare-and-set."""

    record: SessionRecord  # as stored: version and updated_at set
    head: bytes
    lineage: Lineage
    log_lineage: Lineage
    delta: bytes  # b"" when the version appended no content
    turns: bytes  # b"" when it appended no turn-log entry
    token: str  # the new head's id
    # The current head's id this commit builds on (its lineage names deltas stored under it,
    # and it names the states not sent); "" when the commit stores the whole content and all
    # its states, and needs nothing stored before.
    base_token: str
    new_base: StoredBase
    # Every state digest the new head names (distinct, sorted), and the blobs of those the
    # store may not hold yet (the rest the base head names: the store checks it has them).
    state_refs: tuple[str, ...]
    states: dict[str, bytes]

    @property
    def lineage_text(self) -> str:
        """Both lineages as ``"1-40,43-45|40-45"`` (what the Redis scripts read)."""
        return lineage_text(self.lineage) + "|" + lineage_text(self.log_lineage)

    @property
    def state_refs_text(self) -> str:
        """The state digests as ``"<hex>,<hex>"`` (what the Redis scripts read)."""
        return ",".join(self.state_refs)

    @property
    def size(self) -> int:
        """The bytes of blobs this commit sends: head, delta, turn-log part, new states."""
        return (len(self.head) + len(self.delta) + len(self.turns)
                + sum(len(b) for b in self.states.values()))


class StaleBase(Exception):
    """The version matches but the current head is not the one the commit builds on (the
    session was deleted and made again, or the record comes from another store)."""


class SessionStore(ABC):
    """Persistent, versioned per-conversation records.

    Every write goes through :meth:`commit`, an atomic compare-and-set on the session's
    version, so a turn that started from version ``n`` lands only if nobody else committed
    since. Backends implement the raw primitives (``_fetch``, ``_version``, ``_write``) and the
    listing/maintenance methods; load, commit, rollback, fork, export and import are built on
    top here.
    """

    def __init__(
        self,
        keep_versions: int = 5,
        *,
        ttl_seconds: int | None = None,
        max_sessions_per_tenant: int | None = None,
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive or None")
        if max_sessions_per_tenant is not None and max_sessions_per_tenant < 0:
            raise ValueError("max_sessions_per_tenant must be >= 0 (0 or None: no limit)")
        self.keep_versions = keep_versions
        self.ttl_seconds = ttl_seconds
        # 0 means no limit, as the server's setting of the same name.
        self.max_sessions_per_tenant = max_sessions_per_tenant or None

    # -- backend primitives ------------------------------------------------------------------

    @abstractmethod
    async def _fetch(self, tenant: str, session_id: str, version: int | None) -> Fetched | None:
        """Read the current version (``version`` None) or a kept one, with what its lineages
        name, in one consistent read; None when the session does not exist."""

    @abstractmethod
    async def _version(self, tenant: str, session_id: str) -> int:
        """Current version, 0 when the session does not exist."""

    @abstractmethod
    async def _write(self, plan: CommitPlan, expected_version: int) -> None:
        """Store ``plan`` as version ``plan.record.version`` iff the current version is
        ``expected_version`` (VersionConflict otherwise) and, when ``plan.base_token`` is set,
        the current head's id is that (StaleBase otherwise), and every digest of
        ``plan.state_refs`` that ``plan.states`` does not carry is stored for the session
        (StaleBase otherwise); then drop the heads beyond ``keep_versions`` and the deltas,
        turn-log parts and states no kept head names.

        With ``expected_version`` 0 (a new session) it starts clean: nothing left of an
        earlier session of that id may show in the new one; and it raises TooManySessions
        (see :meth:`_too_many`) when the tenant has ``max_sessions_per_tenant`` sessions."""

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

    def _too_many(self, tenant: str, have: int) -> TooManySessions:
        limit = self.max_sessions_per_tenant
        assert limit is not None
        return TooManySessions(
            f"tenant {tenant!r} has {have} sessions, the limit (max_sessions_per_tenant="
            f"{limit}): delete sessions it no longer needs to make room, or raise the limit",
            limit=limit,
        )

    # -- shared operations -------------------------------------------------------------------

    async def load(
        self,
        tenant: str,
        session_id: str,
        expected_identity: StateIdentity | None = None,
        version: int | None = None,
    ) -> SessionRecord:
        """The current version, or kept version ``version`` (SessionNotFound if it is not
        kept)."""
        _check_ids(tenant, session_id)
        fetched = await self._fetch(tenant, session_id, version)
        if fetched is None:
            raise SessionNotFound(f"session {session_id!r} not found")
        if version is not None and (fetched.data is None or version > fetched.current_version):
            raise SessionNotFound(f"version {version} of session {session_id!r} is not kept")
        if fetched.data is None:
            raise CorruptRecord(
                f"session {tenant}/{session_id} is at version {fetched.current_version}, "
                "whose head is missing"
            )
        return await off_loop(fetched_size(fetched), assemble, fetched, tenant, session_id,
                              expected_identity)

    async def commit(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """Store ``record`` as version ``expected_version + 1``.

        ``record.version`` is ignored: ``expected_version`` (0 = must not exist yet) is what
        the compare-and-set checks. Returns a new record with the stored version and
        ``updated_at``; it shares the state tensor and lists with ``record``.

        The transcript, ``messages``, ``meta["boundaries"]`` and ``meta["turn_log"]`` are
        append-only: a turn adds to their end (the turn log may also drop entries at its
        front). When ``record`` was loaded (or returned by a commit) as version
        ``expected_version`` of this session, only what it appended since is sent. The store
        checks that claim against its own copy of that version (every list's stored prefix,
        compared by value): a record that does not extend it is not refused but stored whole
        (its entire content as one delta), so a commit never stores a wrong record, it only
        costs more. A record from anywhere else (new, imported, forked, from another store or
        from before the session was deleted) is stored whole too.

        Raises VersionConflict (another version is current), TooManySessions (a new session
        beyond ``max_sessions_per_tenant``), ValueError (a record that breaks its own
        invariants).
        """
        _check_ids(record.tenant, record.session_id)
        if expected_version < 0:
            raise ValueError("expected_version must be >= 0")
        stored = dataclasses.replace(
            record, version=expected_version + 1, updated_at=time.time(), stored=None
        )
        base = record.stored
        if base is not None and (
            base.tenant != record.tenant
            or base.session_id != record.session_id
            or base.version != expected_version
        ):
            base = None
        return await self._commit_on(stored, expected_version, base)

    async def _commit_on(
        self,
        stored: SessionRecord,
        expected_version: int,
        base: StoredBase | None,
    ) -> SessionRecord:
        """Commit ``stored`` building on ``base`` (whose deltas are stored while the head
        ``base.token`` is current); store it whole if that head is gone."""
        size = record_size(stored)
        plan = await off_loop(size, plan_commit, stored, base)
        if base is not None and not plan.base_token:
            log.info("session %s/%s: the record does not extend version %d, stored whole",
                     stored.tenant, stored.session_id, base.version)
        try:
            await self._write(plan, expected_version)
        except StaleBase:
            log.info("session %s/%s: version %d is not the head the record was read from, "
                     "stored whole", stored.tenant, stored.session_id, expected_version)
            plan = await off_loop(size, plan_commit, stored, None)
            await self._write(plan, expected_version)
        stored.stored = plan.new_base
        return stored

    async def rollback(self, tenant: str, session_id: str, to_version: int) -> SessionRecord:
        """Make kept version ``to_version`` current again, as a new version.

        The new version's head is ``to_version``'s (same lineage: nothing is copied); the
        versions after ``to_version`` stay kept, and can be rolled back to in turn.
        Raises VersionConflict if another commit lands in between.
        """
        _check_ids(tenant, session_id)
        fetched = await self._fetch(tenant, session_id, to_version)
        if fetched is None:
            raise SessionNotFound(f"session {session_id!r} not found")
        if fetched.data is None:
            raise SessionNotFound(f"version {to_version} of session {session_id!r} is not kept")
        old = await off_loop(fetched_size(fetched), assemble, fetched, tenant, session_id, None)
        current = fetched.current_version
        new = dataclasses.replace(
            old,
            created_at=fetched.created_at,
            version=current + 1,
            updated_at=time.time(),
            stored=None,
        )
        # old.stored holds the token of the head that was current when to_version was read:
        # to_version's deltas are stored while that head is still current.
        return await self._commit_on(new, current, old.stored)

    async def fork(
        self, tenant: str, session_id: str, new_session_id: str, version: int | None = None
    ) -> SessionRecord:
        """Copy a session's current content (or kept version ``version``'s) to a new session
        (version 1); TooManySessions at the tenant's limit."""
        validate_session_id(new_session_id)
        source = await self.load(tenant, session_id, version=version)
        now = time.time()
        clone = dataclasses.replace(
            source, session_id=new_session_id, version=0, created_at=now, updated_at=now
        )
        return await self.commit(clone, 0)

    async def export(self, tenant: str, session_id: str) -> bytes:
        """The current record as one verified blob (:func:`encode_record`, the format
        :meth:`import_` reads anywhere)."""
        record = await self.load(tenant, session_id)
        return await off_loop(record_size(record), encode_record, record)

    async def import_(
        self,
        tenant: str,
        session_id: str,
        data: bytes,
        expected_identity: StateIdentity | None = None,
        overwrite: bool = False,
        *,
        vocab_size: int | None = None,
    ) -> SessionRecord:
        """Store exported bytes under ``tenant``/``session_id``.

        The bytes come from outside: beyond the checksum and ``expected_identity``, the
        record must hold what the server relies on (:func:`validate_record`; token ids below
        ``vocab_size`` when given), else CorruptRecord. Without ``overwrite`` the session
        must not exist (VersionConflict otherwise); with it the import becomes the existing
        session's next version.
        """
        _check_ids(tenant, session_id)
        record = await off_loop(len(data), _decode_import, data, expected_identity, vocab_size)
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


def _decode_import(
    data: bytes, expected_identity: StateIdentity | None, vocab_size: int | None
) -> SessionRecord:
    record = decode_record(data, expected_identity)
    validate_record(record, vocab_size=vocab_size)
    return record


def fetched_size(fetched: Fetched) -> int:
    return (len(fetched.data or b"") + sum(len(d) for d in fetched.deltas)
            + sum(len(t or b"") for t in fetched.turns)
            + sum(len(s or b"") for s in fetched.states.values()))


def _decode(
    data: bytes, tenant: str, session_id: str, expected_identity: StateIdentity | None
) -> SessionRecord:
    record = decode_record(data, expected_identity)
    _check_owner(record, tenant, session_id)
    return record


def _check_owner(record: SessionRecord, tenant: str, session_id: str) -> None:
    # Guards against a backend handing back another session's bytes (key mix-up, bad restore).
    if record.tenant != tenant or record.session_id != session_id:
        raise CorruptRecord(
            f"record stored as {tenant}/{session_id} belongs to {record.tenant}/{record.session_id}"
        )


# -- lineages --------------------------------------------------------------------------------


def lineage_versions(lineage: Lineage) -> Iterator[int]:
    for lo, hi in lineage:
        yield from range(lo, hi + 1)


def lineage_text(lineage: Lineage) -> str:
    return ",".join(f"{lo}-{hi}" for lo, hi in lineage)


def _runs(versions: Iterator[int] | tuple[int, ...]) -> Lineage:
    """Increasing versions (repeats allowed) as ranges of consecutive numbers."""
    out: list[tuple[int, int]] = []
    for v in versions:
        if out and out[-1][1] >= v:
            continue
        if out and out[-1][1] == v - 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return tuple(out)


def subtract(ranges: list[tuple[int, int]], keep: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` that no range of ``keep`` covers (ranges inclusive)."""
    keep = sorted(keep)
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for klo, khi in keep:
            if khi < lo or klo > hi:
                continue
            if klo > lo:
                out.append((lo, klo - 1))
            lo = max(lo, khi + 1)
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


# -- meta ------------------------------------------------------------------------------------


def split_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int], dict[str, list]]:
    """The small meta (for the head), the append-only lists' positions, and the lists."""
    small: dict[str, Any] = {}
    positions: dict[str, int] = {}
    lists: dict[str, list] = {}
    for i, (key, value) in enumerate(meta.items()):
        if key in (*CONTENT_LISTS, WINDOW_LIST) and isinstance(value, list):
            positions[key] = i
            lists[key] = value
        else:
            small[key] = value
    return small, positions, lists


def join_meta(
    small: dict[str, Any], positions: dict[str, int], lists: dict[str, list]
) -> dict[str, Any]:
    items = list(small.items())
    for key, pos in sorted(positions.items(), key=lambda kv: kv[1]):
        items.insert(pos, (key, lists[key]))
    return dict(items)


# -- commit planning -------------------------------------------------------------------------


def _window_match(base: list[Any], new: list[Any]) -> int | None:
    """How many entries ``new`` appended to the window ``base``: the least ``k`` such that
    ``new`` is the last ``len(new)`` entries of ``base`` followed by ``new``'s last ``k``."""
    n = len(new)
    for k in range(n + 1):
        m = n - k
        if m <= len(base) and base[len(base) - m :] == new[:m]:
            return k
    return None  # unreachable: k = n always matches


@dataclass
class _Appended:
    tokens: list[int]
    messages: list[Any]
    lists: dict[str, list[Any]]  # CONTENT_LISTS present in the record -> new entries
    log: list[Any]  # new turn-log entries


def _appended(
    record: SessionRecord, lists: dict[str, list], base: StoredBase
) -> _Appended | None:
    """What ``record`` holds beyond ``base``; None if it does not extend it."""
    transcript, messages = record.transcript, record.messages
    n = len(base.transcript)
    if len(transcript) < n or transcript[:n] != base.transcript:
        return None
    n = len(base.messages)
    if len(messages) < n or list(messages[:n]) != base.messages:
        return None
    new_lists: dict[str, list[Any]] = {}
    for key in CONTENT_LISTS:
        stored, current = base.lists.get(key), lists.get(key)
        if current is None:
            if stored is not None:
                return None  # the list went away: not an append
            continue
        stored = stored or []
        if len(current) < len(stored) or current[: len(stored)] != stored:
            return None
        new_lists[key] = current[len(stored) :]
    log: list[Any] = []
    stored_log, current_log = base.lists.get(WINDOW_LIST), lists.get(WINDOW_LIST)
    if current_log is None:
        if stored_log is not None:
            return None
    else:
        k = _window_match(stored_log or [], current_log)
        if k is None:
            return None
        log = current_log[len(current_log) - k :] if k else []
    return _Appended(transcript[len(base.transcript) :], list(messages[len(base.messages) :]),
                     new_lists, log)


def plan_commit(record: SessionRecord, base: StoredBase | None) -> CommitPlan:
    """Encode what committing ``record`` (version and updated_at already set) writes: the
    delta beyond ``base`` if the record extends it, else the whole content."""
    version = record.version
    small, positions, lists = split_meta(record.meta)
    if base is not None and not base.token:
        base = None  # nothing to check the base against: never build on it
    appended = _appended(record, lists, base) if base is not None else None
    if appended is None:
        base = None
        appended = _Appended(
            list(record.transcript),
            list(record.messages),
            {k: lists[k] for k in CONTENT_LISTS if k in lists},
            list(lists.get(WINDOW_LIST, [])),
        )
    has_content = bool(
        appended.tokens or appended.messages or any(appended.lists.values())
    )
    delta = b""
    new_messages: list[Any] = []
    new_lists: dict[str, list[Any]] = {k: [] for k in CONTENT_LISTS}
    if has_content:
        delta = encode_delta(version, appended.tokens, appended.messages, appended.lists)
        # The store's own copy of what it now holds: parsed back, never shared with callers.
        new_messages, new_lists = parse_delta_json([decode_delta(delta).json])
    turns = b""
    new_log: list[Any] = []
    if appended.log:
        turns = encode_turns(version, appended.log)
        [new_log] = parse_turns_json([decode_turns(turns)[1]])

    lineage = base.lineage if base is not None else ()
    if has_content:
        if lineage and lineage[-1][1] == version - 1:
            lineage = lineage[:-1] + ((lineage[-1][0], version),)
        else:
            lineage = lineage + ((version, version),)
    sources: tuple[int, ...] = ()
    log_snapshot: list[Any] | None = None
    if WINDOW_LIST in lists:
        n_log = len(lists[WINDOW_LIST])
        prev_sources = base.log_sources if base is not None else ()
        prev_log = (base.lists.get(WINDOW_LIST) or []) if base is not None else []
        sources = (prev_sources + (version,) * len(new_log))[
            max(0, len(prev_sources) + len(new_log) - n_log) :
        ]
        log_snapshot = (prev_log + new_log)[max(0, len(prev_log) + len(new_log) - n_log) :]
    log_lineage = _runs(sources)

    refs, blobs = encode_states_by_ref(record)
    # States the base head names are stored while it is current (the write checks both);
    # everything else goes with this commit.
    known = base.states if base is not None else frozenset()
    n_lists = {k: len(v) for k, v in lists.items()}
    head = encode_head(
        record, refs, small, positions, len(record.transcript), len(record.messages), n_lists,
        lineage, log_lineage,
    )
    token = uuid.uuid4().hex
    snapshot_lists: dict[str, list[Any] | None] = {}
    for key in CONTENT_LISTS:
        if key in lists:
            prev = (base.lists.get(key) or []) if base is not None else []
            snapshot_lists[key] = prev + new_lists[key]
        else:
            snapshot_lists[key] = None
    snapshot_lists[WINDOW_LIST] = log_snapshot
    new_base = StoredBase(
        tenant=record.tenant,
        session_id=record.session_id,
        version=version,
        token=token,
        lineage=lineage,
        log_sources=sources,
        transcript=(base.transcript if base is not None else []) + appended.tokens,
        messages=(base.messages if base is not None else []) + new_messages,
        lists=snapshot_lists,
        states=frozenset(blobs),
    )
    return CommitPlan(
        record=record,
        head=head,
        lineage=lineage,
        log_lineage=log_lineage,
        delta=delta,
        turns=turns,
        token=token,
        base_token=base.token if base is not None else "",
        new_base=new_base,
        state_refs=tuple(sorted(blobs)),
        states={d: b for d, b in blobs.items() if d not in known},
    )


# -- loading ---------------------------------------------------------------------------------


def assemble(
    fetched: Fetched, tenant: str, session_id: str, expected_identity: StateIdentity | None
) -> SessionRecord:
    """The record ``fetched`` holds (its head and deltas, or a whole record of the previous
    layout), verified; ``stored`` says what of it is stored."""
    data = fetched.data
    assert data is not None
    if bytes(data[: len(MAGIC)]) == MAGIC:
        return _decode(data, tenant, session_id, expected_identity)  # previous layout
    head = decode_head(data, expected_identity)
    record = head.record
    _check_owner(record, tenant, session_id)
    version = record.version
    if head.states is not None:
        record.state, record.extra_states = _resolve_states(
            head.states, fetched.states, record.identity.state_shape,
            f"version {version} of {tenant}/{session_id}",
        )

    wanted = list(lineage_versions(head.lineage))
    if len(fetched.deltas) != len(wanted):
        raise CorruptRecord(
            f"version {version} of {tenant}/{session_id} names {len(wanted)} deltas, "
            f"{len(fetched.deltas)} found"
        )
    parts = []
    for want, blob in zip(wanted, fetched.deltas, strict=True):
        if not blob:
            raise CorruptRecord(f"delta of version {want} of {tenant}/{session_id} is missing")
        part = decode_delta(blob)
        if part.version != want:
            raise CorruptRecord(
                f"delta of version {part.version} found where {tenant}/{session_id} needs {want}"
            )
        parts.append(part)
    transcript = delta_tokens(parts)
    js = [part.json for part in parts]
    # Parsed twice: the record's lists, and the store's own copy (see StoredBase).
    messages, lists = parse_delta_json(js)
    messages_copy, lists_copy = parse_delta_json(js)
    if len(transcript) != head.n_tokens or len(messages) != head.n_messages:
        raise CorruptRecord(
            f"version {version} of {tenant}/{session_id}: deltas hold {len(transcript)} tokens "
            f"and {len(messages)} messages, the head says {head.n_tokens} and {head.n_messages}"
        )

    present: dict[str, list[Any]] = {}
    snapshot: dict[str, list[Any] | None] = {k: None for k in (*CONTENT_LISTS, WINDOW_LIST)}
    for key in CONTENT_LISTS:
        if key in head.positions:
            if len(lists[key]) != head.n_lists[key]:
                raise CorruptRecord(f"version {version}: deltas hold {len(lists[key])} "
                                    f"{key}, the head says {head.n_lists[key]}")
            present[key] = lists[key]
            snapshot[key] = lists_copy[key]
        elif lists[key]:
            raise CorruptRecord(f"version {version}: deltas hold {key} the head has not")

    sources: tuple[int, ...] = ()
    log_versions = list(lineage_versions(head.log_lineage))
    if WINDOW_LIST in head.positions:
        if len(fetched.turns) != len(log_versions):
            raise CorruptRecord(f"version {version} names {len(log_versions)} turn-log parts, "
                                f"{len(fetched.turns)} found")
        found: list[bytes] = []
        for want, blob in zip(log_versions, fetched.turns, strict=True):
            if not blob:
                raise CorruptRecord(f"turn-log part of version {want} of {tenant}/{session_id} "
                                    "is missing")
            got, js_part = decode_turns(blob)
            if got != want:
                raise CorruptRecord(f"turn-log part of version {got} found where "
                                    f"{tenant}/{session_id} needs {want}")
            found.append(js_part)
        log = [e for entries in parse_turns_json(found) for e in entries]
        log_copy = []
        all_sources: list[int] = []
        for want, entries in zip(log_versions, parse_turns_json(found), strict=True):
            log_copy += entries
            all_sources += [want] * len(entries)
        n_log = head.n_lists[WINDOW_LIST]
        if len(log) < n_log:
            raise CorruptRecord(f"version {version}: turn-log parts hold {len(log)} entries, "
                                f"the head shows {n_log}")
        cut = len(log) - n_log
        present[WINDOW_LIST] = log[cut:]
        snapshot[WINDOW_LIST] = log_copy[cut:]
        sources = tuple(all_sources[cut:])
    elif log_versions:
        raise CorruptRecord(f"version {version}: a log lineage without a turn log")

    record.transcript = transcript
    record.messages = messages
    record.meta = join_meta(record.meta, head.positions, present)
    record.stored = StoredBase(
        tenant=tenant,
        session_id=session_id,
        version=version,
        token=fetched.token,
        lineage=head.lineage,
        log_sources=sources,
        transcript=list(transcript),
        messages=messages_copy,
        lists=snapshot,
        # A head with inline states (the previous layout) names none: the next commit stores
        # them by digest.
        states=head.states.digests() if head.states is not None else frozenset(),
    )
    return record


def _resolve_states(
    refs: StateRefs, blobs: dict[str, bytes | None], shape: tuple[int, ...], where: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The state and extra states a head names, from the blobs fetched with it, each verified
    against its digest (a tensor of its own per name, even where two names share one)."""

    def one(digest: str) -> torch.Tensor:
        blob = blobs.get(digest)
        if not blob:
            raise CorruptRecord(f"state {digest} of {where} is missing")
        return decode_state_blob(blob, digest, shape)

    return one(refs.state), {name: one(d) for name, d in refs.extra.items()}
