"""Compiled (numba) delta-rule scan for the CPU, varlen layout. Imported lazily by scan.py and
by the engine's runtime.

One serial build. A parallel one (sequences × heads over numba's threads) halved the scan's
own time on a 2,048-token prefill, yet served slower: its threads compete with torch's
OpenMP threads for the same cores, and a δ-mem engine with it prefilled 2,048 tokens in
882–895 ms against 811–815 ms serial, interleaved runs, 2 cores (and decoded 16 streams 6%
slower, though decode steps never ran it).

The inputs come as one (N, 4m) array x, m = H·r: q, k, v, β side by side, head-major within
each. Either already activated (`scan`, the `delta_rule_scan` contract), or, for the engine,
the raw projections W x (`scan_projections`), the kernel adding the bias and applying the
activations itself
(q̂ = L2norm(tanh(·)), k̂ likewise, β = sigmoid(·)): the engine's compiled graph then runs no
kernel of its own for them, and at decode each such kernel, with its buffers, cost more than
its arithmetic. x and the reads may be bfloat16 (as int16 bit patterns: numpy has no
bfloat16), so the engine passes its bfloat16 projections and takes its bfloat16 reads with no
conversion around the call.

Per row i of a head's state, one pass: the read S_i·q and the prediction S_i·k, then the
update of S_i (rows evolve independently: β gates each row). `fastmath` lets LLVM reorder the
8-term sums into SIMD lanes (about 2× faster than the strict order at r = 8).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

NORM_EPS = np.float32(1e-6)  # deltamem.layer.NORM_EPS (not imported: that pulls in torch)


@intrinsic
def _f32_of_bits(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _load(v):
    """An element of x as a float: bfloat16 bits (an integer array) widened to float32."""


@overload(_load)
def _load_impl(v):
    if isinstance(v, types.Integer):
        return lambda v: _f32_of_bits(np.uint32(np.uint16(v)) << np.uint32(16))
    return lambda v: v


def _store(a, t, j, v):
    """a[t, j] = v, rounded to nearest even where `a` holds bfloat16 bits."""


@overload(_store)
def _store_impl(a, t, j, v):
    if isinstance(a.dtype, types.Integer):
        def impl(a, t, j, v):
            u = _bits_of_f32(np.float32(v))
            a[t, j] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> \
                np.uint32(16)
        return impl

    def impl(a, t, j, v):
        a[t, j] = v
    return impl


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def _tanh(x):
    """tanh in float32 by a rational approximation (Eigen's `generic_fast_tanh_float`, the
    one PyTorch's CPU kernels vectorise too): within 4e-7 of tanh over the line (checked
    against float64 in the tests), and, unlike libm's, free of calls, so LLVM vectorises it."""
    x = min(max(np.float32(x), np.float32(-7.90531110763549805)),
            np.float32(7.90531110763549805))
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    p = x * p
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    return p / q


@numba.njit(fastmath=True, error_model="numpy")
def _activate(x, bias, H, r):
    """q̂, k̂, v̂, β (N, 4m) float32 from the raw projections x (N, 4m) and their bias: one
    pass over contiguous rows per step, which LLVM vectorises (tanh, normalisation, sigmoid
    as tanh(x/2)/2 + 1/2); inside the scan's per-head loop the same arithmetic ran scalar."""
    N = x.shape[0]
    m = H * r
    out = np.empty((N, 4 * m), dtype=np.float32)
    for t in range(N):
        row = out[t]
        for c in range(4 * m):
            row[c] = _load(x[t, c]) + bias[c]
        for c in range(2 * m):
            row[c] = _tanh(row[c])
        for c in range(3 * m, 4 * m):
            row[c] = np.float32(0.5) + np.float32(0.5) * _tanh(np.float32(0.5) * row[c])
        for g in range(2 * H):
            s = np.float32(0)
            for j in range(r):
                s += row[g * r + j] * row[g * r + j]
            inv = np.float32(1) / max(np.float32(np.sqrt(s)), NORM_EPS)
            for j in range(r):
                row[g * r + j] *= inv
    return out


