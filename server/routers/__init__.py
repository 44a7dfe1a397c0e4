"""The API, one router per area: chat completions, sessions, and the server's status (models,
health, metrics). Handlers are module-level functions; what they share comes in through the
dependencies below."""

from __future__ import annotations

from fastapi import Request

from ..chat_service import ChatService


def service(request: Request) -> ChatService:
    """The app's chat service (built by the app's lifespan)."""
    return request.app.state.svc


def tenant(request: Request) -> str:
    """The caller's tenant, from its API key; 401 when keys are set and none matches."""
    return service(request).tenant_of(request)
