"""Async engine facade: token ids + sampling + initial state + write start in; a token stream,
finish reason, usage and the final state out. Also runs the bare backbone (memory off) for
baselines. It owns vLLM's AsyncLLM and hides its request plumbing from the server."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltamem.adapter import Adapter, AdapterError, backbone_fingerprint, load_adapter

from .model import EXTRA_ARGS_KEY, Ingest, decode_state, encode_state

log = logging.getLogger(__name__)

ARCH_MAP = {"LlamaForCausalLM": "DeltaMemLlamaForCausalLM",
            "Qwen3ForCausalLM": "DeltaMemQwen3ForCausalLM"}


class EngineError(RuntimeError):
    """The engine could not start or could not serve a request."""


def state_salt(prefix: str, adapter: str, write_start: int, state_blob: str | None) -> str:
    """vLLM cache salt of a δ-mem request: a prompt's K/V are a function of its tokens, its
    initial state and its write start (docs/design.md, invariant 3); the prefix keeps tenants
    apart."""
    h = hashlib.sha256()
    for part in (prefix, adapter, str(write_start), state_blob or "zero"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class EngineConfig:
    model_dir: Path
    adapter_dir: Path | None = None  # None with memory on: refuse (the server makes one)
    memory: bool = True
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # chunked-prefill budget per step
    kv_cache_gib: int = 2  # CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE, an integer)
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False  # True: no torch.compile (and no CUDA graphs)
    seed: int = 0
    speculative_config: dict | None = None
    extra_engine_args: dict = field(default_factory=dict)


@dataclass
class GenerationChunk:
    token_ids: list[int]  # new tokens since the previous chunk
    text: str  # new text since the previous chunk
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    final_state: torch.Tensor | None = None  # on the finished chunk, with memory on
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # asked-for positions
    block: tuple[int, torch.Tensor] | None = None  # state at the last KV block boundary
    cached_tokens: int | None = None  # prompt tokens served from vLLM's prefix cache
    # vLLM's log-probabilities where the sampling params ask for them: per new token, and per
    # prompt position on the first chunk ({token id: Logprob}; None at position 0).
    logprobs: list | None = None
    prompt_logprobs: list | None = None


def _compilation_settings(memory: bool, writes_messages: bool = False) -> dict:
    """vLLM's compilation settings for a compiled engine: its defaults, except

    - on CUDA with memory: the `deltamem::scan` op splits the graph as attention does, so a
      mixed batch runs it between the captured pieces, and a batch of one token per request
      replays it inside vLLM's full CUDA graph (its default FULL_AND_PIECEWISE mode): the op's
      torch path reads only buffers that `DeltaMemRuntime.begin_forward` refills before each
      step. An SSW adapter keeps piecewise graphs only: a one-token prefill chunk may end an
      ingest, whose message writes run in Python;
    - on the CPU (no CUDA graphs: vLLM traces the whole model once and the op stays opaque in
      it): vLLM 0.32.0 saves an AOT artifact it then fails to load ("'function' object has no
      attribute 'finalize_loading'") and compiles again at every start; without AOT, inductor's
      own cache serves a second start (measured 52 s against 104 s, eager 35 s). An operator's
      VLLM_USE_AOT_COMPILE wins.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        return {}
    if not memory:
        return {}
    from vllm.config import CompilationConfig

    ops = [*CompilationConfig._attention_ops, "vllm::unified_kv_cache_update",
           "vllm::unified_mla_kv_cache_update", "deltamem::scan"]
    return {"splitting_ops": ops,
            "cudagraph_mode": "PIECEWISE" if writes_messages else "FULL_AND_PIECEWISE"}


class DeltaMemEngine:
    """One vLLM AsyncLLM with (or without) δ-mem."""

    def __init__(self, llm, cfg: EngineConfig, adapter: Adapter | None, backbone,
                 adapter_fingerprint: str | None = None):
        self.llm = llm
        self.cfg = cfg
        self.adapter = adapter
        self.backbone = backbone
        self.state_shape = None
        # Hashed once: it covers every weight of the adapter (~13 MB for the default model's,
        # ~10 ms of sha256), and every request's cache salt needs it.
        self.adapter_fingerprint = adapter_fingerprint
        if adapter is not None and adapter_fingerprint is None:
            self.adapter_fingerprint = adapter.fingerprint()
        if adapter is not None:
            c = adapter.config
            self.state_shape = (len(c.layers), c.num_state_heads, c.rank, c.rank)

    @property
    def memory(self) -> bool:
        return self.adapter is not None

    @property
    def writes_messages(self) -> bool:
        """An SSW adapter: its requests need their ingests."""
        return self.memory and self.adapter.config.writes_messages

    @classmethod
    def start(cls, cfg: EngineConfig) -> DeltaMemEngine:
        """Build and start the engine (spawns vLLM's engine core; ~25 s for the default model).
        Must be called from a module guarded by `if __name__ == "__main__":` or a server."""
        from transformers import AutoConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if cfg.speculative_config:
            raise EngineError("speculative decoding is not supported with δ-mem: rejected "
                              "draft tokens would be written into the memory state")
        model_dir = Path(cfg.model_dir)
        hf_cfg = AutoConfig.from_pretrained(model_dir)
        backbone = backbone_fingerprint(model_dir)
        adapter = fingerprint = None
        overrides: dict = {}
        additional: dict = {}
        if cfg.memory:
            if cfg.adapter_dir is None:
                raise EngineError("memory on but no adapter given")
            adapter = load_adapter(cfg.adapter_dir, hf_cfg)
            try:
                adapter.check_backbone(backbone)
            except AdapterError as e:
                raise EngineError(str(e)) from e
            archs = [ARCH_MAP.get(a) for a in (hf_cfg.architectures or [])]
            if not archs or None in archs:
                raise EngineError(f"δ-mem supports {sorted(ARCH_MAP)}; the model is "
                                  f"{hf_cfg.architectures}")
            overrides = {"architectures": archs,
                         "deltamem_adapter": str(Path(cfg.adapter_dir).resolve())}
            # vLLM keys its compile cache on the engine config, not on hf_overrides: the
            # adapter's shapes (heads, rank, layers) are in the traced graph, so it must be in
            # the key.
            additional["deltamem_adapter"] = fingerprint = adapter.fingerprint()
        compilation = {} if cfg.enforce_eager else _compilation_settings(
            cfg.memory, adapter is not None and adapter.config.writes_messages)
        # Set per engine (not setdefault): a later engine in the same process gets its own size.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cfg.kv_cache_gib))
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            # A prefix-cache hit skips the forward, and so the writes and reads, of the cached
            # tokens: with memory, each request's cache salt holds its initial state, and the
            # plugin caps a hit to a point whose state the request knows (docs/design.md,
            # invariant 3).
            enable_prefix_caching=True,
            hf_overrides=overrides,  # a dict ({} with memory off), never None
            additional_config=additional,
            worker_extension_cls="server.engine.model.DeltaMemWorkerExtension",
            **({"compilation_config": compilation} if compilation else {}),
            **cfg.extra_engine_args,
        )
        log.info("starting vLLM engine: model=%s memory=%s adapter=%s", model_dir, cfg.memory,
                 fingerprint)
        llm = AsyncLLM.from_engine_args(args)
        return cls(llm, cfg, adapter, backbone, fingerprint)

    async def generate(self, prompt_token_ids: list[int], sampling_params,
                       initial_state: torch.Tensor | None = None, write_start: int = 0,
                       request_id: str | None = None, *,
                       known: dict[int, torch.Tensor] | None = None,
                       snap_at: tuple[int, ...] = (), cache_salt: str = "",
                       ingests: list[Ingest] | None = None, keep_state: bool = True
                       ) -> AsyncIterator[GenerationChunk]:
        """Stream one request. Stopping the iteration early aborts the request in vLLM.

        With memory: the prompt is written from `write_start` on, starting from
        `initial_state`; `known` gives the states at later prompt positions (a prefix-cache
        hit may resume there), `snap_at` the positions whose states come back on the last
        chunk (`snapshots`, and `block`, the last KV block boundary reached). `cache_salt`
        (e.g. the tenant) is combined with the initial state and write start into vLLM's
        cache salt, so only identical computations share KV blocks. An SSW adapter's request
        needs its `ingests` (which prompt tokens form which messages; a token-write adapter's
        takes none). They change the K/V too, but only the first block carries a salt: callers
        whose ingests are not a function of the tokens must salt apart (the server's are, in
        a session; sessionless requests it salts apart from sessions). `keep_state=False`:
        the caller has no use for the final state (a sessionless request), so the worker
        keeps none and no RPC fetches it."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        rid = request_id or uuid.uuid4().hex
        sp = sampling_params.clone()
        sp.output_kind = RequestOutputKind.DELTA
        salt = cache_salt
        if self.memory:
            for st in (initial_state, *(known or {}).values()):
                if st is not None and tuple(st.shape) != self.state_shape:
                    raise EngineError(f"a state has shape {tuple(st.shape)}, the adapter "
                                      f"needs {self.state_shape}")
            if self.writes_messages != (ingests is not None):
                raise EngineError("an SSW adapter's request needs its ingests"
                                  if self.writes_messages else
                                  "ingests given, but the adapter writes per token")
            blob = encode_state(initial_state)
            doc = None if ingests is None else [g.to_json() for g in ingests]
            sp.extra_args = {**(sp.extra_args or {}), EXTRA_ARGS_KEY: {
                "state": blob, "write_start": int(write_start), "key": rid,
                "known": {str(p): encode_state(t) for p, t in (known or {}).items()},
                "snap_at": [int(p) for p in snap_at], "ingests": doc, "keep": keep_state}}
            salt = state_salt(cache_salt, self.adapter_fingerprint, write_start, blob)
        finished = False
        completion = 0
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        if salt:
            prompt["cache_salt"] = salt
        try:
            async for out in self.llm.generate(prompt, sp, rid):
                c = out.outputs[0]
                completion += len(c.token_ids)
                chunk = GenerationChunk(list(c.token_ids), c.text, prompt_tokens=len(
                    prompt_token_ids), completion_tokens=completion, logprobs=c.logprobs,
                    prompt_logprobs=out.prompt_logprobs)
                if out.finished:
                    finished = True
                    chunk.finished = True
                    chunk.finish_reason = c.finish_reason or "stop"
                    chunk.cached_tokens = out.num_cached_tokens
                    if self.memory and keep_state:
                        # Absorbed, for a reply that ended (a state a session may commit):
                        # the prompt and every reply token but the last (invariant 5). The
                        # worker may have run past it, and kept the state there.
                        ended = chunk.finish_reason in ("stop", "length")
                        got = await self._take_state(rid, absorbed=len(prompt_token_ids)
                                                     + completion - 1 if ended else None)
                        chunk.final_state, chunk.snapshots, chunk.block = got
                yield chunk
        finally:
            if not finished:
                await self.llm.abort(rid)
                if self.memory and keep_state:  # drop whatever the worker kept for it
                    await self._take_state(rid, required=False)

    async def _take_state(self, rid: str, required: bool = True, absorbed: int | None = None):
        """(final state, {position: snapshot}, (block position, state) or None): the state
        after `absorbed` tokens (default: the worker's latest)."""
        positions = None if absorbed is None else {rid: absorbed}
        results = await self.llm.collective_rpc("deltamem_take_states", args=([rid], positions))
        got = results[0].get(rid) if results else None
        if got is None:
            if required:
                raise EngineError(f"no δ-mem state came back for request {rid}")
            return None
        if "missing" in got:
            raise EngineError(f"request {rid}: the worker ran to position {got['pos']} and no "
                              f"longer keeps the state at {got['missing']}, where the reply "
                              f"stopped")
        shape = tuple(got["shape"])
        snaps = {int(p): decode_state(b, shape) for p, b in got.get("snapshots", {}).items()}
        block = got.get("block")
        return (decode_state(got["state"], shape), snaps,
                None if block is None else (int(block[0]), decode_state(block[1], shape)))

    async def stats(self) -> dict:
        res = await self.llm.collective_rpc("deltamem_stats")
        return res[0] if res else {}

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
