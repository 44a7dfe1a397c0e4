"""The δ-mem delta-rule scan: a per-token reference loop, a chunked fast path and a
compiled CPU kernel, behind one dispatcher whose backend is an argument.

Contract (shared by every implementation):

    reads, final_state = delta_rule_scan(q, k, v, beta, initial_state, write_mask=None,
                                         backend="auto")

    q, k, v, beta   (B, T, H, r); q, k already L2-normalised; beta in (0, 1)
    initial_state   (B, H, r, r); S maps keys to values, read = S @ q
    write_mask      (B, T) bool or None; a False token reads but does not write
    reads[b, t, h]  = S_{t-1} q_t                                   (read before write)
    S_t             = diag(1-β_t) S_{t-1} + diag(β_t) (v_t - S_{t-1} k_t) k_tᵀ

Computed in float32 (float64 when given float64) whatever the input dtype.

How the fast path works. Row i of S evolves on its own (β is one gate per row):

    s_t = a_t s_{t-1} + δ_t k_tᵀ,   a_t = 1 - β_t,   δ_t = β_t (v_t - s_{t-1}·k_t)

Inside a chunk of C tokens with start state s_0 and γ_t = a_1⋯a_t,
    s_{t-1}·k_t = γ_{t-1} s_0·k_t + Σ_{j<t} (γ_{t-1}/γ_j) δ_j (k_j·k_t)
so the δ of a chunk solve one unit lower-triangular C×C system (the "UT transform" of
DeltaNet), and δ is affine in s_0: δ = X - Y s_0ᵀ. Then the chunk's end state is affine in
s_0 too (s_C = s_0 M + c), the states at chunk boundaries follow from a loop over chunks
(T/C steps of one tiny matmul), and every read is one more batched matmul. Decay ratios are
formed as exp(log γ_a - log γ_b) with a ≥ b only, so nothing overflows.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Chunk length: on the CPU the chunked path is memory-bound in its C×C blocks (16 is best);
# on a GPU it is launch-bound in the loop over chunks (64 is best: 2.3 ms for T = 2,048 ×
# 30 rows on an H200, against 5.7 ms at 16).
DEFAULT_CHUNK = {"cpu": 16}
DEFAULT_CHUNK_ACCELERATOR = 64


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q, k, v, beta, initial_state, write_mask):
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, r), got {tuple(q.shape)}")
    B, T, H, r = q.shape
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if tuple(x.shape) != (B, T, H, r):
            raise ValueError(f"{name} must be {(B, T, H, r)}, got {tuple(x.shape)}")
    if tuple(initial_state.shape) != (B, H, r, r):
        raise ValueError(f"initial_state must be {(B, H, r, r)}, got {tuple(initial_state.shape)}")
    if write_mask is not None and tuple(write_mask.shape) != (B, T):
        raise ValueError(f"write_mask must be {(B, T)}, got {tuple(write_mask.shape)}")


def random_inputs(B, T, H, r, dtype=torch.float64, seed=0, masked=True, device="cpu"):
    """Random scan inputs that satisfy the contract (for tests and benchmarks): normalised
    q and k, β in (0.01, 0.99), a random initial state, a write mask with ~30% False."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, r, generator=g, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, r, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, r, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, r, generator=g, dtype=dtype) * 0.98 + 0.01
    s0 = torch.randn(B, H, r, r, generator=g, dtype=dtype)
    mask = (torch.rand(B, T, generator=g) > 0.3) if masked else None
    return [None if x is None else x.to(device) for x in (q, k, v, beta, s0, mask)]


def random_pool_step(lens, N, rows=None, H=2, r=8, dtype=torch.float64, seed=0,
                     device="cpu"):
    """A random step in the engine's pool layout (for tests and benchmarks), the inputs of
    `delta_rule_scan_varlen`: len(lens) sequences back to back, each at a random row of a pool
    of `rows` rows (default len(lens) + 2), then padding up to N tokens at the zero row
    (rows - 2) with writes off, as a CUDA graph's batch is padded; the last row is the spare.
    Returns (per-sequence `random_inputs`, each sequence's row, [q, k, v, beta, mask,
    token rows], pool)."""
    rows = len(lens) + 2 if rows is None else rows
    seqs = [random_inputs(1, n, H, r, dtype=dtype, seed=seed + i) for i, n in enumerate(lens)]
    g = torch.Generator().manual_seed(seed)
    at = torch.randperm(rows - 2, generator=g)[:len(lens)].tolist()
    pad = N - sum(lens)
    noise = torch.rand(pad, H, r, generator=g, dtype=dtype)

    def flat(i, fill):
        return torch.cat([s[i][0] for s in seqs] + [fill])

    tok_rows = torch.cat([torch.full((n,), a) for n, a in zip(lens, at, strict=True)]
                         + [torch.full((pad,), rows - 2)])
    pool = torch.zeros(rows, H, r, r, dtype=dtype)
    for s, a in zip(seqs, at, strict=True):
        pool[a] = s[4][0]
    step = [flat(0, noise), flat(1, noise), flat(2, noise), flat(3, noise),
            flat(5, torch.zeros(pad, dtype=torch.bool)), tok_rows]
    return seqs, at, [x.to(device) for x in step], pool.to(device)


