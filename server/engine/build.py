"""Engine construction from the server's settings, and which adapter a server serves."""

from __future__ import annotations

import logging
from pathlib import Path

from ..settings import Settings

log = logging.getLogger("deltamem.server")

SHIPPED_ADAPTERS = Path(__file__).resolve().parents[2] / "deltamem" / "adapters"


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


def resolve_dtype(dtype: str) -> str:
    """The engine dtype for `auto`: bfloat16, except on a CPU without native bfloat16
    (AVX512-BF16 or AMX), where vLLM's bfloat16 linear layers fall back from oneDNN to kernels
    several times slower than float32 (measured ~7× on an AVX2-only EPYC); there, float32."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    chosen = "bfloat16" if native else "float32"
    log.info("dtype auto: %s (%s)", chosen, "this CPU has native bfloat16" if native else
             "this CPU has no native bfloat16 (AVX512-BF16, AMX); bfloat16 would run on slow "
             "fallback kernels")
    return chosen


def build_engine(settings: Settings):
    """Resolve the model and adapter, and start the engine (~25 s for the default model)."""
    from deltamem.model_fetch import resolve_model

    from .facade import DeltaMemEngine, EngineConfig

    model_dir = resolve_model(settings.model, settings.cache_dir)
    cfg = EngineConfig(
        model_dir=model_dir, adapter_dir=resolve_adapter(settings, model_dir),
        memory=not settings.no_memory, dtype=resolve_dtype(settings.dtype),
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_gib=settings.kv_cache_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager)
    return DeltaMemEngine.start(cfg)
