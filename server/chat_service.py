"""The chat service: one turn of a conversation over the session store and the engine.

A turn loads the session, plans the prompt and write start (`server/sessions.py`), runs the
engine, and commits the new state, transcript and version atomically (docs/design.md,
invariant 6). Requests without a session run once and keep nothing. HTTP lives in the routers;
this module knows nothing of requests and responses beyond the protocol models.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from fastapi import Request

import memory_store as ms

from .errors import APIError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, SessionInfo
from .sessions import ChatFormat, SessionLocks, finish_turn, plan_turn
from .settings import Settings

log = logging.getLogger("deltamem.server")


@dataclass
class Generated:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    final_state: object
    block: tuple | None = None  # (prompt position, state) at the last KV block boundary
    cached_tokens: int | None = None
    replayed: bool = False  # the committed answer of an earlier request (Idempotency-Key)


IDEMPOTENCY_KEEP = 16  # Idempotency-Keys a session remembers (its latest turns')


def _digest(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:32]


def _replay(record: ms.SessionRecord, key: str, request_digest: str) -> Generated | None:
    """The committed answer of the turn that ran under `key`, if the session has one."""
    entry = next((e for e in record.meta.get("idempotency", []) if e["key"] == key), None)
    if entry is None:
        return None
    if entry["request"] != request_digest:
        raise APIError(409, "this Idempotency-Key was used for a different request on this "
                       "session; use a new key for a new turn", code="idempotency_key_reused")
    s, e = entry["reply"]
    return Generated(tokens=record.transcript[s:e],
                     text=record.messages[entry["message"]]["content"],
                     finish_reason=entry["finish_reason"], prompt_tokens=entry["prompt_tokens"],
                     final_state=None, cached_tokens=entry.get("cached_tokens"), replayed=True)


async def commit_through_cancellation(store: ms.SessionStore, record: ms.SessionRecord,
                                      expected_version: int) -> ms.SessionRecord:
    """Commit a finished turn even if the caller is cancelled meanwhile (the client went
    away): the commit runs to its end, and only then does the cancellation go on, so whoever
    holds the session's lock keeps it until the new version has landed (or failed)."""
    task = asyncio.ensure_future(store.commit(record, expected_version))
    cancelled = False
    while True:
        try:
            stored = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True  # ours, not the commit's: wait for the commit, then go on
    if cancelled:
        raise asyncio.CancelledError
    return stored