def delta_rule_scan_reference(q, k, v, beta, initial_state, write_mask=None):
    """The per-token loop, written as the equations read. The oracle for the fast path."""
    _check(q, k, v, beta, initial_state, write_mask)
    dt = _compute_dtype(initial_state)
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    S = initial_state.to(dt).clone()
    B, T, H, r = q.shape
    reads = q.new_empty(B, T, H, r)
    for t in range(T):
        reads[:, t] = (S @ q[:, t].unsqueeze(-1)).squeeze(-1)
        kt = k[:, t]  # (B, H, r)
        bt = beta[:, t]
        if write_mask is not None:
            bt = bt * write_mask[:, t, None, None].to(dt)
        pred = (S @ kt.unsqueeze(-1)).squeeze(-1)  # S_{t-1} k_t, (B, H, r)
        delta = bt * (v[:, t] - pred)
        S = (1 - bt).unsqueeze(-1) * S + delta.unsqueeze(-1) * kt.unsqueeze(-2)
    return reads, S


def delta_rule_scan_chunked(q, k, v, beta, initial_state, write_mask=None,
                            chunk_size: int | None = None):
    """The fast path: chunked UT transform, no per-token Python loop."""
    _check(q, k, v, beta, initial_state, write_mask)
    dt = _compute_dtype(initial_state)
    B, T, H, r = q.shape
    if T == 0:
        return q.new_zeros(B, 0, H, r, dtype=dt), initial_state.to(dt).clone()
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK.get(q.device.type, DEFAULT_CHUNK_ACCELERATOR)
    C = max(1, min(chunk_size, T))
    N = (T + C - 1) // C
    pad = N * C - T

    beta = beta.to(dt)
    if write_mask is not None:
        beta = beta * write_mask.to(dt)[:, :, None, None]

    def chunked(x):  # (B, T, H, r) -> (B, H, N, C, r); padded tokens write nothing
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, r).permute(0, 3, 1, 2, 4)

    qc, kc, vc, bc = chunked(q), chunked(k), chunked(v), chunked(beta)
    # Per-row quantities get the row as an extra dim before the chunk's time axis:
    # (B, H, N, r_row, C).
    b_rows = bc.transpose(-1, -2)
    v_rows = vc.transpose(-1, -2)
    tiny = torch.finfo(dt).tiny
    log_a = torch.log(torch.clamp(1.0 - b_rows, min=tiny))
    g = torch.cumsum(log_a, dim=-1)  # log γ_t, inclusive
    g_prev = g - log_a  # log γ_{t-1}

    # decay[t, j] = γ_{t-1}/γ_j for j < t (strictly lower), 0 elsewhere.
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    expo = (g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~strict, float("-inf"))
    decay = torch.exp(expo)  # (B, H, N, r, C, C)

    kk = (kc @ kc.transpose(-1, -2)).unsqueeze(3)  # (B, H, N, 1, C, C): k_t·k_j
    qk = (qc @ kc.transpose(-1, -2)).unsqueeze(3)  # q_t·k_j
    eye = torch.eye(C, dtype=dt, device=q.device)
    A = eye + b_rows.unsqueeze(-1) * decay * kk  # unit lower-triangular
    # Right-hand sides: the v part (one column) and the s_0 part (r columns).
    gamma_prev = torch.exp(g_prev)
    rhs_v = (b_rows * v_rows).unsqueeze(-1)  # (B, H, N, r, C, 1)
    rhs_s = (b_rows * gamma_prev).unsqueeze(-1) * kc.unsqueeze(3)  # (B, H, N, r, C, r)
    sol = torch.linalg.solve_triangular(A, torch.cat([rhs_v, rhs_s], dim=-1), upper=False,
                                        unitriangular=True)
    X, Y = sol[..., 0], sol[..., 1:]  # δ = X - Y @ s_0

    # Chunk end state as an affine map of its start state: s_C = s_0 M + c.
    e = torch.exp(g[..., -1:] - g)  # γ_C/γ_j, (B, H, N, r, C)
    gamma_C = torch.exp(g[..., -1])  # (B, H, N, r)
    Kc = kc.unsqueeze(3)  # (B, H, N, 1, C, r)
    M = gamma_C[..., None, None] * torch.eye(r, dtype=dt, device=q.device) - (
        (Y * e.unsqueeze(-1)).transpose(-1, -2) @ Kc
    )  # (B, H, N, r_row, r, r)
    c = ((e * X).unsqueeze(-2) @ Kc).squeeze(-2)  # (B, H, N, r_row, r)

    # The only sequential part: T/C steps, one (r)·(r×r) product per row.
    starts = []
    s = initial_state.to(dt)  # (B, H, r_row, r)
    for n in range(N):
        starts.append(s)
        s = (s.unsqueeze(-2) @ M[:, :, n]).squeeze(-2) + c[:, :, n]
    s0 = torch.stack(starts, dim=2)  # (B, H, N, r_row, r)

    delta = X - (Y @ s0.unsqueeze(-1)).squeeze(-1)  # (B, H, N, r_row, C)
    # m_t = γ_{t-1} s_0·q_t + Σ_{j<t} (γ_{t-1}/γ_j) δ_j (q_t·k_j)
    s0_q = (qc.unsqueeze(3) @ s0.unsqueeze(-1)).squeeze(-1)  # (B, H, N, r_row, C)
    intra = ((decay * qk) @ delta.unsqueeze(-1)).squeeze(-1)
    reads = gamma_prev * s0_q + intra  # (B, H, N, r_row, C)
    reads = reads.permute(0, 2, 4, 1, 3).reshape(B, N * C, H, r)[:, :T]
    return reads, s


