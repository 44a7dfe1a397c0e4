"""`deltamem serve`: the API server with its engine and store."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .settings import Settings, add_arguments, from_args

log = logging.getLogger("deltamem.server")

SHIPPED_ADAPTERS = Path(__file__).resolve().parent.parent / "deltamem" / "adapters"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve the OpenAI-compatible API (/v1/chat/completions with session_id, /v1/models, "
        "/v1/sessions, /health, /metrics) on vLLM with δ-mem. Every flag can also be set by "
        "its DELTAMEM_* environment variable.")
    add_arguments(p)


def resolve_adapter(settings: Settings, model_dir: Path) -> Path | None:
    """The adapter to serve: the one asked for, else a shipped one made for this backbone,
    else an untrained one generated (once) into the data directory."""
    if settings.no_memory:
        return None
    if settings.adapter:
        return Path(settings.adapter)
    from deltamem.adapter import (
        backbone_fingerprint,
        load_adapter,
        new_adapter_from_checkpoint,
        save_adapter,
    )

    backbone = backbone_fingerprint(model_dir)
    if SHIPPED_ADAPTERS.is_dir():
        for cand in sorted(SHIPPED_ADAPTERS.iterdir()):
            if (cand / "adapter_config.json").is_file():
                ad = load_adapter(cand)
                if ad.backbone and ad.backbone.fingerprint == backbone.fingerprint:
                    log.info("using the shipped adapter %s", cand)
                    return cand
    out = Path(settings.data_dir) / "adapters" / f"untrained-{backbone.fingerprint[7:]}"
    if not (out / "adapter_config.json").is_file():
        save_adapter(new_adapter_from_checkpoint(model_dir, seed=0), out)
    log.warning("no trained adapter for this backbone: serving an UNTRAINED δ-mem adapter "
                "(%s); the memory will not carry facts until one is trained", out)
    return out


def build_engine(settings: Settings):
    from deltamem.model_fetch import resolve_model

    from .engine.facade import DeltaMemEngine, EngineConfig

    model_dir = resolve_model(settings.model, settings.cache_dir)
    cfg = EngineConfig(
        model_dir=model_dir, adapter_dir=resolve_adapter(settings, model_dir),
        memory=not settings.no_memory, dtype=settings.dtype,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_gib=settings.kv_cache_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization)
    return DeltaMemEngine.start(cfg)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = from_args(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=int(settings.port),
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=10)
    return 0