class ChatService:
    """Holds the engine, the store and the chat format; runs turns."""

    def __init__(self, settings: Settings, engine, store: ms.SessionStore, tokenizer,
                 model_name: str):
        self.s = settings
        self.engine = engine
        self.store = store
        self.fmt = ChatFormat(tokenizer)
        self.model_name = model_name
        self.locks = SessionLocks()
        self.keys = settings.keys()
        self.metrics = Metrics(count_sessions=not self.keys)
        self.vocab_size: int | None = None  # set by the app (the model's config)
        self._counted_at = -1e9
        self._key_digests = self.key_digests(self.keys)
        if engine.memory:
            c = engine.adapter.config
            self.identity = ms.StateIdentity(str(engine.backbone), engine.adapter_fingerprint,
                                             len(c.layers), c.num_state_heads, c.rank)
        else:
            self.identity = ms.StateIdentity(str(engine.backbone), "none", 1, 1, 1)

    @staticmethod
    def key_digests(keys: dict[str, str]) -> list[tuple[bytes, str]]:
        return [(hashlib.sha256(k.encode()).digest(), t) for k, t in keys.items()]

    def tenant_of(self, request: Request) -> str:
        """The tenant an API key belongs to ("default" when the server has no keys)."""
        if not self.keys:
            return "default"
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        key = key or request.headers.get("x-api-key")
        tenant = None
        if key:
            # Compare digests, each in constant time and all of them, so the time taken
            # says nothing of how close a wrong key came to a right one.
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
            for known, t in self._key_digests:
                if hmac.compare_digest(digest, known):
                    tenant = t
        if tenant is None:
            raise APIError(401, "missing or invalid API key", "authentication_error",
                           "invalid_api_key")
        return tenant

    async def refresh_session_count(self, max_age: float = 30.0) -> None:
        """Set the sessions gauge from the store, at most every `max_age` seconds (a scrape
        per second must not become a store query per second)."""
        now = time.monotonic()
        if self.metrics.sessions is None or now - self._counted_at < max_age:
            return
        self._counted_at = now
        try:
            self.metrics.sessions.set(await self.store.count())
        except ms.StoreError as e:
            log.warning("metrics: cannot count sessions: %s", e)

    def memory_card(self) -> dict | None:
        """What /v1/models says of the memory (None with memory off)."""
        if not self.engine.memory:
            return None
        c = self.engine.adapter.config
        return {"adapter": self.identity.adapter, "rank": c.rank, "layers": len(c.layers),
                "state_heads": c.num_state_heads, "write_granularity": c.write_granularity,
                "state_bytes": len(c.layers) * c.num_state_heads * c.rank * c.rank * 4,
                "trained": bool(self.engine.adapter.meta.get("trained", True))}

    async def run_turn(self, req: ChatCompletionRequest, tenant: str, session_id: str | None,
                       stream_cb=None, *, ready=None, commit: bool = True,
                       idempotency_key: str | None = None, load=None, stamp=None
                       ) -> tuple[Generated, ms.SessionRecord | None]:
        """Load, plan, generate, commit.

        `ready()` is called once the turn is planned: every error a request can earn by
        itself (4xx) has been raised by then, so a stream starts after it. `stream_cb(text)`
        gets each delta. `commit=False` runs the turn on the session and keeps nothing. An
        `idempotency_key` the session has committed a turn under returns that turn's answer
        (`Generated.replayed`) instead of running it again.

        Another API built on turns (the Responses API) may load the session its own way,
        `load(tenant, session_id, identity)` under the session's lock (SessionNotFound: a new
        session), and `stamp(record)` the finished record with what it keeps of the turn
        before it is committed, in the same version.
        """
        sp = req.to_sampling_params(self.s.default_max_tokens, self.s.max_tokens_limit)
        window = self.s.memory_window_tokens if req.memory_window_tokens is None else \
            req.memory_window_tokens
        messages = [m.normalized() for m in req.messages]
        if session_id is None:
            record = ms.SessionRecord("ephemeral", tenant, self.identity)
            plan = plan_turn(self.fmt, record, messages, -1, self.s.max_model_len,
                             sp.max_tokens)
            self._check_context(plan, sp)
            if ready is not None:
                ready()
            gen = await self._generate(plan, sp, tenant, stream_cb, sessionless=True)
            return gen, None
        ms.validate_session_id(session_id)
        async with self.locks.hold(tenant, session_id, self.s.session_lock_timeout):
            t0 = time.perf_counter()
            try:
                record = await (load or self.store.load)(tenant, session_id, self.identity)
            except ms.SessionNotFound:
                record = ms.SessionRecord(session_id, tenant, self.identity)
            self.metrics.state_load.observe(time.perf_counter() - t0)
            request_digest = _digest(messages)
            if idempotency_key is not None:
                replay = _replay(record, idempotency_key, request_digest)
                if replay is not None:
                    log.info("session %s: Idempotency-Key seen, committed answer returned",
                             session_id)
                    if ready is not None:
                        ready()
                    if stream_cb is not None:
                        await stream_cb(replay.text)
                    return replay, record
            plan = plan_turn(self.fmt, record, messages, window, self.s.max_model_len,
                             sp.max_tokens)
            self._check_session_limit(plan, sp)
            self._check_context(plan, sp)
            if ready is not None:
                ready()
            gen = await self._generate(plan, sp, tenant, stream_cb)
            if not commit:
                return gen, None
            new = finish_turn(plan, gen.tokens, gen.text, gen.final_state, gen.finish_reason,
                              self.identity, gen.block, gen.cached_tokens)
            if idempotency_key is not None:
                reply_start = len(plan.record.transcript) + len(plan.new_tokens)
                entry = {"key": idempotency_key, "request": request_digest,
                         "message": len(new.messages) - 1,
                         "reply": [reply_start, len(new.transcript)],
                         "prompt_tokens": gen.prompt_tokens,
                         "cached_tokens": gen.cached_tokens,
                         "finish_reason": gen.finish_reason}
                kept = [e for e in new.meta.get("idempotency", [])
                        if e["key"] != idempotency_key]
                new.meta["idempotency"] = (kept + [entry])[-IDEMPOTENCY_KEEP:]
            if stamp is not None:
                new = stamp(new)
            t0 = time.perf_counter()
            stored = await commit_through_cancellation(self.store, new, plan.expected_version)
            self.metrics.state_commit.observe(time.perf_counter() - t0)
            self.metrics.turns.inc()
            return gen, stored

    def _check_context(self, plan, sp) -> None:
        if len(plan.prompt) + sp.max_tokens > self.s.max_model_len:
            raise APIError(400, f"prompt of {len(plan.prompt)} tokens + max_tokens "
                           f"{sp.max_tokens} exceeds the context length "
                           f"{self.s.max_model_len}", code="context_length_exceeded")

    def _check_session_limit(self, plan, sp) -> None:
        limit = self.s.max_session_tokens
        size = len(plan.record.transcript) + len(plan.new_tokens) + sp.max_tokens
        if limit and size > limit:
            raise APIError(
                400, f"this session would reach {size} tokens (its transcript, this turn's "
                f"messages and max_tokens), over this server's limit of {limit} tokens per "
                "session. To go on, fork a new session that starts with a summary of this "
                "one, or raise the limit (--max-session-tokens)",
                code="session_token_limit", param="session_id")

    async def _generate(self, plan, sp, tenant: str, stream_cb, sessionless: bool = False
                        ) -> Generated:
        prompt = plan.prompt
        memory = self.engine.memory
        ssw = self.engine.writes_messages
        salt = tenant
        if ssw and sessionless:
            # SSW: a sessionless prompt is one ingest (its assistant messages too), a
            # session's replies are written token by token: the same tokens, other K/V.
            salt = f"{tenant}\0sessionless"
        stream = self.engine.generate(
            prompt, sp, plan.initial_state if memory else None, plan.write_start,
            known=plan.known if memory else None, cache_salt=salt,
            ingests=plan.ingests if ssw else None, keep_state=not sessionless)
        tokens: list[int] = []
        text = []
        t0 = time.perf_counter()
        first = True
        final = None
        async for chunk in stream:
            if first and chunk.token_ids:
                self.metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            tokens += chunk.token_ids
            text.append(chunk.text)
            if stream_cb is not None and (chunk.text or chunk.finished):
                await stream_cb(chunk.text)
            if chunk.finished:
                final = chunk
        if final is None or final.finish_reason not in ("stop", "length"):
            raise APIError(503, "generation did not finish", "server_error", "aborted")
        self.metrics.tokens.labels("prompt").inc(len(prompt))
        self.metrics.tokens.labels("completion").inc(len(tokens))
        self.metrics.tokens.labels("prompt_cached").inc(final.cached_tokens or 0)
        return Generated(tokens, "".join(text), final.finish_reason, len(prompt),
                         final.final_state, final.block, final.cached_tokens)

    @staticmethod
    def session_info(rec: ms.SessionRecord | None) -> SessionInfo | None:
        if rec is None:
            return None
        return SessionInfo(id=rec.session_id, version=rec.version, turns=rec.turns,
                           tokens_absorbed=rec.tokens_absorbed,
                           transcript_tokens=len(rec.transcript))