# --- varlen scan on a state pool, fixed shapes (accelerators, CUDA graphs) -------------------

def delta_rule_scan_varlen(q, k, v, beta, write_mask, rows, states, snaps=None, snap_rows=None,
                           chunk_size: int | None = None):
    """The engine's varlen layout on a pool of states, with shapes that depend only on the
    token count N: no host synchronisation, no data-dependent shape, so a CUDA graph captured
    for N tokens replays for any layout of N tokens whose index tensors it reads.

    q, k, v, beta   (N, H, r), the step's tokens back to back, each request's contiguous
    write_mask      (N,) bool; a False token reads but does not write
    rows            (N,) int64: the row of `states` each token's request owns (padding tokens
                    point to a row of zeros they cannot write: their mask is False)
    states          (R, H, r, r), updated in place (rows no token points to stay as they are)
    snaps, snap_rows  optional (S, H, r, r) and (N,) int64: the state after token t is copied
                    into snaps[snap_rows[t]]; tokens with no snapshot point to a spare row
    Returns reads (N, H, r), S_{t-1} q_t as in the contract above.

    The chunked UT transform of `delta_rule_scan_chunked`, on the flat token axis: a chunk may
    hold the end of one request, others whole, and the start of another, so its C×C blocks are
    masked to pairs of one *run* (consecutive tokens of one row) and decays restart at each
    run's first token. The start state of a token's run is gathered from the pool at its
    chunk's start; after the chunk, the state after each run's last token is scattered back
    (the other tokens' go to one spare row: `index_copy_` needs a destination for each).
    The loop over the N/C chunks is the only sequential part.
    """
    N, H, r = q.shape
    dt = _compute_dtype(states)
    dev = q.device
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK.get(dev.type, DEFAULT_CHUNK_ACCELERATOR)
    C = max(1, min(chunk_size, N))
    Nc = (N + C - 1) // C
    pad = Nc * C - N
    spare = states.shape[0] - 1  # scattered-to by non-final tokens, see below
    beta = beta.to(dt) * write_mask.to(dt)[:, None, None]

    def chunked(x, fill=0):  # (N, ...) -> (Nc, C, ...)
        if pad:
            x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
        return x.view(Nc, C, *x.shape[1:])

    rows_c = chunked(rows, spare)  # padded tokens: a run of their own, at the spare row
    qc, kc = (chunked(x.to(dt)).transpose(1, 2) for x in (q, k))  # (Nc, H, C, r)
    b_rows, v_rows = (chunked(x.to(dt)).permute(0, 2, 3, 1) for x in (beta, v))  # (Nc,H,r,C)
    idx = torch.arange(C, device=dev)
    same = rows_c[:, :, None] == rows_c[:, None, :]  # (Nc, C, C)
    strict = (same & (idx[:, None] > idx[None, :]))[:, None, None]  # j < t, same run
    incl = (same & (idx[:, None] >= idx[None, :]))[:, None, None]
    first_of_run = torch.ones_like(rows_c, dtype=torch.bool)
    first_of_run[:, 1:] = rows_c[:, 1:] != rows_c[:, :-1]
    last_of_run = torch.ones_like(rows_c, dtype=torch.bool)
    last_of_run[:, :-1] = rows_c[:, 1:] != rows_c[:, :-1]
    first = torch.cummax(torch.where(first_of_run, idx, 0), dim=1).values  # (Nc, C)

    tiny = torch.finfo(dt).tiny
    log_a = torch.log(torch.clamp(1.0 - b_rows, min=tiny))
    g = torch.cumsum(log_a, dim=-1)  # over the chunk, inclusive
    g_prev = g - log_a
    g_first = torch.gather(g_prev, -1, first[:, None, None, :].expand_as(g_prev))
    gamma_prev = torch.exp(g_prev - g_first)  # Π a over the run's tokens before t
    gamma_incl = torch.exp(g - g_first)  # ... up to and including t
    decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~strict,
                                                                           float("-inf")))
    decay_incl = torch.exp((g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~incl,
                                                                           float("-inf")))
    kk = (kc @ kc.transpose(-1, -2)).unsqueeze(2)  # (Nc, H, 1, C, C)
    qk = (qc @ kc.transpose(-1, -2)).unsqueeze(2)
    eye = torch.eye(C, dtype=dt, device=dev)
    A = eye + b_rows.unsqueeze(-1) * decay * kk
    rhs_v = (b_rows * v_rows).unsqueeze(-1)  # (Nc, H, r, C, 1)
    rhs_s = (b_rows * gamma_prev).unsqueeze(-1) * kc.unsqueeze(2)  # (Nc, H, r, C, r)
    sol = torch.linalg.solve_triangular(A, torch.cat([rhs_v, rhs_s], dim=-1), upper=False,
                                        unitriangular=True)
    X, Y = sol[..., 0], sol[..., 1:]  # δ_t = X_t - Y_t · s0_t, s0_t its run's start state
    write_to = torch.where(last_of_run, rows_c, spare)
    snap_c = None if snaps is None else chunked(snap_rows, snaps.shape[0] - 1)

    reads = []
    for n in range(Nc):
        s0 = states.index_select(0, rows_c[n]).to(dt).permute(1, 2, 0, 3)  # (H, r_row, C, r)
        delta = X[n] - (Y[n] * s0).sum(-1)  # (H, r, C)
        s0_q = (s0 * qc[n].unsqueeze(1)).sum(-1)
        reads.append(gamma_prev[n] * s0_q + ((decay[n] * qk[n]) @ delta.unsqueeze(-1)
                                             ).squeeze(-1))
        after = gamma_incl[n].unsqueeze(-1) * s0 + (decay_incl[n] * delta.unsqueeze(-2)) @ (
            kc[n].unsqueeze(1))  # (H, r, C, r): the state after each token
        after = after.permute(2, 0, 1, 3).to(states.dtype)
        states.index_copy_(0, write_to[n], after)
        if snaps is not None:
            snaps.index_copy_(0, snap_c[n], after.to(snaps.dtype))
    out = torch.stack(reads).permute(0, 3, 1, 2).reshape(Nc * C, H, r)
    return out[:N]


