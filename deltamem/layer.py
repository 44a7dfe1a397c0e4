"""δ-mem layer math, independent of HF and vLLM so that both runtimes share it.

Per wrapped attention layer (docs/design.md §1), x_t the attention input after the input RMSNorm:

    q̂ = L2norm(tanh(W_q x))   k̂ = L2norm(tanh(W_k x))   v̂ = W_v x   β = sigmoid(W_β x + b_β)
    m_t = S_{t-1} q̂_t                                      (read before write)
    S_t = diag(1-β) S_{t-1} + diag(β) (v̂ - S_{t-1} k̂) k̂ᵀ
    Δq = (α/r) B_q m_t  (added to q_proj's output)     Δo = (α/r) B_o m_t  (added to o_proj's)

All δ-mem arithmetic runs in float32 (the state's dtype) whatever the backbone's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .scan import delta_rule_scan

GRANULARITIES = ("token", "message_mean")
# The reference's initialisation constants (its HFDeltaMemConfig defaults, and the values of
# the released adapters): b_β's start, B_q/B_o's gain, how many read-out columns start from
# the backbone's W_Q/W_O; and the ε of its L2 normalisations.
BETA_BIAS_INIT = -1.5
ONLINE_GAIN = 0.05
BASE_SLICE_REF_WIDTH = 8
NORM_EPS = 1e-6


@dataclass
class DeltaMemConfig:
    rank: int = 8
    alpha: float = 16.0
    num_state_heads: int = 1  # MSW uses 4
    write_granularity: str = "token"  # "token" (TSW) or "message_mean" (SSW)
    delta_heads: tuple[str, ...] = ("q", "o")  # which projections get a correction
    target_layers: list[int] | None = None  # None = every attention layer
    state_update_mode: str = "standard"
    # Shapes of the backbone the adapter was made for (filled in by `for_backbone`).
    hidden_size: int = 0
    q_out_size: int = 0  # n_heads * head_dim
    num_layers: int = 0

    def __post_init__(self):
        self.delta_heads = tuple(self.delta_heads)
        if self.write_granularity not in GRANULARITIES:
            raise ValueError(f"write_granularity must be one of {GRANULARITIES}, "
                             f"got {self.write_granularity!r}")
        if self.state_update_mode != "standard":
            raise ValueError(f"only the 'standard' state update is supported, "
                             f"got {self.state_update_mode!r}")
        if self.num_state_heads < 1 or self.rank < 1:
            raise ValueError(f"num_state_heads and rank must be positive, got "
                             f"{self.num_state_heads} and {self.rank}")
        unknown = set(self.delta_heads) - {"q", "o"}
        if unknown:
            raise ValueError(f"unknown delta heads {sorted(unknown)}: only 'q' and 'o'")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def writes_messages(self) -> bool:
        """SSW: one write per chat message (its tokens' mean), not one per token."""
        return self.write_granularity == "message_mean"

    @property
    def mem_dim(self) -> int:
        return self.num_state_heads * self.rank

    @property
    def layers(self) -> list[int]:
        if self.target_layers is None:
            return list(range(self.num_layers))
        return sorted(self.target_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["delta_heads"] = list(self.delta_heads)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeltaMemConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def for_backbone(cls, hf_config, **kw) -> DeltaMemConfig:
        """Fill the backbone shapes from an HF config (Llama / Qwen3 family)."""
        head_dim = getattr(hf_config, "head_dim", None) or (
            hf_config.hidden_size // hf_config.num_attention_heads)
        return cls(hidden_size=hf_config.hidden_size,
                   q_out_size=hf_config.num_attention_heads * head_dim,
                   num_layers=hf_config.num_hidden_layers, **kw)


def unit_key(p: torch.Tensor) -> torch.Tensor:
    """q̂ or k̂ from its projection, (..., r): L2norm(tanh(p))."""
    return nn.functional.normalize(torch.tanh(p), dim=-1, eps=NORM_EPS)


def activations(p: torch.Tensor) -> torch.Tensor:
    """q̂, k̂, v̂, β from the stacked projections with their bias, (N, 4, H, r) both, as the
    engine's runtime holds them (the CPU kernel applies the same ones itself)."""
    return torch.cat([unit_key(p[:, :2]), p[:, 2:3], torch.sigmoid(p[:, 3:4])], dim=1)


@dataclass
class MemoryProjections:
    q: torch.Tensor  # (..., H_s, r), L2-normalised
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor  # in (0, 1)


class DeltaMemLayer(nn.Module):
    """The δ-mem parameters of one attention layer and the math on them."""

    def __init__(self, cfg: DeltaMemConfig):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.hidden_size, cfg.mem_dim
        self.w_q = nn.Linear(d, m, bias=False)
        self.w_k = nn.Linear(d, m, bias=False)
        self.w_v = nn.Linear(d, m, bias=False)
        self.w_beta = nn.Linear(d, m, bias=True)
        self.b_q = nn.Linear(m, cfg.q_out_size, bias=False) if "q" in cfg.delta_heads else None
        self.b_o = nn.Linear(m, d, bias=False) if "o" in cfg.delta_heads else None

    @torch.no_grad()
    def reset_parameters(self, w_q_backbone: torch.Tensor | None = None,
                         w_o_backbone: torch.Tensor | None = None) -> None:
        """The reference initialisation (docs/design.md §1, the reference's
        `output_init="base_slice_fixed"`): B_q's and B_o's first min(BASE_SLICE_REF_WIDTH, r)
        columns are ONLINE_GAIN × the column-normalised first columns of the backbone's W_Q
        and W_O, and every other column is zero, so with H > 1 only the first state head
        reads out at the start (the others learn their read-out from zero)."""
        for lin in (self.w_q, self.w_k, self.w_v):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
        nn.init.zeros_(self.w_beta.weight)
        nn.init.constant_(self.w_beta.bias, BETA_BIAS_INIT)
        for b, w in ((self.b_q, w_q_backbone), (self.b_o, w_o_backbone)):
            if b is None:
                continue
            if w is None:
                nn.init.normal_(b.weight, std=0.02)
                continue
            width = min(BASE_SLICE_REF_WIDTH, self.cfg.rank, w.shape[1])
            cols = w[:, :width].float()
            b.weight.zero_()
            # The reference's F.normalize(cols, dim=0, eps=1e-6) * gain, up to rounding; in
            # this order the one-head rank-8 initialisation is bit for bit what it was before
            # the other heads' columns were left at zero.
            b.weight[:, :width] = ONLINE_GAIN * cols / cols.norm(dim=0, keepdim=True).clamp_min(
                NORM_EPS)

    def project(self, x: torch.Tensor) -> MemoryProjections:
        """x (..., d) in any dtype -> q̂, k̂, v̂, β as float32 (..., H_s, r)."""
        x = x.to(self.w_q.weight.dtype)
        shape = (*x.shape[:-1], self.cfg.num_state_heads, self.cfg.rank)
        k = unit_key(self.w_k(x).view(shape))
        v = self.w_v(x).view(shape)
        beta = torch.sigmoid(self.w_beta(x)).view(shape)
        return MemoryProjections(self.project_q(x), k, v, beta)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """The read queries q̂ alone, (..., H_s, r) float32 (SSW's tokens only read)."""
        x = x.to(self.w_q.weight.dtype)
        shape = (*x.shape[:-1], self.cfg.num_state_heads, self.cfg.rank)
        return unit_key(self.w_q(x).view(shape))

    def delta_q(self, reads: torch.Tensor) -> torch.Tensor | None:
        """reads (..., H_s, r) -> Δq (..., n_heads*head_dim) in float32, or None."""
        if self.b_q is None:
            return None
        return self.cfg.scale * self.b_q(reads.flatten(-2).to(self.b_q.weight.dtype))

    def delta_o(self, reads: torch.Tensor) -> torch.Tensor | None:
        if self.b_o is None:
            return None
        return self.cfg.scale * self.b_o(reads.flatten(-2).to(self.b_o.weight.dtype))

    def scan_tokens(self, p: MemoryProjections, state: torch.Tensor,
                    write_mask: torch.Tensor | None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """TSW over a padded batch: p (B, T, H_s, r), state (B, H_s, r, r). `backend` is
        delta_rule_scan's."""
        return delta_rule_scan(p.q, p.k, p.v, p.beta, state, write_mask, backend=backend)

    def scan_messages(self, x: torch.Tensor, q, state: torch.Tensor,
                      message_ids: torch.Tensor, write_mask: torch.Tensor | None = None,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """SSW, as the reference runs it: one write per message, of the mean-pooled x of its
        tokens, and every token of the forward reads the state from before the forward.

        x (B, T, d); q the tokens' read queries (B, T, H_s, r) (or their MemoryProjections);
        message_ids (B, T) int, -1 for tokens that write nothing (system prompt, generation
        prompt, padding); write_mask (B, T) bool or None, False also writes nothing. The
        messages are written in the order of their ids (one write each, of the tokens of it
        this forward holds), after every token has read. `backend` is delta_rule_scan's (for
        the scan over messages). Returns (reads (B, T, H_s, r), final state).
        """
        q = q.q if isinstance(q, MemoryProjections) else q
        s = state.to(q.dtype)
        reads = torch.einsum("bhij,bthj->bthi", s, q)
        active = message_ids >= 0
        if write_mask is not None:
            active = active & write_mask.to(torch.bool)
        if not bool(active.any()):
            return reads, s.clone()
        n_msg = int(message_ids[active].max().item()) + 1
        idx = message_ids.clamp(0, n_msg - 1)
        onehot = nn.functional.one_hot(idx, n_msg).to(x.dtype) * active.unsqueeze(-1).to(x.dtype)
        counts = onehot.sum(1)  # (B, n_msg)
        pooled = torch.einsum("btm,btd->bmd", onehot, x) / counts.clamp_min(1).unsqueeze(-1)
        pm = self.project(pooled)
        _, final = delta_rule_scan(pm.q, pm.k, pm.v, pm.beta, s, counts > 0, backend=backend)
        return reads, final


class DeltaMem(nn.Module):
    """All δ-mem layers of one adapter, keyed by backbone layer index."""

    def __init__(self, cfg: DeltaMemConfig):
        super().__init__()
        if not (cfg.hidden_size and cfg.q_out_size and cfg.num_layers):
            raise ValueError("DeltaMemConfig needs the backbone shapes (use for_backbone)")
        self.cfg = cfg
        self.layers = nn.ModuleDict({str(i): DeltaMemLayer(cfg) for i in cfg.layers})

    def layer(self, i: int) -> DeltaMemLayer | None:
        return self.layers[str(i)] if str(i) in self.layers else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_state(self, batch: int | None = None, device=None) -> torch.Tensor:
        """The state of all wrapped layers: (L, H_s, r, r), or (B, L, H_s, r, r)."""
        shape = (len(self.cfg.layers), self.cfg.num_state_heads, self.cfg.rank, self.cfg.rank)
        if batch is not None:
            shape = (batch, *shape)
        return torch.zeros(shape, dtype=torch.float32, device=device)

