"""δ-mem on an HF transformers model (Llama, Qwen3): the reference runtime.

It is the oracle the vLLM engine is tested against and the runtime training runs on. Each
wrapped layer's q_proj and o_proj are replaced by thin modules: q_proj's input is exactly the
δ-mem x_t (the normed attention input), so the q_proj wrapper projects, runs the scan with the
layer's state and adds Δq (before q_norm and RoPE, which HF applies after q_proj); the o_proj
wrapper adds Δo from the same reads. SSW adapters read and write as the reference does
(`DeltaMemHF.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import Adapter
from .layer import DeltaMemLayer
from .scan import BACKENDS


class _Context:
    """Per-forward inputs and outputs of the wrappers (one per runtime)."""

    def __init__(self):
        self.active = False
        self.states: list[torch.Tensor] = []  # per wrapped layer, (B, H_s, r, r)
        self.write_mask: torch.Tensor | None = None  # (B, T) bool
        self.message_ids: torch.Tensor | None = None  # (B, T) for SSW
        self.scan_backend = "auto"  # delta_rule_scan's backend, set by the runtime per forward
        self.reads: dict[int, torch.Tensor] = {}


class _ProjWithMemory(nn.Module):
    """A backbone projection plus one δ-mem correction (the base stays frozen)."""

    def __init__(self, base: nn.Module, mem: DeltaMemLayer, slot: int, ctx: _Context):
        super().__init__()
        self.base, self.slot = base, slot
        self._mem = [mem]  # a list keeps the adapter's parameters out of the backbone's
        self._ctx = ctx

    @property
    def weight(self):  # HF code and our init read q_proj.weight / o_proj.weight
        return self.base.weight


class _QProjWithMemory(_ProjWithMemory):
    def forward(self, x):
        out = self.base(x)
        ctx = self._ctx
        if not ctx.active:
            return out
        mem = self._mem[0]
        if mem.cfg.writes_messages:
            reads, state = mem.scan_messages(x, mem.project_q(x), ctx.states[self.slot],
                                             ctx.message_ids, ctx.write_mask,
                                             backend=ctx.scan_backend)
        else:
            reads, state = mem.scan_tokens(mem.project(x), ctx.states[self.slot],
                                           ctx.write_mask, backend=ctx.scan_backend)
        ctx.states[self.slot] = state
        ctx.reads[self.slot] = reads
        dq = mem.delta_q(reads)
        return out if dq is None else out + dq.to(out.dtype)


class _OProjWithMemory(_ProjWithMemory):
    def forward(self, y):
        out = self.base(y)
        ctx = self._ctx
        if not ctx.active:
            return out
        do = self._mem[0].delta_o(ctx.reads.pop(self.slot))
        return out if do is None else out + do.to(out.dtype)


@dataclass
class RunResult:
    tokens: list[int]  # generated tokens (the last one has not been through the model)
    prompt_logits: torch.Tensor  # (T, vocab) float32 logits over the prompt
    step_logits: list[torch.Tensor]  # logits that chose each generated token
    final_state: torch.Tensor  # (L, H_s, r, r) float32
    finish_reason: str  # "stop" or "length"


class DeltaMemHF:
    """An HF causal LM with a δ-mem adapter attached.

    `scan_backend` is the backend of every scan it runs (deltamem.scan.delta_rule_scan's:
    "auto", "chunked", "reference", "cpu_kernel"); the trainer asks for "chunked"."""

    def __init__(self, model, adapter: Adapter, scan_backend: str = "auto"):
        self.model = model
        self.adapter = adapter
        self.ctx = _Context()
        self.scan_backend = scan_backend
        cfg = adapter.config
        for p in model.parameters():
            p.requires_grad_(False)
        self.layer_ids = cfg.layers
        for slot, i in enumerate(self.layer_ids):
            attn = model.model.layers[i].self_attn
            mem = adapter.module.layer(i)
            attn.q_proj = _QProjWithMemory(attn.q_proj, mem, slot, self.ctx)
            attn.o_proj = _OProjWithMemory(attn.o_proj, mem, slot, self.ctx)
        adapter.module.to(self.device)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, adapter: Adapter | None = None,
                        dtype=torch.float32, device: str | torch.device = "cpu",
                        scan_backend: str = "auto", **adapter_kw) -> DeltaMemHF:
        from transformers import AutoModelForCausalLM

        from .adapter import backbone_fingerprint, new_adapter

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.eval()
        if adapter is None:  # initialised from the backbone's weights while both are on the CPU
            adapter = new_adapter(model, backbone_fingerprint(model_dir), **adapter_kw)
        return cls(model.to(device), adapter, scan_backend=scan_backend)

    @property
    def scan_backend(self) -> str:
        return self._scan_backend

    @scan_backend.setter
    def scan_backend(self, backend: str) -> None:
        if backend not in BACKENDS:  # refused here, not at the first forward
            raise ValueError(f"unknown scan backend {backend!r}: one of {', '.join(BACKENDS)}")
        self._scan_backend = backend

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        c = self.adapter.config
        return (len(self.layer_ids), c.num_state_heads, c.rank, c.rank)

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                write_mask: torch.Tensor | None = None, message_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None,
                memory: bool = True, position_ids: torch.Tensor | None = None):
        """One forward over (B, T) tokens. Returns (logits, final_state (B, L, H_s, r, r),
        HF output). Differentiable through the state (training) when grad is enabled.

        A token writes where `write_mask` is True (all, when None). SSW adapters
        (`message_mean`) also need `message_ids` (B, T) for a forward that writes: -1 for
        tokens outside any message, else the message's number; every token then reads the
        state from before this forward and each message's mean is written, in order, at its
        end (the reference's semantics). A token-write fallback, which the reference takes
        when it is given no message ids, is refused rather than run silently."""
        B, T = input_ids.shape
        dev = input_ids.device
        if state is None:
            state = torch.zeros((B, *self.state_shape), device=dev)
        if memory and self.adapter.config.writes_messages \
                and message_ids is None:
            if write_mask is None or bool(write_mask.any()):
                raise ValueError("an SSW (message_mean) adapter writes per message: a forward "
                                 "that writes needs message_ids")
            message_ids = torch.full((B, T), -1, dtype=torch.long, device=dev)
        ctx = self.ctx
        ctx.active = memory
        ctx.states = [state[:, j].float() for j in range(len(self.layer_ids))]
        ctx.write_mask, ctx.message_ids, ctx.reads = write_mask, message_ids, {}
        ctx.scan_backend = self.scan_backend
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             use_cache=past_key_values is not None)
        finally:
            ctx.active = False
        final = torch.stack(ctx.states, dim=1) if memory else state
        ctx.states = []
        return out.logits, final, out

    @torch.no_grad()
    def run(self, prompt_ids: list[int], initial_state: torch.Tensor | None = None,
            write_start: int = 0, max_new_tokens: int = 0, eos_token_ids=(),
            memory: bool = True, message_ids: list[int] | None = None) -> RunResult:
        """Serve one request the way the engine does: the prompt with writes from
        `write_start` on, then greedy decoding; each generated token but the last is fed
        back (and written).

        SSW adapters as the reference's session runtime serves them: `message_ids` (one per
        prompt token, -1 for tokens outside any message) say what the prompt writes; the
        whole prompt reads the initial state and its messages are written at its end; each
        generated token fed back is then written as a one-token message of its own."""
        from transformers import DynamicCache

        dev = self.device
        ids = torch.tensor([prompt_ids], device=dev)
        state = None if initial_state is None else initial_state.unsqueeze(0).to(dev)
        T = len(prompt_ids)
        mask = (torch.arange(T, device=dev) >= write_start).unsqueeze(0)
        ssw = self.adapter.config.writes_messages
        mids = None
        if message_ids is not None:
            if len(message_ids) != T:
                raise ValueError(f"message_ids has {len(message_ids)} entries for {T} prompt "
                                 "tokens")
            mids = torch.tensor([message_ids], dtype=torch.long, device=dev)
        next_message = max([-1, *(message_ids or [])]) + 1
        cache = DynamicCache()
        logits, state, _ = self.forward(ids, state, mask, message_ids=mids,
                                        past_key_values=cache, memory=memory)
        prompt_logits = logits[0].float()
        tokens, step_logits = [], []
        nxt_logits = logits[0, -1].float()
        finish = "length"
        pos = T
        for step in range(max_new_tokens):
            tok = int(nxt_logits.argmax())
            tokens.append(tok)
            step_logits.append(nxt_logits)
            if tok in eos_token_ids:
                finish = "stop"
                break
            if step == max_new_tokens - 1:
                break
            m = torch.tensor([[pos >= write_start]], device=dev)
            step_mids = None
            if ssw:
                step_mids = torch.tensor([[next_message]], device=dev)
                next_message += 1
            logits, state, _ = self.forward(torch.tensor([[tok]], device=dev), state, m,
                                            message_ids=step_mids, past_key_values=cache,
                                            memory=memory)
            nxt_logits = logits[0, -1].float()
            pos += 1
        return RunResult(tokens, prompt_logits, step_logits, state[0].float(), finish)
