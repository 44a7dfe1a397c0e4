"""Compiled (numba) delta-rule scan for the CPU, varlen layout. Imported lazily by scan.py.

One serial build. A parallel one (sequences × heads over numba's threads) halved the scan's
own time on a 2,048-token prefill, yet served slower: its threads compete with torch's
OpenMP threads for the same cores, and a δ-mem engine with it prefilled 2,048 tokens in
882–895 ms against 811–815 ms serial, interleaved runs, 2 cores (and decoded 16 streams 6%
slower, though decode steps never ran it).

The inputs come as one (N, 4, H, r) array x: q, k, v, β along axis 1 (the engine's graph
writes them so: one array, one conversion a call).

Per row i of a head's state, one pass: the read S_i·q and the prediction S_i·k, then the
update of S_i (rows evolve independently: β gates each row). `fastmath` lets LLVM reorder the
8-term sums into SIMD lanes (about 2× faster than the strict order at r = 8).
"""

import numba
import numpy as np


def _scan(x, mask, cu_seqlens, rows, state, reads, snap_at, snaps):
    # x: (N, 4, H, r); reads: (N, H, r); mask: (N,) bool; cu_seqlens: (B+1,) int64;
    # state: (R, H, r, r), sequence b's at row rows[b] ((B,) int64), updated in place.
    # snap_at: (B, P) int64, token indices t in [cu[b], cu[b+1]] before which the state is
    # copied into snaps[b, p] ((B, P, H, r, r)); cu[b+1] means after the sequence's last
    # token, -1 means no copy.
    nseq = cu_seqlens.shape[0] - 1
    H = x.shape[2]
    r = x.shape[3]
    P = snap_at.shape[1]
    for job in range(nseq * H):
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
            q = x[t, 0, h]
            k = x[t, 1, h]
            write = mask[t]
            for i in range(r):
                aq = S[i, 0] * q[0]
                ak = S[i, 0] * k[0]
                for j in range(1, r):
                    aq += S[i, j] * q[j]
                    ak += S[i, j] * k[j]
                reads[t, h, i] = aq
                if write:
                    bt = x[t, 3, h, i]
                    d = bt * (x[t, 2, h, i] - ak)
                    a = 1 - bt
                    for j in range(r):
                        S[i, j] = a * S[i, j] + d * k[j]


scan = numba.njit(fastmath=True, cache=True)(_scan)


@numba.njit(cache=True)
def copy_columns(src, src_cols, dst, dst_cols):
    """dst[:, dst_cols[i]] = src[:, src_cols[i]] for (L, C, n) arrays: torch's index_select
    and index_copy_ took about 180 µs for 16 states of 30 layers, this a fraction of it."""
    for i in range(src_cols.shape[0]):
        for layer in range(src.shape[0]):
            dst[layer, dst_cols[i]] = src[layer, src_cols[i]]


def run(x, mask, cu_seqlens, state, reads, snap_at=None, snaps=None) -> None:
    """All arrays numpy; x (N, 4, H, r) holds q, k, v, β;
    `state` ((B, H, r, r), sequence b's at row b) is updated in place and `reads` filled;
    with `snap_at` (B, P), `snaps` (B, P, H, r, r) gets the state before the given token
    indices."""
    nseq = cu_seqlens.shape[0] - 1
    if snap_at is None:
        snap_at = np.full((nseq, 0), -1, dtype=np.int64)
        snaps = np.empty((nseq, 0, *state.shape[1:]), dtype=state.dtype)
    scan(x, mask.astype(np.bool_, copy=False), cu_seqlens, np.arange(nseq, dtype=np.int64),
       state, reads, snap_at, snaps)