@numba.njit(fastmath=True, error_model="numpy", cache=True)
def scan(x, mask, cu_seqlens, rows, state, reads, snap_at, snaps):
    """x: (N, 4m) activated q̂, k̂, v̂, β; reads: (N, m); mask: (N,) bool; cu_seqlens: (B+1,)
    int64; state: (R, H, r, r), sequence b's at row rows[b] ((B,) int64), updated in place.
    snap_at: (B, P) int64, token indices t in [cu[b], cu[b+1]] before which the state is
    copied into snaps[b, p] ((B, P, H, r, r)); cu[b+1] means after the sequence's last
    token, -1 means no copy."""
    nseq = cu_seqlens.shape[0] - 1
    H = state.shape[1]
    r = state.shape[2]
    m = H * r
    P = snap_at.shape[1]
    q = np.empty(r, dtype=state.dtype)
    k = np.empty(r, dtype=state.dtype)
    for job in range(nseq * H):
        b = job // H
        h = job % H
        S = state[rows[b], h]
        end = cu_seqlens[b + 1]
        o = h * r
        for t in range(cu_seqlens[b], end + 1):
            for p in range(P):
                if snap_at[b, p] == t:
                    snaps[b, p, h] = S
            if t == end:
                break
            write = mask[t]
            for j in range(r):
                q[j] = _load(x[t, o + j])
                k[j] = _load(x[t, m + o + j])
            for i in range(r):
                aq = S[i, 0] * q[0]
                ak = S[i, 0] * k[0]
                for j in range(1, r):
                    aq += S[i, j] * q[j]
                    ak += S[i, j] * k[j]
                _store(reads, t, o + i, aq)
                if write:
                    bt = _load(x[t, 3 * m + o + i])
                    d = bt * (_load(x[t, 2 * m + o + i]) - ak)
                    a = 1 - bt
                    for j in range(r):
                        S[i, j] = a * S[i, j] + d * k[j]


@numba.njit(fastmath=True, error_model="numpy", cache=True)
def scan_projections(x, bias, mask, cu_seqlens, rows, state, reads, snap_at, snaps):
    """`scan` for the engine: x (N, 4m) the raw projections W x, whose bias (4m,) float32 is
    added and activations applied here."""
    scan(_activate(x, bias, state.shape[1], state.shape[2]), mask, cu_seqlens, rows, state,
         reads, snap_at, snaps)


@numba.njit(fastmath=True, error_model="numpy", cache=True)
def scan_read_out(x, bias, mask, cu_seqlens, rows, state, snap_at, snaps, w, out):
    """`scan_projections` and then the read-out, for a step of a few tokens: out (N, D) =
    reads · w, w (m, D) float32, the reads kept in float32. Decode's read-out is a matrix-vector
    product of 32 × 1,152: a oneDNN GEMM call for it cost about 40 µs a layer in the served
    engine (call overhead, not arithmetic), this loop a few."""
    N = x.shape[0]
    reads = np.zeros((N, w.shape[0]), dtype=np.float32)  # padding tokens read zeros
    scan_projections(x, bias, mask, cu_seqlens, rows, state, reads, snap_at, snaps)
    D = w.shape[1]
    acc = np.empty(D, dtype=np.float32)
    for t in range(N):
        for c in range(D):
            acc[c] = 0
        for j in range(w.shape[0]):
            a = reads[t, j]
            for c in range(D):
                acc[c] += a * w[j, c]
        for c in range(D):
            _store(out, t, c, acc[c])


@numba.njit(cache=True)
def copy_columns(src, src_cols, dst, dst_cols):
    """dst[:, dst_cols[i]] = src[:, src_cols[i]] for (L, C, n) arrays: torch's index_select
    and index_copy_ took about 180 µs for 16 states of 30 layers, this a fraction of it."""
    for i in range(src_cols.shape[0]):
        for layer in range(src.shape[0]):
            dst[layer, dst_cols[i]] = src[layer, src_cols[i]]


def run(x, mask, cu_seqlens, state, reads, snap_at=None, snaps=None) -> None:
    """All arrays numpy; x (N, 4, H, r) holds q, k, v, β, activated;
    `state` ((B, H, r, r), sequence b's at row b) is updated in place and `reads` (N, H, r)
    filled; with `snap_at` (B, P), `snaps` (B, P, H, r, r) gets the state before the given
    token indices."""
    nseq = cu_seqlens.shape[0] - 1
    N = x.shape[0]
    if snap_at is None:
        snap_at = np.full((nseq, 0), -1, dtype=np.int64)
        snaps = np.empty((nseq, 0, *state.shape[1:]), dtype=state.dtype)
    scan(x.reshape(N, -1), mask.astype(np.bool_, copy=False), cu_seqlens,
         np.arange(nseq, dtype=np.int64), state, reads.reshape(N, -1), snap_at, snaps)
