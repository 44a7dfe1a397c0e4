"""OpenAI's stateful APIs on δ-mem sessions: /v1/responses and /v1/conversations
(docs/design.md §7).

A conversation is a session. A response is the version of a session its turn committed; its id
names that version and carries a random secret, stored in the version's own record, that the
server checks on every use (`encode_response_id`). A response continues its conversation, or
the session of `previous_response_id` (at its latest version; from an older kept version, a
new session branched from it by the turn's own commit), or starts a new session. Conversation
items added without a turn wait in the session's meta as pending messages; the next response
sends them before its input.

Turns run through `ChatService.run_turn` with two hooks: its `load` (a `_TurnLoader`) checks
that the session is still at the version the response was planned on (else the response is
planned again), and its `stamp` makes the turn's own commit carry the response (its entry in
meta, the item ids of its messages, the pending items it absorbed): a response costs one
version, written atomically with its turn. With `store: false` the turn runs with `commit=False` and keeps nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import logging
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import memory_store as ms

from .chat_service import ChatService, Generated
from .errors import APIError
from .protocol import ChatCompletionRequest, ChatMessage
from .responses_protocol import (
    ConversationObject,
    IncompleteDetails,
    InputMessage,
    InputTextPart,
    InputTokensDetails,
    ItemList,
    MessageItem,
    OutputTextPart,
    ResponseCreateRequest,
    ResponseObject,
    ResponseUsage,
    check_metadata,
    parse_items,
)

log = logging.getLogger("deltamem.server")

# Session meta keys (record.meta is persisted with each version; docs/design.md §7).
META_RESPONSE = "oa_response"  # the response that made this version
META_PENDING = "oa_pending"  # conversation items not yet sent to the model
META_METADATA = "oa_metadata"  # the conversation's metadata
META_DELETED = "oa_deleted"  # deleted responses: secret -> version

CONVERSATION_PREFIX = "conv_"
RESPONSE_PREFIX = "resp_"
SECRET_BYTES = 16
MOVED_RETRIES = 3

EventSink = Callable[[str, Any], None]


def new_session_id() -> str:
    return CONVERSATION_PREFIX + secrets.token_hex(24)


def new_item_id() -> str:
    return "msg_" + secrets.token_hex(16)


def encode_response_id(session_id: str, version: int, secret: bytes) -> str:
    """`resp_` + base64url(version u32 · secret · session id). The version and session say where
    to look; the secret, kept in that version's record, makes the id unguessable."""
    payload = struct.pack(">I", version) + secret + session_id.encode()
    return RESPONSE_PREFIX + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def decode_response_id(response_id: str) -> tuple[str, int, bytes] | None:
    """(session id, version, secret), or None for anything that cannot name a response."""
    if not response_id.startswith(RESPONSE_PREFIX) or len(response_id) > 300:
        return None
    body = response_id[len(RESPONSE_PREFIX):]
    try:
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        session_id = payload[4 + SECRET_BYTES:].decode()
        ms.validate_session_id(session_id)
    except (ValueError, ms.InvalidSessionId):
        return None
    (version,) = struct.unpack(">I", payload[:4])
    if version < 1:
        return None
    return session_id, version, payload[4:4 + SECRET_BYTES]


def unstored_response_id() -> str:
    """The id of a `store: false` response: same look, names nothing."""
    payload = struct.pack(">I", 0) + secrets.token_bytes(SECRET_BYTES)
    return RESPONSE_PREFIX + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def response_not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"response {response_id!r} not found (deleted, stored with "
                    "store false, of another API key, or older than the versions its "
                    "session keeps)", code="response_not_found", param=param)


def conversation_not_found(cid: str, param: str | None = None) -> APIError:
    return APIError(404, f"conversation {cid!r} not found", code="conversation_not_found",
                    param=param)


# --- items ------------------------------------------------------------------------------------

def _text_item(item_id: str, role: str, text: str, absorbed: bool | None = None,
               status: str = "completed") -> MessageItem:
    part = OutputTextPart(text=text) if role == "assistant" else InputTextPart(text=text)
    return MessageItem(id=item_id, role=role, status=status, content=[part],
                       absorbed=absorbed)


def message_id(messages: list[dict], i: int) -> str:
    """A stored message's item id: the one it was given, else one derived from its place."""
    return messages[i].get("id") or f"msg_{i}"


