"""What this server serves and how it is doing: /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import memory_store as ms

from ..chat_service import ChatService
from ..protocol import ModelCard, ModelList
from . import service, tenant

router = APIRouter()


@router.get("/v1/models")
async def models(s: ChatService = Depends(service), _tenant: str = Depends(tenant)):
    return ModelList(data=[ModelCard(id=s.model_name, created=int(time.time()),
                                     max_model_len=s.s.max_model_len,
                                     memory=s.memory_card())])


@router.get("/health")
async def health(s: ChatService = Depends(service)):
    status = {"engine": "ok", "store": "ok"}
    code = 200
    try:
        await asyncio.wait_for(s.engine.check_health(), 5)
    except Exception as e:  # engine dead or wedged
        status["engine"] = f"error: {type(e).__name__}"
        code = 503
    try:
        await s.store.ping()
    except ms.StoreError as e:
        status["store"] = f"error: {e}"
        code = 503
    return JSONResponse({"status": "ok" if code == 200 else "degraded", **status,
                         "memory": s.engine.memory}, status_code=code)


@router.get("/metrics")
async def metrics(s: ChatService = Depends(service)):
    try:
        s.metrics.sessions.set(await s.store.count())
    except ms.StoreError:
        pass
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)
