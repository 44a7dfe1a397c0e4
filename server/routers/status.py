"""What this server serves and how it is doing: /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import memory_store as ms

from ..chat_service import ChatService
from ..protocol import ModelCard, ModelList
from . import service, tenant

log = logging.getLogger("deltamem.server")
router = APIRouter()


@router.get("/v1/models")
async def models(s: ChatService = Depends(service), _tenant: str = Depends(tenant)):
    return ModelList(data=[ModelCard(id=s.model_name, created=int(time.time()),
                                     max_model_len=s.s.max_model_len,
                                     memory=s.memory_card())])


@router.get("/health")
async def health(s: ChatService = Depends(service)):
    """Liveness for load balancers: the status of the engine and the store, no details (the
    reasons go to the log, where an operator reads them and a passer-by does not)."""
    status = {"engine": "ok", "store": "ok"}
    code = 200
    try:
        await asyncio.wait_for(s.engine.check_health(), 5)
    except Exception as e:  # engine dead or wedged
        log.error("health: engine check failed: %r", e)
        status["engine"] = "error"
        code = 503
    try:
        await s.store.ping()
    except ms.StoreError as e:
        log.error("health: store check failed: %s", e)
        status["store"] = "error"
        code = 503
    return JSONResponse({"status": "ok" if code == 200 else "degraded", **status,
                         "memory": s.engine.memory}, status_code=code)


@router.get("/metrics")
async def metrics(s: ChatService = Depends(service)):
    """Prometheus metrics of this process. The number of stored sessions is shown only on a
    server without API keys: with keys it would tell every caller about all tenants."""
    await s.refresh_session_count()
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)