# --- compiled CPU kernel (deltamem/_cpu_kernel.py) --------------------------------------------
# On the CPU the chunked path is memory-bound (its C×C blocks carry a row axis because β is
# per row), and at decode (T = 1) its ~40 tensor ops per layer cost more than the math. A
# compiled per-token kernel does the 8×8 arithmetic in registers: it is the fast path for
# inference on the CPU. It has no backward, so training (autograd) uses the chunked path.

def delta_rule_scan_varlen_cpu(q, k, v, beta, states, cu_seqlens, write_mask=None,
                               inplace: bool = False, snap_at=None):
    """Varlen scan on the CPU for a flattened batch (the engine's layout).

    q, k, v, beta: (N, H, r) for all sequences' tokens back to back; cu_seqlens: (B+1,) token
    offsets; states: (B, H, r, r) initial states; write_mask: (N,) bool or None.
    Returns (reads (N, H, r), final states (B, H, r, r)). With `inplace`, `states` (which must
    then be a contiguous float32/float64 CPU tensor) is updated and returned.
    With `snap_at` (B, P) int64 of flat token indices (a sequence's end offset for after its
    last token, -1 for none) it also returns the states before them, (B, P, H, r, r).
    """
    from . import _cpu_kernel

    dt = _compute_dtype(states)
    # The kernel takes q, k, v, β side by side in one array (as the engine passes its
    # projections).
    x = torch.stack([t.detach().to(dt) for t in (q, k, v, beta)], dim=1).numpy()
    if inplace:
        if not states.is_contiguous() or states.dtype != dt:
            raise ValueError("inplace needs a contiguous float32/float64 state tensor")
        st = states
    else:
        st = states.detach().to(dt).clone().contiguous()
    N = q.shape[0]
    mask = (torch.ones(N, dtype=torch.bool) if write_mask is None
            else write_mask.detach().to(torch.bool).contiguous())
    reads = torch.empty(q.shape, dtype=dt)
    cu = cu_seqlens.detach().to(torch.int64).contiguous()
    if snap_at is None:
        _cpu_kernel.run(x, mask.numpy(), cu.numpy(), st.detach().numpy(), reads.numpy())
        return reads, st
    at = torch.as_tensor(snap_at, dtype=torch.int64).contiguous()
    snaps = torch.zeros((*at.shape, *st.shape[1:]), dtype=dt)
    _cpu_kernel.run(x, mask.numpy(), cu.numpy(), st.detach().numpy(), reads.numpy(),
                    at.numpy(), snaps.numpy())
    return reads, st, snaps


