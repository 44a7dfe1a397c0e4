"""The δ-mem update for heads that share keys, queries and gates (attempt 20's copy heads):
one (m × r) state whose rows all decay with the same scalar β_t, so that the chunked UT
transform is computed once for all m rows instead of once per row and head, as the general
deltamem.scan path must. The same recurrence as deltamem.scan (run as __main__, it checks
itself against deltamem.scan's per-token loop):

    m_t = S_{t-1} q_t,   S_t = (1 - β_t) S_{t-1} + β_t (v_t - S_{t-1} k_t) k_tᵀ
"""

import torch


def shared_scan(q, k, v, beta, s0, chunk: int = 32):
    """q, k (B, T, r) unit rows; v (B, T, m); beta (B, T); s0 (B, m, r) -> reads (B, T, m),
    final state (B, m, r)."""
    B, T, r = q.shape
    m = v.shape[-1]
    C = max(1, min(chunk, T))
    N = (T + C - 1) // C
    pad = N * C - T

    def ch(x):
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(B, N, C, *x.shape[2:])

    qc, kc, vc, bc = ch(q), ch(k), ch(v), ch(beta)
    log_a = torch.log(torch.clamp(1 - bc, min=torch.finfo(bc.dtype).tiny))
    g = torch.cumsum(log_a, -1)
    g_prev = g - log_a
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    decay = torch.exp((g_prev[..., :, None] - g[..., None, :]).masked_fill(~strict, float("-inf")))
    kk = kc @ kc.transpose(-1, -2)
    qk = qc @ kc.transpose(-1, -2)
    A = torch.eye(C, dtype=q.dtype, device=q.device) + bc[..., None] * decay * kk
    rhs = torch.cat([bc[..., None] * vc, (bc * torch.exp(g_prev))[..., None] * kc], -1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    X, Y = sol[..., :m], sol[..., m:]  # δ_t = X_t - S_0 Y_t
    e = torch.exp(g[..., -1:] - g)  # (B, N, C)
    gamma_C = torch.exp(g[..., -1])  # (B, N)
    M = gamma_C[..., None, None] * torch.eye(r, dtype=q.dtype, device=q.device) - (Y * e[..., None]).transpose(
        -1, -2) @ kc  # (B, N, r, r): S_C = S_0 M + c
    c = (X * e[..., None]).transpose(-1, -2) @ kc  # (B, N, m, r)
    starts, s = [], s0
    for n in range(N):
        starts.append(s)
        s = s @ M[:, n] + c[:, n]
    S0 = torch.stack(starts, 1)  # (B, N, m, r)
    delta = X - Y @ S0.transpose(-1, -2)  # (B, N, C, m)
    reads = torch.exp(g_prev)[..., None] * (qc @ S0.transpose(-1, -2)) + (decay * qk) @ delta
    return reads.reshape(B, N * C, m)[:, :T], s


if __name__ == "__main__":
    # The oracle is the project's per-token loop, deltamem.scan.delta_rule_scan_reference: an
    # (m × r) state with a shared key and β is m/r heads of (r × r) that share them.
    from deltamem.scan import delta_rule_scan_reference

    g = torch.Generator().manual_seed(0)
    B, T, r, m = 3, 77, 8, 64
    H = m // r
    f64 = torch.float64
    q = torch.nn.functional.normalize(torch.randn(B, T, r, generator=g, dtype=f64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, r, generator=g, dtype=f64), dim=-1)
    v = torch.randn(B, T, m, generator=g, dtype=f64)
    beta = torch.rand(B, T, generator=g, dtype=f64) * 0.98 + 0.01
    s0 = torch.randn(B, m, r, generator=g, dtype=f64)
    a, sa = shared_scan(q, k, v, beta, s0, chunk=16)

    def heads(x):
        return x[:, :, None].expand(B, T, H, r)

    b, sb = delta_rule_scan_reference(heads(q), heads(k), v.view(B, T, H, r),
                                      beta[..., None, None].expand(B, T, H, r),
                                      s0.view(B, H, r, r))
    b, sb = b.reshape(B, T, m), sb.reshape(B, m, r)
    print("max |diff| reads", float((a - b).abs().max()), "state", float((sa - sb).abs().max()),
          "(fp64; tolerance 1e-9)")
    assert (a - b).abs().max() < 1e-9 and (sa - sb).abs().max() < 1e-9
