"""The API, one router per area: chat completions, sessions, and the server's status (models,
health, metrics). Handlers are module-level functions; what they share comes in through the
dependencies below."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request

from ..chat_service import ChatService

log = logging.getLogger("deltamem.server")


def service(request: Request) -> ChatService:
    """The app's chat service (built by the app's lifespan)."""
    return request.app.state.svc


def tenant(request: Request) -> str:
    """The caller's tenant, from its API key; 401 when keys are set and none matches."""
    return service(request).tenant_of(request)


# --- running a turn for an HTTP request (chat completions and responses alike) ------------


async def finish_unless_gone(request: Request, task: asyncio.Task, what: str) -> bool:
    """Wait for `task`; True when it finished. A client that goes away first aborts it
    (nothing is committed) and gives False."""
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            log.info("client disconnected; %s aborted", what)
            return False
    return True


async def queued(queue: asyncio.Queue, task: asyncio.Task) -> AsyncIterator:
    """What `task` puts on `queue` while it runs, then what it left there when it ended."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        return