def conversation_items(rec: ms.SessionRecord) -> list[MessageItem]:
    """A session's items, oldest first: its messages (absorbed), then its pending items."""
    items = [_text_item(message_id(rec.messages, i), m.get("item_role", m["role"]),
                        m["content"], absorbed=True) for i, m in enumerate(rec.messages)]
    items += [_text_item(p["id"], p["role"], p["content"], absorbed=False)
              for p in rec.meta.get(META_PENDING, [])]
    return items


def page_items(items: list[MessageItem], after: str | None, limit: int, order: str
               ) -> ItemList:
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be between 1 and 100", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", param="order")
    seq = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [it.id for it in seq]
        if after not in ids:
            raise APIError(404, f"item {after!r} not found", code="item_not_found",
                           param="after")
        seq = seq[ids.index(after) + 1:]
    data = seq[:limit]
    return ItemList(data=data, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None, has_more=len(seq) > limit)


def pending_of(rec: ms.SessionRecord | None) -> list[InputMessage]:
    if rec is None:
        return []
    return [InputMessage(p["role"], p["content"], "conversation", p["id"])
            for p in rec.meta.get(META_PENDING, [])]


def check_messages(rec: ms.SessionRecord | None, items: list[InputMessage],
                   instructions: str | None, final: bool) -> list[InputMessage]:
    """The messages a turn sends (`final`) or a conversation may hold pending, by the rules of
    a δ-mem session (docs/design.md §2): one system prompt, set by the first turn; after it,
    new messages only (a session writes no assistant message it did not generate); the last
    one a user message. Returns them with a leading system message for `instructions` on a
    session's first turn."""
    history = rec is not None and bool(rec.transcript)
    system = rec.meta.get("system") if rec is not None else None
    out: list[InputMessage] = []
    if instructions is not None:
        if history:
            if instructions.strip() != (system or "").strip():
                raise APIError(400, "this conversation's system prompt was set by its first "
                               "response; instructions cannot change it (start a new "
                               "conversation, or send the same instructions)",
                               code="invalid_value", param="instructions")
        else:
            out.append(InputMessage("system", instructions, "instructions"))
    for m in items:
        if m.chat_role == "system":
            if history:
                raise APIError(400, f"{m.param}: a {m.role} message can only open a "
                               "conversation; this one's system prompt is set (by its first "
                               "turn) and stays", code="invalid_value", param=m.param)
            if out:
                which = "a second system prompt" if all(
                    o.chat_role == "system" for o in out) else \
                    "a system message after the conversation's first message"
                raise APIError(400, f"{m.param}: a session has one system prompt, given "
                               f"first; got {which}", code="invalid_value", param=m.param)
        if m.role == "assistant" and history:
            raise APIError(400, f"{m.param}: an assistant message can only be added to a "
                           "conversation before its first response: after it, the session "
                           "writes only the replies its model generated (to change the past, "
                           "roll back or branch from an earlier response)",
                           code="invalid_value", param=m.param)
        out.append(m)
    if final and (not out or out[-1].role != "user"):
        raise APIError(400, "a response needs new input ending with a user message",
                       code="invalid_value", param=out[-1].param if out else "input")
    return out


# --- the turn ---------------------------------------------------------------------------------

class _Moved(Exception):
    """The session changed between planning a response and running its turn."""


