"""/v1/responses: create a response (JSON or a stream of Responses events), retrieve, delete,
and list a response's input items. The serving logic is `server/responses.py`.

A client that goes away before the turn finished aborts it, and nothing is committed (as in
chat completions).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from ..chat_service import ChatService
from ..errors import APIError, error_body
from ..responses import ResponsesService
from ..responses_protocol import ResponseCreateRequest, ResponseDeleted, ResponseObject
from . import finish_unless_gone, queued, service, tenant

log = logging.getLogger("deltamem.server")
router = APIRouter(prefix="/v1/responses")


def refuse_query(request: Request, *names: str) -> None:
    """400 for query parameters this server does not implement (`include`, `stream`...)."""
    for key, value in request.query_params.multi_items():
        base = key.split("[", 1)[0]
        if base in names and value not in ("", "false"):
            raise APIError(400, f"{base} is not supported here", code="unsupported_parameter",
                           param=base)


@router.post("")
async def create_response(req: ResponseCreateRequest, request: Request,
                          s: ChatService = Depends(service), tenant_id: str = Depends(tenant)):
    rs = ResponsesService(s)
    if not req.stream:
        return await _complete(s, rs, req, tenant_id, request)
    return await _stream(s, rs, req, tenant_id)


async def _complete(s: ChatService, rs: ResponsesService, req, tenant_id, request):
    s.metrics.in_flight.inc()
    task = asyncio.create_task(rs.create(req, tenant_id))
    try:
        if not await finish_unless_gone(request, task, "response"):
            return Response(status_code=499)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
        s.metrics.in_flight.dec()


async def _stream(s: ChatService, rs: ResponsesService, req, tenant_id):
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(kind: str, payload) -> None:
        queue.put_nowait((kind, payload))

    s.metrics.in_flight.inc()
    task = asyncio.create_task(rs.create(req, tenant_id, on_event))
    # Until the turn is planned, a failure is a plain HTTP error with its own status.
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            task.result()  # raises the error
            raise APIError(500, "the response ended before it started", "server_error")
    except BaseException:
        getter.cancel()
        if not task.done():
            task.cancel()
        s.metrics.in_flight.dec()
        raise
    _, (skeleton, item_id) = getter.result()
    return StreamingResponse(_events(s, skeleton, item_id, queue, task),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(s: ChatService, skeleton: ResponseObject, item_id: str,
                  queue: asyncio.Queue, task: asyncio.Task) -> AsyncIterator[str]:
    seq = itertools.count()

    def event(type_: str, **fields) -> str:
        body = {"type": type_, "sequence_number": next(seq), **fields}
        return f"event: {type_}\ndata: {json.dumps(body)}\n\n"

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    try:
        snap = skeleton.model_dump(mode="json")
        yield event("response.created", response=snap)
        yield event("response.in_progress", response=snap)
        yield event("response.output_item.added", output_index=0, item={
            "id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
            "content": []})
        yield event("response.content_part.added", **where, part={
            "type": "output_text", "text": "", "annotations": [], "logprobs": []})
        async for kind, text in queued(queue, task):
            if kind == "delta":
                yield event("response.output_text.delta", **where, delta=text, logprobs=[])
        if (exc := task.exception()) is not None:
            _, body = error_body(exc)
            err = body["error"]
            yield event("error", code=err["code"], message=err["message"], param=err["param"])
            return
        final: ResponseObject = task.result()
        item = final.output[0]
        part = item.content[0].model_dump(mode="json")
        yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
        yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=0,
                    item=item.model_dump(mode="json", exclude={"absorbed"}))
        done_type = "response.incomplete" if final.status == "incomplete" else \
            "response.completed"
        yield event(done_type, response=final.model_dump(mode="json"))
    finally:
        if not task.done():
            # The client went away mid-stream: abort the turn, commit nothing.
            task.cancel()
            log.info("stream closed before the response finished; aborted")
        s.metrics.in_flight.dec()


@router.get("/{response_id}")
async def get_response(response_id: str, request: Request, s: ChatService = Depends(service),
                       tenant_id: str = Depends(tenant)):
    refuse_query(request, "include", "stream", "starting_after", "include_obfuscation")
    rs = ResponsesService(s)
    rec, _, entry = await rs.resolve(tenant_id, response_id)
    return rs.response_view(response_id, rec, entry)


@router.delete("/{response_id}")
async def delete_response(response_id: str, s: ChatService = Depends(service),
                          tenant_id: str = Depends(tenant)):
    await ResponsesService(s).delete(tenant_id, response_id)
    return ResponseDeleted(id=response_id)


@router.get("/{response_id}/input_items")
async def input_items(response_id: str, request: Request, after: str | None = None,
                      limit: int = 20, order: str = "desc", s: ChatService = Depends(service),
                      tenant_id: str = Depends(tenant)):
    refuse_query(request, "include")
    return await ResponsesService(s).input_items(tenant_id, response_id, after, limit, order)