def delta_rule_scan_cpu_kernel(q, k, v, beta, initial_state, write_mask=None):
    """The (B, T, H, r) contract on top of the varlen CPU kernel."""
    _check(q, k, v, beta, initial_state, write_mask)
    B, T, H, r = q.shape
    cu = torch.arange(B + 1, dtype=torch.int64) * T
    flat = [x.reshape(B * T, H, r) for x in (q, k, v, beta)]
    mask = None if write_mask is None else write_mask.reshape(B * T)
    reads, state = delta_rule_scan_varlen_cpu(*flat, initial_state, cu, mask)
    return reads.view(B, T, H, r), state


# Backends of `delta_rule_scan`. "auto" is the default choice: the compiled kernel for CPU
# tensors that need no gradient (inference), else the chunked path.
BACKENDS = ("auto", "reference", "chunked", "cpu_kernel")


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def delta_rule_scan(q, k, v, beta, initial_state, write_mask=None, backend: str = "auto"):
    """δ-mem scan; see the module docstring for the contract.

    `backend` picks the implementation, per call (nothing process-wide):
      "auto"        CPU tensors that need no gradient go to the compiled kernel; anything that
                    needs autograd, or lives on an accelerator, goes to the chunked path.
      "chunked"     the chunked path, always (what training asks for; see deltamem/train.py).
      "reference"   the per-token loop (the oracle; slow).
      "cpu_kernel"  the compiled CPU kernel: CPU tensors only, no autograd.
    An unknown backend is a ValueError.

    With autograd the chunked path is checkpointed: it keeps only its inputs and runs again
    in the backward pass. Its C×C blocks carry a row axis: kept for backward they are ~80 KB
    a token and layer at C = 64 with five heads (315 MB for 4 × 1,000 tokens), and over 30
    layers they took 46 GB of an H100 at 16 stage-5 episodes (~7,000 history tokens).
    Recomputing them costs one more scan per layer, a small part of a step.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}: one of {', '.join(BACKENDS)}")
    needs_grad = _needs_grad(q, k, v, beta, initial_state)
    if backend == "auto":
        backend = "cpu_kernel" if q.device.type == "cpu" and not needs_grad else "chunked"
    if backend == "reference":
        return delta_rule_scan_reference(q, k, v, beta, initial_state, write_mask)
    if backend == "cpu_kernel":
        # The kernel works on detached numpy arrays: asked for under autograd it would cut
        # the gradient silently, so that is refused rather than served.
        if needs_grad:
            raise ValueError("scan backend 'cpu_kernel' has no backward: use 'chunked' or "
                             "'auto' under autograd")
        if q.device.type != "cpu":
            raise ValueError(f"scan backend 'cpu_kernel' runs on CPU tensors, got {q.device}")
        return delta_rule_scan_cpu_kernel(q, k, v, beta, initial_state, write_mask)
    if needs_grad:
        # Nothing in the scan is random: no RNG state to stash and restore.
        return checkpoint(delta_rule_scan_chunked, q, k, v, beta, initial_state, write_mask,
                          use_reentrant=False, preserve_rng_state=False)
    return delta_rule_scan_chunked(q, k, v, beta, initial_state, write_mask)
