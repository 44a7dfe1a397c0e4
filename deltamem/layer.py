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
        """The reference initialisation (docs/design.md §1)."""
        for lin in (self.w_q, self.w_k, self.w_v):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
        nn.init.zeros_(self.w_beta.weight)
        nn.init.constant_(self.w_beta.bias, -1.5)
        m = self.cfg.mem_dim
        for b, w in ((self.b_q, w_q_backbone), (self.b_o, w_o_backbone)):
            if b is None:
                continue
            if w is None:
                nn.init.normal_(b.weight, std=0.02)
                continue
            cols = w[:, :m].float()
            b.weight.copy_(0.05 * cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def project(self, x: torch.Tensor) -> MemoryProjections:
        """x (..., d) in any dtype -> q̂, k̂, v̂, β as float32 (..., H_s, r)."""
        x = x.to(self.w_q.weight.dtype)
        shape = (*x.shape[:-1], self.cfg.num_state_heads, self.cfg.rank)
        q = nn.functional.normalize(torch.tanh(self.w_q(x)).view(shape), dim=-1)
        k = nn.functional.normalize(torch.tanh(self.w_k(x)).view(shape), dim=-1)
        v = self.w_v(x).view(shape)
        beta = torch.sigmoid(self.w_beta(x)).view(shape)
        return MemoryProjections(q, k, v, beta)

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

    def scan_messages(self, x: torch.Tensor, p: MemoryProjections, state: torch.Tensor,
                      message_ids: torch.Tensor,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """SSW: one write per message, of the mean-pooled x of its tokens.

        x (B, T, d); message_ids (B, T) int, increasing along T, -1 for tokens that write
        nothing (system prompt, padding). Each token reads the state as it was before its own
        message's write. `backend` is delta_rule_scan's (for the scan over messages).
        """
        B, T, _ = x.shape
        H, r = self.cfg.num_state_heads, self.cfg.rank
        n_msg = int(message_ids.max().item()) + 1 if message_ids.numel() else 0
        if n_msg <= 0:
            s = state.to(p.q.dtype)
            return torch.einsum("bhij,bthj->bthi", s, p.q), s.clone()
        valid = message_ids >= 0
        idx = message_ids.clamp_min(0)
        onehot = nn.functional.one_hot(idx, n_msg).to(x.dtype) * valid.unsqueeze(-1).to(x.dtype)
        counts = onehot.sum(1)  # (B, n_msg)
        pooled = torch.einsum("btm,btd->bmd", onehot, x) / counts.clamp_min(1).unsqueeze(-1)
        pm = self.project(pooled)
        write = counts > 0
        # Read the state before each message's write: scan over messages with the r basis
        # vectors as queries gives the state's columns (messages are few, so ×r is cheap).
        eye = torch.eye(r, dtype=pm.q.dtype, device=x.device)
        s = state.to(p.q.dtype)
        rep = lambda t: t.repeat_interleave(r, dim=0)  # noqa: E731
        q_basis = eye.view(r, 1, 1, r).expand(r, n_msg, H, r).repeat(B, 1, 1, 1)
        reads_b, final = delta_rule_scan(q_basis, rep(pm.k), rep(pm.v), rep(pm.beta),
                                         rep(s), rep(write), backend=backend)
        # reads_b[(b, c), m, h, :] = S_{m-1}[b, h] e_c  -> states_before[b, m, h, :, c]
        states_before = reads_b.view(B, r, n_msg, H, r).permute(0, 2, 3, 4, 1)
        final = final.view(B, r, H, r, r)[:, 0]
        s_tok = torch.gather(
            states_before, 1,
            idx.view(B, T, 1, 1, 1).expand(B, T, H, r, r))  # (B, T, H, r, r)
        # Tokens that write nothing read the state before the next written message; for the
        # usual layout (system prompt first) that is the initial state.
        s_tok = torch.where(valid.view(B, T, 1, 1, 1), s_tok, s.unsqueeze(1))
        reads = torch.einsum("bthij,bthj->bthi", s_tok, p.q)
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