@dataclass
class _Plan:
    """One response, planned: where its turn runs and what it stamps into its commit."""

    req: ResponseCreateRequest
    response_id: str
    created_at: int
    output_id: str
    session_id: str | None  # None: a sessionless turn (store false, nothing to continue)
    base_version: int = 0  # the version the turn builds on (0: a new session)
    # An older response's version the turn starts from, (session, version): with store, the
    # turn's commit makes a new session from it (a branch); without, it only reads it.
    source: tuple[str, int] | None = None
    messages: list[InputMessage] = field(default_factory=list)
    pending_ids: list[str] = field(default_factory=list)
    secret: bytes = b""
    previous_response_id: str | None = None
    stored: ms.SessionRecord | None = None  # what the commit stored
    loaded_messages: int = 0

    @property
    def store(self) -> bool:
        return self.req.store is not False

    def entry(self, record: ms.SessionRecord, input_ids: list[str]) -> dict:
        log_ = record.meta.get("turn_log") or [{}]
        last = log_[-1]
        finish = last.get("finish_reason", "stop")
        req = self.req
        return {
            "version": self.base_version + 1, "secret": self.secret.hex(),
            "created_at": self.created_at, "completed_at": int(time.time()),
            "instructions": req.instructions, "metadata": check_metadata(req.metadata),
            "temperature": req.temperature, "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens,
            "previous_response_id": self.previous_response_id,
            "input_ids": input_ids,
            "output_id": self.output_id, "finish_reason": finish,
            "usage": {"input_tokens": last.get("prompt_tokens", 0),
                      "output_tokens": last.get("generated", 0),
                      "cached_tokens": last.get("cached_tokens") or 0},
        }

    def stamp(self, record: ms.SessionRecord) -> ms.SessionRecord:
        """The turn's record with the response in it: the ids of the messages it added, its
        entry in meta, and no pending items (it sent them)."""
        tail = record.messages[self.loaded_messages:]
        sent = self.messages
        labelled, j = [], 0
        for m in tail[:-1]:
            k = next((k for k in range(j, len(sent))
                      if sent[k].chat_role == m["role"]
                      and sent[k].text.strip() == m["content"].strip()), None)
            if k is None:  # a message the planner added (the default system prompt)
                labelled.append(m)
                continue
            s = sent[k]
            j = k + 1
            extra = {"id": s.id} if s.id else {}
            if s.role != s.chat_role:
                extra["item_role"] = s.role
            labelled.append({**m, **extra})
        labelled.append({**tail[-1], "id": self.output_id})
        input_ids = [m["id"] for m in labelled[:-1] if "id" in m]
        meta = {k: v for k, v in record.meta.items() if k != META_PENDING}
        meta[META_RESPONSE] = self.entry(record, input_ids)
        return dataclasses.replace(
            record, messages=record.messages[:self.loaded_messages] + labelled, meta=meta)


class _TurnLoader:
    """How one response's turn loads its session (`ChatService.run_turn`'s `load` hook):
    the version it was planned on, or the older version it branches from."""

    def __init__(self, store: ms.SessionStore, plan: _Plan):
        self._store = store
        self._plan = plan

    async def load(self, tenant: str, session_id: str,
                   expected_identity: ms.StateIdentity | None = None,
                   version: int | None = None) -> ms.SessionRecord:
        plan = self._plan
        try:
            if plan.source is not None:
                rec = await self._store.load(tenant, plan.source[0], expected_identity,
                                             version=plan.source[1])
            else:
                rec = await self._store.load(tenant, session_id, expected_identity)
        except ms.SessionNotFound:
            if plan.base_version or plan.source:
                raise _Moved() from None  # deleted (or no longer kept) meanwhile
            raise  # a new session: run_turn starts it
        if plan.source is not None:
            if plan.store:  # the branch: a new session with the older version's content
                now = time.time()
                meta = {k: v for k, v in rec.meta.items() if k != META_DELETED}
                rec = dataclasses.replace(rec, session_id=session_id, version=0, meta=meta,
                                          created_at=now, updated_at=now)
        elif (rec.version != plan.base_version
              or [p["id"] for p in rec.meta.get(META_PENDING, [])] != plan.pending_ids):
            raise _Moved()
        plan.loaded_messages = len(rec.messages)
        return rec



# --- the service ------------------------------------------------------------------------------

