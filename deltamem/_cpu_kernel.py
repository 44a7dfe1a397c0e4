"""Compiled (numba) delta-rule scan for the CPU, varlen layout. Imported lazily by scan.py.

Two builds of one body: a parallel one (sequences × heads spread over threads) for large
batches, and a serial one for small steps such as decode, where starting threads costs more
than the 8×8 arithmetic.
"""

import numba
import numpy as np


def _scan(q, k, v, beta, mask, cu_seqlens, rows, state, reads, snap_at, snaps):
    # q, k, v, beta, reads: (N, H, r); mask: (N,) bool; cu_seqlens: (B+1,) int64;
    # state: (R, H, r, r), sequence b's at row rows[b] ((B,) int64), updated in place.
    # snap_at: (B, P) int64, token indices t in [cu[b], cu[b+1]] before which the state is
    # copied into snaps[b, p] ((B, P, H, r, r)); cu[b+1] means after the sequence's last
    # token, -1 means no copy.
    nseq = cu_seqlens.shape[0] - 1
    H = q.shape[1]
    r = q.shape[2]
    P = snap_at.shape[1]
    for job in numba.prange(nseq * H):
        b = job // H
        h = job % H
        S = state[rows[b], h]
        end = cu_seqlens[b + 1]
        for t in range(cu_seqlens[b], end + 1):
            for p in range(P):
                if snap_at[b, p] == t:
                    snaps[b, p, h] = S
            if t == end:
                break
            for i in range(r):
                acc = 0.0
                for j in range(r):
                    acc += S[i, j] * q[t, h, j]
                reads[t, h, i] = acc
            if mask[t]:
                for i in range(r):
                    pred = 0.0
                    for j in range(r):
                        pred += S[i, j] * k[t, h, j]
                    bt = beta[t, h, i]
                    d = bt * (v[t, h, i] - pred)
                    a = 1.0 - bt
                    for j in range(r):
                        S[i, j] = a * S[i, j] + d * k[t, h, j]


scan_parallel = numba.njit(parallel=True, cache=True)(_scan)
scan_serial = numba.njit(parallel=False, cache=True)(_scan)


def pick(jobs: int, tokens: int):
    """The build for a step of `jobs` (sequences × heads) scans over `tokens` tokens."""
    return scan_parallel if jobs >= 4 and tokens >= 512 else scan_serial


def run(q, k, v, beta, mask, cu_seqlens, state, reads, snap_at=None, snaps=None) -> None:
    """All arguments numpy arrays; `state` ((B, H, r, r), sequence b's at row b) is updated in
    place and `reads` filled; with `snap_at` (B, P), `snaps` (B, P, H, r, r) gets the state
    before the given token indices."""
    nseq = cu_seqlens.shape[0] - 1
    if snap_at is None:
        snap_at = np.full((nseq, 0), -1, dtype=np.int64)
        snaps = np.empty((nseq, 0, *state.shape[1:]), dtype=state.dtype)
    fn = pick(nseq * q.shape[1], q.shape[0])
    fn(q, k, v, beta, mask.astype(np.bool_, copy=False), cu_seqlens,
       np.arange(nseq, dtype=np.int64), state, reads, snap_at, snaps)
