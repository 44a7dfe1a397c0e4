"""/v1/sessions: list, read, delete, roll back, fork, export and import sessions.

Every handler acts inside the caller's tenant; another tenant's session is simply not found.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

import memory_store as ms

from ..chat_service import ChatService
from ..errors import APIError
from ..protocol import ForkRequest, RollbackRequest, SessionList, SessionView
from . import service, tenant

router = APIRouter(prefix="/v1/sessions")


def view(rec: ms.SessionRecord, full: bool = False, versions=None) -> SessionView:
    v = SessionView(id=rec.session_id, version=rec.version, turns=rec.turns,
                    tokens_absorbed=rec.tokens_absorbed,
                    transcript_tokens=len(rec.transcript), created_at=rec.created_at,
                    updated_at=rec.updated_at, versions=versions,
                    state_bytes=None if rec.state is None else rec.state.numel() * 4)
    if full:
        v.messages = rec.messages
        v.transcript = rec.transcript
        v.turn_log = rec.meta.get("turn_log", [])
    return v


@router.get("")
async def list_sessions(limit: int = 20, after: str | None = None,
                        s: ChatService = Depends(service), tenant_id: str = Depends(tenant)):
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be between 1 and 100", param="limit")
    items, cursor = await s.store.list(tenant_id, limit=limit, after=after)
    return SessionList(data=[SessionView(id=i.session_id, version=i.version, turns=i.turns,
                                         tokens_absorbed=i.tokens_absorbed,
                                         # after any turn the transcript holds one token more
                                         # than was absorbed (docs/design.md, invariant 5)
                                         transcript_tokens=i.tokens_absorbed
                                         + (1 if i.turns else 0),
                                         created_at=i.created_at, updated_at=i.updated_at)
                             for i in items], next_cursor=cursor)


@router.get("/{session_id}")
async def get_session(session_id: str, full: bool = False, s: ChatService = Depends(service),
                      tenant_id: str = Depends(tenant)):
    rec = await s.store.load(tenant_id, session_id)
    return view(rec, full, await s.store.versions(tenant_id, session_id))


@router.delete("/{session_id}")
async def delete_session(session_id: str, s: ChatService = Depends(service),
                         tenant_id: str = Depends(tenant)):
    if not await s.store.delete(tenant_id, session_id):
        raise ms.SessionNotFound(f"session {session_id!r} not found")
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@router.post("/{session_id}/rollback")
async def rollback(session_id: str, body: RollbackRequest, s: ChatService = Depends(service),
                   tenant_id: str = Depends(tenant)):
    async with s.locks.hold(tenant_id, session_id, s.s.session_lock_timeout):
        rec = await s.store.rollback(tenant_id, session_id, body.version)
    return view(rec, versions=await s.store.versions(tenant_id, session_id))


@router.post("/{session_id}/fork")
async def fork(session_id: str, body: ForkRequest | None = None,
               s: ChatService = Depends(service), tenant_id: str = Depends(tenant)):
    new_id = (body.new_session_id if body else None) or \
        f"{session_id}.fork-{uuid.uuid4().hex[:8]}"
    return view(await s.store.fork(tenant_id, session_id, new_id))


@router.get("/{session_id}/export")
async def export(session_id: str, s: ChatService = Depends(service),
                 tenant_id: str = Depends(tenant)):
    data = await s.store.export(tenant_id, session_id)
    return Response(data, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{session_id}.dmem"'})


@router.put("/{session_id}/import")
async def import_(session_id: str, request: Request, overwrite: bool = False,
                  s: ChatService = Depends(service), tenant_id: str = Depends(tenant)):
    data = await request.body()  # the body limit is the middleware's (413 as it arrives)
    try:
        rec = await s.store.import_(tenant_id, session_id, data, s.identity,
                                    overwrite=overwrite, vocab_size=s.vocab_size)
    except ms.CorruptRecord as e:  # the client's bytes, not the store's
        raise APIError(422, f"the record cannot be imported: {e}",
                       code="corrupt_record") from e
    return view(rec)