class ResponsesService:
    """Responses and conversations over a ChatService (its engine, store, locks, identity)."""

    def __init__(self, svc: ChatService):
        self.svc = svc
        self.store = svc.store

    # -- reading responses ---------------------------------------------------------------------

    async def resolve(self, tenant: str, response_id: str, param: str | None = None
                      ) -> tuple[ms.SessionRecord, ms.SessionRecord, dict]:
        """(the response's version, the session's current version, the response's entry);
        404 unless the id names a kept response of this tenant that was not deleted."""
        parsed = decode_response_id(response_id)
        if parsed is None:
            raise response_not_found(response_id, param)
        sid, version, secret = parsed
        try:
            cur = await self.store.load(tenant, sid, self.svc.identity)
            rec = cur if cur.version == version else await self.store.load(
                tenant, sid, self.svc.identity, version=version)
        except ms.SessionNotFound:
            raise response_not_found(response_id, param) from None
        entry = rec.meta.get(META_RESPONSE)
        if (not entry or entry.get("version") != version
                or not hmac.compare_digest(entry.get("secret", ""), secret.hex())
                or secret.hex() in cur.meta.get(META_DELETED, {})):
            raise response_not_found(response_id, param)
        return rec, cur, entry

    def response_view(self, response_id: str, rec: ms.SessionRecord, entry: dict
                      ) -> ResponseObject:
        """A stored response as the API shows it, from its version's record."""
        i = next((i for i in range(len(rec.messages) - 1, -1, -1)
                  if rec.messages[i].get("id") == entry["output_id"]), len(rec.messages) - 1)
        u = entry["usage"]
        return self._response(
            response_id, entry, text=rec.messages[i]["content"],
            finish=entry["finish_reason"], usage=(u["input_tokens"], u["output_tokens"],
                                                  u["cached_tokens"]),
            session=self.svc.session_info(rec), sid=rec.session_id)

    def _response(self, response_id: str, entry: dict, text: str | None, finish: str | None,
                  usage: tuple[int, int, int] | None, session, sid: str | None,
                  store: bool = True) -> ResponseObject:
        incomplete = finish == "length"
        status = "in_progress" if finish is None else (
            "incomplete" if incomplete else "completed")
        output = [] if text is None else [_text_item(
            entry["output_id"], "assistant", text,
            status="incomplete" if incomplete else "completed")]
        return ResponseObject(
            id=response_id, created_at=entry["created_at"], status=status,
            completed_at=entry.get("completed_at") if finish else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if incomplete else None,
            instructions=entry["instructions"], max_output_tokens=entry["max_output_tokens"],
            metadata=entry["metadata"], model=self.svc.model_name, output=output,
            previous_response_id=entry["previous_response_id"], store=store,
            temperature=1.0 if entry["temperature"] is None else entry["temperature"],
            top_p=1.0 if entry["top_p"] is None else entry["top_p"],
            usage=None if usage is None else ResponseUsage(
                input_tokens=usage[0], output_tokens=usage[1], total_tokens=usage[0] + usage[1],
                input_tokens_details=InputTokensDetails(cached_tokens=usage[2])),
            conversation={"id": sid} if sid and store else None, session=session)

    async def input_items(self, tenant: str, response_id: str, after: str | None,
                          limit: int, order: str) -> ItemList:
        rec, _, entry = await self.resolve(tenant, response_id)
        wanted = set(entry["input_ids"])
        items = [it for it in conversation_items(rec) if it.id in wanted]
        for it in items:
            it.absorbed = None
        return page_items(items, after, limit, order)

    async def delete(self, tenant: str, response_id: str) -> None:
        """Forget a response: its id no longer resolves. Its turn stays in the session (roll
        back to undo that)."""
        rec, _, entry = await self.resolve(tenant, response_id)

        def forget(_rec, meta: dict, kept: list[int]) -> None:
            deleted = {s: v for s, v in meta.get(META_DELETED, {}).items() if v >= kept[0]}
            deleted[entry["secret"]] = entry["version"]
            meta[META_DELETED] = deleted

        await self.update_meta(tenant, rec.session_id, forget)

    # -- creating responses --------------------------------------------------------------------

    async def create(self, req: ResponseCreateRequest, tenant: str,
                     on_event: EventSink | None = None) -> ResponseObject:
        """Run one response. `on_event("created", (skeleton, output item id))` once its turn
        is planned (every error the request can earn by itself raised), then
        `on_event("delta", text)` per piece of text."""
        s = self.svc
        req.check_supported()
        if req.model and req.model != s.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                           f"{s.model_name!r}", code="model_not_found", param="model")
        if req.max_output_tokens is not None and req.max_output_tokens > s.s.max_tokens_limit:
            raise APIError(400, f"max_output_tokens {req.max_output_tokens} exceeds this "
                           f"server's limit {s.s.max_tokens_limit}", param="max_output_tokens")
        items = parse_items(req.input, "input")
        for attempt in range(MOVED_RETRIES):
            plan = await self._plan(req, tenant, items)
            try:
                return await self._run(plan, tenant, on_event)
            except _Moved:
                log.info("session %s moved while response %s was planned (try %d)",
                         plan.session_id, plan.response_id, attempt + 1)
        raise APIError(409, "the conversation kept changing while this response was being "
                       "created (other turns on it); retry", code="session_conflict")

    async def _plan(self, req: ResponseCreateRequest, tenant: str,
                    items: list[InputMessage]) -> _Plan:
        s = self.svc
        created = int(time.time())
        plan = _Plan(req=req, response_id="", created_at=created, output_id=new_item_id(),
                     session_id=None, secret=secrets.token_bytes(SECRET_BYTES))
        base: ms.SessionRecord | None = None
        if req.previous_response_id:
            plan.previous_response_id = req.previous_response_id
            rec, cur, entry = await self.resolve(tenant, req.previous_response_id,
                                                 "previous_response_id")
            sid = rec.session_id
            latest = (cur.turns == rec.turns and cur.tokens_absorbed == rec.tokens_absorbed
                      and len(cur.messages) == len(rec.messages)
                      and cur.meta.get(META_RESPONSE, {}).get("secret") == entry["secret"])
            if latest:  # continue the session (its pending items included)
                plan.session_id, base = sid, cur
                plan.base_version = cur.version
            else:  # an older response: branch from it, the newer turns left as they are
                plan.source, base = (sid, rec.version), rec
                plan.session_id = new_session_id() if plan.store else sid
        elif (cid := req.conversation_id()) is not None:
            try:
                ms.validate_session_id(cid)
                base = await self.store.load(tenant, cid, s.identity)
            except (ms.SessionNotFound, ms.InvalidSessionId):
                raise conversation_not_found(cid, "conversation") from None
            plan.session_id = cid
            plan.base_version = base.version
        elif plan.store:
            plan.session_id = new_session_id()
        if base is not None:
            plan.pending_ids = [p["id"] for p in base.meta.get(META_PENDING, [])]
        for m in items:
            m.id = new_item_id()
        plan.messages = check_messages(base, pending_of(base) + items, req.instructions,
                                       final=True)
        if len(plan.messages) > s.s.max_messages:
            raise APIError(400, f"{len(plan.messages)} messages (pending conversation items "
                           f"and input) exceed the limit of {s.s.max_messages}", param="input")
        if plan.store and plan.session_id is not None:
            plan.response_id = encode_response_id(plan.session_id, plan.base_version + 1,
                                                  plan.secret)
        else:
            plan.response_id = unstored_response_id()
        return plan

    async def _run(self, plan: _Plan, tenant: str, on_event: EventSink | None
                   ) -> ResponseObject:
        s = self.svc
        req = plan.req
        entry = {"created_at": plan.created_at, "instructions": req.instructions,
                 "metadata": check_metadata(req.metadata), "temperature": req.temperature,
                 "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
                 "previous_response_id": plan.previous_response_id,
                 "output_id": plan.output_id}

        def ready() -> None:  # the turn is planned: every 4xx it can earn was raised
            if on_event is not None:
                on_event("created", (self._response(
                    plan.response_id, entry, None, None, None, None, plan.session_id,
                    plan.store), plan.output_id))

        async def delta(text: str) -> None:
            if on_event is not None and text:
                on_event("delta", text)

        chat = ChatCompletionRequest(
            messages=[ChatMessage(role=m.chat_role, content=m.text) for m in plan.messages],
            temperature=req.temperature, top_p=req.top_p,
            max_completion_tokens=req.max_output_tokens, session_id=plan.session_id,
            memory_window_tokens=req.memory_window_tokens)
        if plan.session_id is None:
            gen, _ = await s.run_turn(chat, tenant, None, delta, ready=ready)
        else:
            gen, plan.stored = await s.run_turn(
                chat, tenant, plan.session_id, delta, ready=ready, commit=plan.store,
                load=_TurnLoader(s.store, plan).load, stamp=plan.stamp)
        return self._finished(plan, entry, gen)

    def _finished(self, plan: _Plan, entry: dict, gen: Generated) -> ResponseObject:
        if plan.stored is not None:
            full = plan.stored.meta[META_RESPONSE]
            return self.response_view(plan.response_id, plan.stored, full)
        entry = {**entry, "completed_at": int(time.time())}
        return self._response(plan.response_id, entry, gen.text, gen.finish_reason,
                              (gen.prompt_tokens, len(gen.tokens), gen.cached_tokens or 0),
                              None, plan.session_id, store=False)

    # -- conversations -------------------------------------------------------------------------

    async def load_conversation(self, tenant: str, cid: str) -> ms.SessionRecord:
        try:
            ms.validate_session_id(cid)
            return await self.store.load(tenant, cid)
        except (ms.SessionNotFound, ms.InvalidSessionId):
            raise conversation_not_found(cid) from None

    @staticmethod
    def conversation_view(rec: ms.SessionRecord) -> ConversationObject:
        return ConversationObject(id=rec.session_id, created_at=int(rec.created_at),
                                  metadata=rec.meta.get(META_METADATA, {}))

    async def create_conversation(self, tenant: str, items: list[Any] | None,
                                  metadata: dict | None) -> ConversationObject:
        s = self.svc
        meta = {META_METADATA: check_metadata(metadata)}
        new = parse_items(items, "items")
        if new:
            check_messages(None, new, None, final=False)
            meta[META_PENDING] = self._pending(new)
        if len(new) > s.s.max_messages:
            raise APIError(400, f"{len(new)} items exceed the limit of {s.s.max_messages}",
                           param="items")
        rec = ms.SessionRecord(new_session_id(), tenant, s.identity, meta=meta)
        return self.conversation_view(await self.store.commit(rec, 0))

    @staticmethod
    def _pending(new: list[InputMessage]) -> list[dict]:
        now = int(time.time())
        for m in new:
            m.id = m.id or new_item_id()
        return [{"id": m.id, "role": m.role, "content": m.text, "created_at": now}
                for m in new]

    async def update_meta(self, tenant: str, sid: str,
                          change: Callable[[ms.SessionRecord, dict, list[int]], None]
                          ) -> ms.SessionRecord:
        """A version with the same content and `change(record, meta, kept versions)` applied
        to a copy of its meta (a change that raises commits nothing)."""
        s = self.svc
        async with s.locks.hold(tenant, sid, s.s.session_lock_timeout):
            try:
                rec = await self.store.load(tenant, sid, s.identity)
                kept = await self.store.versions(tenant, sid)
            except ms.SessionNotFound:
                raise conversation_not_found(sid) from None
            meta = dict(rec.meta)
            change(rec, meta, kept)
            return await self.store.commit(dataclasses.replace(rec, meta=meta), rec.version)

    async def update_conversation(self, tenant: str, cid: str, metadata: dict | None
                                  ) -> ConversationObject:
        md = check_metadata(metadata)
        await self.load_conversation(tenant, cid)  # 404 before anything else

        def put(_rec, meta: dict, _kept) -> None:
            meta[META_METADATA] = md

        return self.conversation_view(await self.update_meta(tenant, cid, put))

    async def add_items(self, tenant: str, cid: str, items: list[Any]) -> ItemList:
        s = self.svc
        await self.load_conversation(tenant, cid)
        new = parse_items(items, "items")
        added: list[dict] = []

        def add(rec: ms.SessionRecord, meta: dict, _kept) -> None:
            pending = pending_of(rec)
            check_messages(rec, pending + new, None, final=False)
            if len(pending) + len(new) > s.s.max_messages:
                raise APIError(400, f"{len(pending) + len(new)} pending items would exceed "
                               f"the limit of {s.s.max_messages}", param="items")
            added.extend(self._pending(new))
            meta[META_PENDING] = meta.get(META_PENDING, []) + added

        await self.update_meta(tenant, cid, add)
        data = [_text_item(p["id"], p["role"], p["content"], absorbed=False) for p in added]
        return ItemList(data=data, first_id=data[0].id, last_id=data[-1].id)

    async def get_item(self, tenant: str, cid: str, item_id: str) -> MessageItem:
        rec = await self.load_conversation(tenant, cid)
        for it in conversation_items(rec):
            if it.id == item_id:
                return it
        raise APIError(404, f"item {item_id!r} not found in conversation {cid!r}",
                       code="item_not_found")

    async def delete_item(self, tenant: str, cid: str, item_id: str) -> ConversationObject:
        rec = await self.load_conversation(tenant, cid)
        for i in range(len(rec.messages)):
            if message_id(rec.messages, i) == item_id:
                turn = sum(1 for m in rec.messages[:i + 1] if m["role"] == "assistant")
                turn += 0 if rec.messages[i]["role"] == "assistant" else 1
                raise APIError(
                    409, f"item {item_id!r} is already in the conversation's memory state "
                    f"(written by turn {turn}); an absorbed item cannot be taken out of the "
                    "state. Roll the session back (POST /v1/sessions/{id}/rollback) or "
                    "continue from an earlier response (previous_response_id) instead; "
                    "only pending items can be deleted", code="item_absorbed", param="item_id")

        def drop(_rec, meta: dict, _kept) -> None:
            pending = meta.get(META_PENDING, [])
            left = [p for p in pending if p["id"] != item_id]
            if len(left) == len(pending):
                raise APIError(404, f"item {item_id!r} not found in conversation {cid!r}",
                               code="item_not_found")
            meta[META_PENDING] = left

        return self.conversation_view(await self.update_meta(tenant, cid, drop))
