"""/v1/conversations: a conversation is a session (docs/design.md §7). Create (with initial
items and metadata), retrieve, update metadata, delete; list, add, retrieve and delete items.
Every handler acts inside the caller's tenant; another tenant's conversation is not found."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

import memory_store as ms

from ..chat_service import ChatService
from ..responses import ResponsesService, conversation_items, conversation_not_found, page_items
from ..responses_protocol import (
    ConversationCreateRequest,
    ConversationDeleted,
    ConversationUpdateRequest,
    ItemsCreateRequest,
)
from . import service, tenant
from .responses import refuse_query

router = APIRouter(prefix="/v1/conversations")


@router.post("")
async def create_conversation(body: ConversationCreateRequest | None = None,
                              s: ChatService = Depends(service),
                              tenant_id: str = Depends(tenant)):
    body = body or ConversationCreateRequest()
    return await ResponsesService(s).create_conversation(tenant_id, body.items, body.metadata)


@router.get("/{conversation_id}")
async def get_conversation(conversation_id: str, s: ChatService = Depends(service),
                           tenant_id: str = Depends(tenant)):
    rs = ResponsesService(s)
    return rs.conversation_view(await rs.load_conversation(tenant_id, conversation_id))


@router.post("/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdateRequest,
                              s: ChatService = Depends(service),
                              tenant_id: str = Depends(tenant)):
    return await ResponsesService(s).update_conversation(tenant_id, conversation_id,
                                                         body.metadata)


@router.delete("/{conversation_id}")
async def delete_conversation(conversation_id: str, s: ChatService = Depends(service),
                              tenant_id: str = Depends(tenant)):
    try:
        ms.validate_session_id(conversation_id)
        deleted = await s.store.delete(tenant_id, conversation_id)
    except ms.InvalidSessionId:
        deleted = False
    if not deleted:
        raise conversation_not_found(conversation_id)
    return ConversationDeleted(id=conversation_id)


@router.get("/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request, after: str | None = None,
                     limit: int = 20, order: str = "desc", s: ChatService = Depends(service),
                     tenant_id: str = Depends(tenant)):
    refuse_query(request, "include")
    rec = await ResponsesService(s).load_conversation(tenant_id, conversation_id)
    return page_items(conversation_items(rec), after, limit, order)


@router.post("/{conversation_id}/items")
async def add_items(conversation_id: str, body: ItemsCreateRequest, request: Request,
                    s: ChatService = Depends(service), tenant_id: str = Depends(tenant)):
    refuse_query(request, "include")
    return await ResponsesService(s).add_items(tenant_id, conversation_id, body.items)


@router.get("/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request,
                   s: ChatService = Depends(service), tenant_id: str = Depends(tenant)):
    refuse_query(request, "include")
    return await ResponsesService(s).get_item(tenant_id, conversation_id, item_id)


@router.delete("/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, s: ChatService = Depends(service),
                      tenant_id: str = Depends(tenant)):
    return await ResponsesService(s).delete_item(tenant_id, conversation_id, item_id)
