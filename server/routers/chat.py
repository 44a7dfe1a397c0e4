"""POST /v1/chat/completions: one turn, as JSON or as a server-sent event stream.

A client that goes away before the turn finished aborts it, and nothing is committed; once the
turn finished, the commit goes through whatever the client does (the service shields it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat_service import ChatService
from ..errors import APIError, error_body
from ..protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
    new_completion_id,
)
from . import finish_unless_gone, queued, service, tenant

log = logging.getLogger("deltamem.server")
router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           s: ChatService = Depends(service),
                           tenant_id: str = Depends(tenant)):
    req.check_supported(s.s.max_messages)
    session_id = req.session_id or request.headers.get("x-session-id") or None
    if req.model and req.model != s.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                       f"{s.model_name!r}", code="model_not_found", param="model")
    key = idempotency_key(request)
    cid, created = new_completion_id(), int(time.time())
    if not req.stream:
        return await _complete(s, req, tenant_id, session_id, request, cid, created, key)
    # Plan the turn before the stream starts, so that a request the turn refuses (a busy
    # session, a bad session id, a history that does not match, ...) gets its real status.
    queue: asyncio.Queue = asyncio.Queue()
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(s.run_turn(
        req, tenant_id, session_id, queue.put, idempotency_key=key,
        ready=lambda: ready.done() or ready.set_result(None)))
    try:
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the client went away while the turn was being planned
        task.cancel()
        raise
    if not ready.done():
        task.result()  # raises the turn's error, mapped to its status by the error handlers
    return StreamingResponse(_stream(s, req, task, queue, session_id, cid, created),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key header (a retried turn returns its committed answer)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise APIError(400, "Idempotency-Key must be 1 to 255 printable characters",
                       param="Idempotency-Key", code="invalid_idempotency_key")
    return key


def _usage(gen) -> Usage:
    return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.tokens),
                 total_tokens=gen.prompt_tokens + len(gen.tokens))


async def _complete(s: ChatService, req, tenant_id, session_id, request, cid, created, key):
    s.metrics.in_flight.inc()
    task = asyncio.create_task(s.run_turn(req, tenant_id, session_id, idempotency_key=key))
    try:
        if not await finish_unless_gone(request, task, f"turn (session {session_id})"):
            return Response(status_code=499)
        gen, rec = task.result()
    finally:
        if not task.done():
            task.cancel()
        s.metrics.in_flight.dec()
    body = ChatCompletion(
        id=cid, created=created, model=s.model_name,
        choices=[Choice(message=AssistantMessage(content=gen.text),
                        finish_reason=gen.finish_reason)],
        usage=_usage(gen), session=s.session_info(rec))
    return JSONResponse(body.model_dump(),
                        headers={"Idempotent-Replayed": "true"} if gen.replayed else None)


async def _stream(s: ChatService, req, task: asyncio.Task, queue: asyncio.Queue, session_id,
                  cid, created) -> AsyncIterator[str]:

    def event(delta: Delta | None, finish=None, usage=None, session=None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=s.model_name,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish)]
                                if delta is not None else [],
                                usage=usage, session=session)
        return "data: " + c.model_dump_json(exclude_none=False) + "\n\n"

    s.metrics.in_flight.inc()
    try:
        yield event(Delta(role="assistant", content=""))
        async for text in queued(queue, task):
            if text:
                yield event(Delta(content=text))
        if (exc := task.exception()) is not None:
            _, body = error_body(exc)
            yield "data: " + json.dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        gen, rec = task.result()
        yield event(Delta(), finish=gen.finish_reason, session=s.session_info(rec))
        if req.stream_options and req.stream_options.include_usage:
            yield event(None, usage=_usage(gen))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            # The client went away mid-stream: abort the turn, commit nothing.
            task.cancel()
            log.info("stream closed before the turn finished; aborted (session %s)",
                     session_id)
        s.metrics.in_flight.dec()
