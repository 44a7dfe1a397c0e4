"""The chat service: one turn of a conversation over the session store and the engine.

A turn loads the session, plans the prompt and write start (`server/sessions.py`), runs the
engine, and commits the new state, transcript and version atomically (docs/design.md,
invariant 6). Requests without a session run once and keep nothing. HTTP lives in the routers;
this module knows nothing of requests and responses beyond the protocol models.
"""

from __future__ import annotations

import asyncio
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
        self.metrics = Metrics()
        self.keys = settings.keys()
        if engine.memory:
            c = engine.adapter.config
            self.identity = ms.StateIdentity(str(engine.backbone), engine.adapter.fingerprint(),
                                             len(c.layers), c.num_state_heads, c.rank)
        else:
            self.identity = ms.StateIdentity(str(engine.backbone), "none", 1, 1, 1)

    def tenant_of(self, request: Request) -> str:
        """The tenant an API key belongs to ("default" when the server has no keys)."""
        if not self.keys:
            return "default"
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        key = key or request.headers.get("x-api-key")
        if not key or key not in self.keys:
            raise APIError(401, "missing or invalid API key", "authentication_error",
                           "invalid_api_key")
        return self.keys[key]

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
                       stream_cb=None) -> tuple[Generated, ms.SessionRecord | None]:
        """Load, plan, generate, commit. `stream_cb(text)` gets each delta."""
        sp = req.to_sampling_params(self.s.default_max_tokens, self.s.max_tokens_limit)
        window = self.s.memory_window_tokens if req.memory_window_tokens is None else \
            req.memory_window_tokens
        messages = [m.normalized() for m in req.messages]
        if session_id is None:
            record = ms.SessionRecord("ephemeral", tenant, self.identity)
            plan = plan_turn(self.fmt, record, messages, -1, self.s.max_model_len,
                             sp.max_tokens)
            gen = await self._generate(plan, sp, tenant, stream_cb)
            return gen, None
        ms.validate_session_id(session_id)
        async with self.locks.hold(tenant, session_id, self.s.session_lock_timeout):
            t0 = time.perf_counter()
            try:
                record = await self.store.load(tenant, session_id, self.identity)
            except ms.SessionNotFound:
                record = ms.SessionRecord(session_id, tenant, self.identity)
            self.metrics.state_load.observe(time.perf_counter() - t0)
            plan = plan_turn(self.fmt, record, messages, window, self.s.max_model_len,
                             sp.max_tokens)
            gen = await self._generate(plan, sp, tenant, stream_cb)
            new = finish_turn(plan, gen.tokens, gen.text, gen.final_state, gen.finish_reason,
                              self.identity, gen.block, gen.cached_tokens)
            t0 = time.perf_counter()
            # The turn finished: commit even if the client goes away now.
            stored = await asyncio.shield(self.store.commit(new, plan.expected_version))
            self.metrics.state_commit.observe(time.perf_counter() - t0)
            self.metrics.turns.inc()
            return gen, stored

    async def _generate(self, plan, sp, tenant: str, stream_cb) -> Generated:
        prompt = plan.prompt
        if len(prompt) + sp.max_tokens > self.s.max_model_len:
            raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {sp.max_tokens} "
                           f"exceeds the context length {self.s.max_model_len}",
                           code="context_length_exceeded")
        memory = self.engine.memory
        stream = self.engine.generate(
            prompt, sp, plan.initial_state if memory else None, plan.write_start,
            known=plan.known if memory else None, cache_salt=tenant)
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
