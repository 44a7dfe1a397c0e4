"""Compiled (numba) delta-rule scan for the CPU, varlen layout. Imported lazily by scan.py.

Two builds of one body: a parallel one (sequences × heads spread over threads) for large
batches, and a serial one for small steps such as decode, where starting threads costs more
than the 8×8 arithmetic.
"""

import numba
import numpy as np


def _scan(q, k, v, beta, mask, cu_seqlens, state, reads):
    # q, k, v, beta, reads: (N, H, r); mask: (N,) bool; cu_seqlens: (B+1,) int64;
    # state: (B, H, r, r), updated in place.
    nseq = cu_seqlens.shape[0] - 1
    H = q.shape[1]
    r = q.shape[2]
    for job in numba.prange(nseq * H):
        b = job // H
        h = job % H
        S = state[b, h]
        for t in range(cu_seqlens[b], cu_seqlens[b + 1]):
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


def run(q, k, v, beta, mask, cu_seqlens, state, reads) -> None:
    """All arguments numpy arrays; `state` is updated in place and `reads` filled."""
    jobs = (cu_seqlens.shape[0] - 1) * q.shape[1]
    fn = scan_parallel if jobs >= 4 and q.shape[0] >= 512 else scan_serial
    fn(q, k, v, beta, mask.astype(np.bool_, copy=False), cu_seqlens, state, reads)
