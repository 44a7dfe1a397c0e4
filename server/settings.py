"""One settings object for the server: flags, environment variables (DELTAMEM_*), defaults.

Precedence: command-line flag > environment variable > default. Every field is a flag
(`--field-name`) and an environment variable (`DELTAMEM_FIELD_NAME`); `REDIS_URL` is accepted
too, as container platforms set it.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DELTAMEM_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    model: str | None = Field(None, description="backbone folder (default: the fetched "
                              "SmolLM2-135M-Instruct)")
    cache_dir: Path | None = Field(None, description="model cache (default: "
                                   "$DELTAMEM_CACHE_DIR or ~/.cache/deltamem)")
    served_model_name: str | None = Field(None, description="model id in the API (default: "
                                          "derived from the backbone folder)")
    adapter: str | None = Field(None, description="δ-mem adapter folder (default: the shipped "
                                "adapter for the default model, else an untrained one)")
    no_memory: bool = Field(False, description="serve the bare backbone (the baseline): no "
                            "δ-mem state, sessions keep only their transcript")
    data_dir: Path = Field(Path("data"), description="data directory (embedded store, "
                           "generated adapters)")
    redis_url: str | None = Field(None, validation_alias=AliasChoices(
        "DELTAMEM_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis URL for the session store (default: embedded SQLite in --data-dir)")
    session_ttl_seconds: int | None = Field(None, description="expire sessions idle this many "
                                               "seconds (Redis and SQLite)")
    keep_versions: int = Field(5, description="session versions kept for rollback")
    memory_window_tokens: int = Field(1024, ge=-1, description="most transcript tokens kept "
                                      "in the prompt: the window's start stays put (its K/V "
                                      "reused) until it holds more, then jumps to half (0: "
                                      "state only, -1: everything that fits)")
    max_model_len: int = Field(8192, description="context length of the engine")
    dtype: str = Field("auto", description="engine dtype: auto (bfloat16, or float32 on a CPU "
                       "without native bfloat16, where bfloat16 runs on slow fallback "
                       "kernels), bfloat16, float32, float16")
    enforce_eager: bool = Field(False, description="run the model eagerly: no torch.compile "
                                "and no CUDA graphs (start-up ~1 min faster, serving slower)")
    max_num_seqs: int = Field(128, description="concurrent sequences in the engine (128: "
                              "vLLM's own OpenAI server's default on the CPU)")
    max_num_batched_tokens: int | None = Field(None, description="tokens per engine step "
                                               "(chunked prefill budget)")
    kv_cache_gib: int = Field(4, description="CPU KV cache size in GiB")
    gpu_memory_utilization: float = Field(0.5, description="fraction of accelerator memory")
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted API key (repeat "
                               "the flag for several; env: comma-separated)")
    allow_open: bool = Field(False, description="serve without API keys on an address other "
                             "than loopback (anyone who reaches the port can then read and "
                             "delete every session); without it such a server refuses to "
                             "start")
    api_key_file: Path | None = Field(None, description="file with one API key per line")
    max_body_bytes: int = Field(1_000_000, description="largest request body accepted")
    max_messages: int = Field(256, description="most messages in one request")
    max_session_tokens: int = Field(1_000_000, ge=0, description="most tokens one session "
                                    "may hold (transcript and the turn's max_tokens); a "
                                    "session at the limit refuses new turns (0: no limit)")
    max_sessions_per_tenant: int = Field(100_000, ge=0, description="most sessions one tenant "
                                         "(API key) may keep; new ones are refused with 429 "
                                         "(0: no limit)")
    max_tokens_limit: int = Field(4096, description="largest max_tokens accepted")
    default_max_tokens: int = Field(512, description="max_tokens when the request sets none")
    session_lock_timeout: float = Field(10.0, description="seconds a turn waits for another "
                                        "turn on the same session before 409")
    log_level: str = Field("INFO", description="log level")

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    def keys(self) -> dict[str, str]:
        """Accepted API keys -> tenant id (a hash, so keys never reach the store)."""
        keys = list(self.api_key)
        if self.api_key_file:
            # Blank lines and comments (a line whose first non-blank character is #) skipped.
            keys += [ln.strip() for ln in self.api_key_file.read_text().splitlines()
                     if ln.strip() and not ln.strip().startswith("#")]
        return {k: "k" + hashlib.sha256(k.encode()).hexdigest()[:24] for k in keys}


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serves_open(settings: Settings) -> bool:
    """Listening beyond this machine with no API key: anyone who reaches the port is in."""
    return settings.host not in LOOPBACK and not settings.keys()


def exposure_problem(settings: Settings) -> str | None:
    """Why this server must not start as configured: serving open, unless the operator said
    so (--allow-open). None when it may start."""
    if settings.allow_open or not serves_open(settings):
        return None
    return (f"refusing to serve on {settings.host} without an API key: anyone who reaches the "
            "port could list, read and delete every session. Set --api-key / DELTAMEM_API_KEY "
            "(or --api-key-file), listen on 127.0.0.1, or pass --allow-open "
            "(DELTAMEM_ALLOW_OPEN=true) to serve without authentication on purpose")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per settings field, with its description and environment variable."""
    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"DELTAMEM_{name.upper()}" + (" or REDIS_URL" if name == "redis_url" else "")
        default = f.default if f.default_factory is None else f.default_factory()
        help_ = f"{f.description} [env {env}; default: {default}]"
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=help_)
        elif name == "api_key":
            p.add_argument(flag, dest=name, action="append", default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, default=None, help=help_)


def from_args(args: argparse.Namespace) -> Settings:
    given = {k: getattr(args, k) for k in Settings.model_fields
             if getattr(args, k, None) is not None}
    return Settings(**given)
