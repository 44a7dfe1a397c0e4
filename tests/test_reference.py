"""The authors' release runs here exactly: reference-format adapters load (or are refused,
naming the field), export back, and the HF runtime reproduces the reference's own logits and
states (tests/fixtures/delta-mem-reference/, made with declare-lab/delta-Mem's code on tiny
random Qwen3 backbones; each folder's README says what it holds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltamem.adapter import (
    EXPORT_SIDECAR,
    REF_CONFIG_FILE,
    REF_FIELDS,
    REF_WEIGHTS_FILE,
    AdapterError,
    BackboneIdentity,
    export_reference_adapter,
    load_adapter,
    new_adapter,
    save_adapter,
)

FIXTURES = Path(__file__).parent / "fixtures" / "delta-mem-reference"
KINDS = ("tsw", "msw", "ssw")
TOL = 1e-4  # float32, relative


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise error relative to the tensor's scale (max |b|)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def hf_config(kind: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(FIXTURES / kind / "backbone")


def ref_copy(tmp_path: Path, kind: str = "tsw", config: dict | None = None,
             weights: dict | None = None) -> Path:
    """A writable copy of a fixture's adapter folder, with its config updated by `config`
    (None values delete the field) and its state dict replaced by `weights`."""
    out = tmp_path / f"ref-{kind}"
    shutil.copytree(FIXTURES / kind / "adapter", out)
    for f in out.iterdir():
        f.chmod(0o644)
    if config:
        doc = json.loads((out / REF_CONFIG_FILE).read_text())
        for k, v in config.items():
            if v is None:
                doc.pop(k, None)
            else:
                doc[k] = v
        (out / REF_CONFIG_FILE).write_text(json.dumps(doc))
    if weights is not None:
        torch.save(weights, out / REF_WEIGHTS_FILE)
    return out


def ref_weights(kind: str = "tsw") -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / kind / "adapter" / REF_WEIGHTS_FILE, weights_only=True)


_RUNTIMES: dict = {}


def runtime(kind: str, backend: str):
    """The HF runtime (float32) on a fixture's backbone with its reference adapter."""
    from deltamem.hf_runtime import DeltaMemHF

    if kind not in _RUNTIMES:
        ad = load_adapter(FIXTURES / kind / "adapter", hf_config(kind))
        _RUNTIMES[kind] = DeltaMemHF.from_pretrained(FIXTURES / kind / "backbone", adapter=ad)
    rt = _RUNTIMES[kind]
    rt.scan_backend = backend
    return rt


# --- exactness against the reference's own outputs -------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu_kernel"])
@pytest.mark.parametrize("kind", KINDS)
def test_hf_runtime_reproduces_the_reference(kind, backend):
    """Write ids from a zero state with writes on (SSW: with the fixture's message ids), then
    read ids from the state it left with writes off, each a forward of its own: the logits
    of both and the state of every layer equal the reference's (float32 backbones, so the
    reference's state, in the backbone's dtype, is float32 too)."""
    exp = load_file(str(FIXTURES / kind / "expected.safetensors"))
    rt = runtime(kind, backend)
    assert rt.model.config.model_type == "qwen3" and rt.model.dtype == torch.float32
    errors = {}
    with torch.no_grad():
        logits, state, _ = rt.forward(exp["write_ids"], None, None,
                                      message_ids=exp.get("write_message_ids"))
        errors["write_logits"] = max_rel(logits[0], exp["write_logits"])
        for slot, i in enumerate(rt.layer_ids):
            want = exp[f"state_after_write.model.layers.{i}.self_attn"]
            assert want.dtype == torch.float32 and state.dtype == torch.float32
            errors[f"state_after_write.{i}"] = max_rel(state[0, slot].reshape(want.shape), want)
        read = exp["read_ids"]
        logits, after, _ = rt.forward(read, state, torch.zeros(read.shape, dtype=torch.bool))
        errors["read_logits"] = max_rel(logits[0], exp["read_logits"])
        assert torch.equal(after, state)  # writes off: nothing written
    assert len(errors) == 2 + len(rt.layer_ids) == 5
    assert max(errors.values()) <= TOL, errors


def test_ssw_tokens_read_the_state_from_before_the_forward():
    """In the reference's SSW every token of a forward reads the state the forward started
    from, and the messages' means are written at its end: from a zero state the write pass's
    logits are the backbone's own, and a second forward sees what the first wrote."""
    exp = load_file(str(FIXTURES / "ssw" / "expected.safetensors"))
    rt = runtime("ssw", "auto")
    ids, mids = exp["write_ids"], exp["write_message_ids"]
    assert mids.max() == 2 and (mids < 0).sum() == 8  # a system prompt and three messages
    with torch.no_grad():
        base, _, _ = rt.forward(ids, memory=False)
        logits, state, _ = rt.forward(ids, None, None, message_ids=mids)
        torch.testing.assert_close(logits, base, rtol=0, atol=0)
        # The messages are written in order, one write each: at the first layer (whose
        # input δ-mem does not change) writing them one forward at a time ends in the same
        # state.
        s = None
        for m in range(3):
            keep = (mids[0] < 0) | (mids[0] == m)
            _, s, _ = rt.forward(ids, s, keep.unsqueeze(0), message_ids=mids)
        torch.testing.assert_close(s[:, 0], state[:, 0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(s[:, 1:], state[:, 1:])  # later layers read what was written
        # A forward that would write needs message ids: no silent token writes.
        with pytest.raises(ValueError, match="message_ids"):
            rt.forward(ids, state)
        # Reading alone needs none.
        rt.forward(ids, state, torch.zeros(ids.shape, dtype=torch.bool))


def test_ssw_run_writes_the_prompt_then_each_generated_token_as_a_message():
    """`run` serves an SSW adapter as the reference's session runtime does: the prompt reads
    the initial state and writes its messages at its end; each generated token fed back is
    written as a one-token message of its own."""
    from transformers import DynamicCache

    exp = load_file(str(FIXTURES / "ssw" / "expected.safetensors"))
    rt = runtime("ssw", "auto")
    ids, mids = exp["write_ids"][0].tolist(), exp["write_message_ids"][0].tolist()
    s0 = 0.2 * torch.randn(rt.state_shape, generator=torch.Generator().manual_seed(0))
    res = rt.run(ids, s0, max_new_tokens=4, message_ids=mids)
    with torch.no_grad():
        cache = DynamicCache()
        logits, state, _ = rt.forward(torch.tensor([ids]), s0.unsqueeze(0), None,
                                      message_ids=torch.tensor([mids]), past_key_values=cache)
        torch.testing.assert_close(res.prompt_logits, logits[0], rtol=1e-5, atol=1e-5)
        for n, tok in enumerate(res.tokens[:-1]):  # the last one is not fed back
            before = state
            logits, state, _ = rt.forward(torch.tensor([[tok]]), state, None,
                                          message_ids=torch.tensor([[100 + n]]),
                                          past_key_values=cache)
            assert not torch.equal(state, before)
            torch.testing.assert_close(res.step_logits[n + 1], logits[0, -1], rtol=1e-5,
                                       atol=1e-5)
    torch.testing.assert_close(res.final_state, state[0], rtol=1e-5, atol=1e-6)
    # A one-token message writes what a token write of that token would.
    layer = rt.adapter.module.layer(0)
    x = torch.randn(1, 1, 64)
    s = 0.1 * torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        r_m, s_m = layer.scan_messages(x, layer.project_q(x), s, torch.tensor([[0]]))
        r_t, s_t = layer.scan_tokens(layer.project(x), s, None)
    torch.testing.assert_close(r_m, r_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_m, s_t, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="message_ids"):
        rt.run(ids, s0)


# --- the vLLM engine on the fixtures -----------------------------------------------------------
# vLLM's CPU attention has no kernel for the fixtures' 16-dimensional heads (32 is its
# smallest), so the engine runs the same function with every head widened to 32 dimensions.
# The widening is exact up to the q/k RMSNorms' ε (which acts as 2ε: 1e-6, far below TOL), and
# the HF runtime on the widened model is first held to the reference's outputs.

def _head_index(heads: int, hd: int) -> torch.Tensor:
    """Where dimension j of head h goes when its `hd` dims widen to 2·hd: the rotary halves
    [0, hd/2) and [hd/2, hd) move to [0, hd/2) and [hd, 3hd/2), so RoPE's pair (j, j + hd/2)
    becomes (j, j + hd), whose frequency θ^(-2j/2hd) with θ squared is the original one."""
    j = torch.arange(hd)
    within = j + (j >= hd // 2).long() * (hd // 2)
    return (torch.arange(heads)[:, None] * 2 * hd + within[None]).flatten()


def widened_fixture(kind: str, out: Path) -> tuple[Path, Path]:
    """(backbone, adapter) folders: the fixture's, heads widened from 16 to 32 dimensions.

    q/k/v_proj rows and o_proj columns (and B_q's rows) move by `_head_index`, zeros elsewhere.
    A per-head RMSNorm over twice the dims sees half the mean square, so it scales its output
    by √2: q_norm's weight stays (q grows √2) and k_norm's is divided by √2 (k stays), which
    makes vLLM's q·k/√32 the original q·k/√16."""
    from safetensors.torch import save_file

    from deltamem.adapter import Adapter
    from deltamem.layer import DeltaMem, DeltaMemConfig

    src = FIXTURES / kind / "backbone"
    cfg = json.loads((src / "config.json").read_text())
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    iq, ikv, i1 = _head_index(nq, hd), _head_index(nkv, hd), _head_index(1, hd)
    w = load_file(str(src / "model.safetensors"))
    for name in list(w):
        t = w[name]
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            idx = iq if "q_proj" in name else ikv
            w[name] = t.new_zeros(2 * t.shape[0], t.shape[1]).index_copy_(0, idx, t)
        elif name.endswith("o_proj.weight"):
            w[name] = t.new_zeros(t.shape[0], 2 * t.shape[1]).index_copy_(1, iq, t)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            gain = 1.0 if "q_norm" in name else 2 ** -0.5
            w[name] = t.new_zeros(2 * hd).index_copy_(0, i1, t * gain)
    cfg["head_dim"] = 2 * hd
    cfg["rope_parameters"]["rope_theta"] = cfg["rope_parameters"]["rope_theta"] ** 2
    backbone = out / "backbone"
    backbone.mkdir(parents=True)
    (backbone / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(backbone / "model.safetensors"))

    ad = load_adapter(FIXTURES / kind / "adapter", hf_config(kind))
    wide = DeltaMemConfig(**{**ad.config.to_dict(), "q_out_size": nq * 2 * hd})
    state = ad.module.state_dict()
    for name, t in state.items():
        if name.endswith("b_q.weight"):
            state[name] = t.new_zeros(2 * t.shape[0], t.shape[1]).index_copy_(0, iq, t)
    module = DeltaMem(wide)
    module.load_state_dict(state)
    adapter = out / "adapter"
    save_adapter(Adapter(module, None, {"widened_from": kind}), adapter)
    return backbone, adapter


def reference_run(kind: str, forward) -> dict[str, float]:
    """Relative errors of a runtime against a fixture: `forward(ids, state, write, message_ids)`
    returns (logits (T, V), final state (L, H, r, r)); the write pass from a zero state with
    writes on, then the read pass from its state with writes off. Logits are compared centred
    (an engine gives log-probabilities: logits up to a constant per row)."""
    exp = load_file(str(FIXTURES / kind / "expected.safetensors"))
    mids = exp.get("write_message_ids")

    def centred(x):
        x = x.float()
        return x - x.mean(-1, keepdim=True)

    errors = {}
    logits, state = forward(exp["write_ids"][0].tolist(), None, True,
                            None if mids is None else mids[0].tolist())
    errors["write_logits"] = max_rel(centred(logits), centred(exp["write_logits"]))
    for slot in range(state.shape[0]):
        want = exp[f"state_after_write.model.layers.{slot}.self_attn"]
        errors[f"state_after_write.{slot}"] = max_rel(state[slot].reshape(want.shape), want)
    logits, after = forward(exp["read_ids"][0].tolist(), state, False, None)
    errors["read_logits"] = max_rel(centred(logits), centred(exp["read_logits"]))
    assert torch.equal(after, state)  # writes off: nothing written
    return errors


@pytest.mark.parametrize("kind", KINDS)
def test_widened_fixture_is_the_same_function(tmp_path, kind):
    """The HF runtime on the widened backbone and adapter reproduces the reference's outputs:
    the widening the engine tests rely on changes nothing but the heads' width."""
    from deltamem.hf_runtime import DeltaMemHF

    backbone, adapter = widened_fixture(kind, tmp_path)
    rt = DeltaMemHF.from_pretrained(backbone, adapter=load_adapter(adapter))
    assert rt.model.config.head_dim == 32

    def forward(ids, state, write, mids):
        with torch.no_grad():
            logits, final, _ = rt.forward(
                torch.tensor([ids]), None if state is None else state.unsqueeze(0),
                torch.full((1, len(ids)), write),
                message_ids=None if mids is None else torch.tensor([mids]))
        return logits[0], final[0]

    errors = reference_run(kind, forward)
    assert max(errors.values()) <= TOL, errors


def one_ingest(message_ids: list[int]):
    """The whole prompt as one SSW ingest whose messages are the runs of equal ids >= 0 (-1:
    a token of no message), as `DeltaMemHF.run` takes an SSW prompt."""
    from server.engine.model import Ingest

    spans = []
    for t, m in enumerate(message_ids):
        if m >= 0 and spans and spans[-1][1] == t and message_ids[t - 1] == m:
            spans[-1][1] = t + 1
        elif m >= 0:
            spans.append([t, t + 1])
    return [Ingest(0, len(message_ids), tuple(map(tuple, spans)))]


def engine_forward(host, engine, vocab: int, ssw: bool):
    """`reference_run`'s forward through a vLLM engine: the prompt's logits are its prompt
    log-probabilities (position t's distribution is that of token t + 1) and the one sampled
    token's, the state the one the engine hands back. SSW: the write pass is one ingest of
    the fixture's messages, the read pass none."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=1, logprobs=vocab, prompt_logprobs=vocab,
                        detokenize=False)

    def forward(ids, state, write, mids):
        kw = {"ingests": one_ingest(mids) if mids else []} if ssw else {}
        _, last = host.generate(ids, sp, state, 0 if write else len(ids), engine=engine, **kw)
        rows = [*last.prompt_logprobs[1:], last.logprobs[0]]
        logits = torch.empty(len(ids), vocab)
        for t, row in enumerate(rows):
            assert len(row) == vocab
            for tok, lp in row.items():
                logits[t, tok] = lp.logprob
        return logits, last.final_state

    return forward


@pytest.mark.parametrize("kind", KINDS)
def test_engine_reproduces_the_reference(engine_host, tmp_path, kind):
    """The vLLM engine (float32, on the widened fixture, 32-token prefill chunks so the
    48-token write pass runs in two steps) reproduces the reference's logits and states: TSW,
    MSW and SSW (the write pass one ingest of the fixture's messages)."""
    backbone, adapter = widened_fixture(kind, tmp_path)
    cfg = engine_host.config(model_dir=backbone, adapter_dir=adapter, max_model_len=512,
                             max_num_seqs=4, max_num_batched_tokens=32, kv_cache_gib=1,
                             extra_engine_args={"skip_tokenizer_init": True,
                                                "max_logprobs": 1024})
    engine = engine_host.start_engine(cfg)
    try:
        errors = reference_run(kind, engine_forward(engine_host, engine, 1024, kind == "ssw"))
    finally:
        engine_host.stop_engine(engine)
    assert max(errors.values()) <= TOL, errors


# --- import: what loads ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fixture_adapters_import_with_and_without_the_backbone_config(kind):
    """The real names, shapes and orientation: memory_{q,k,v}_proj (H·r, d), beta_proj and
    beta_bias, delta_q/o_proj (out, H·r) are our Linear weights as they are; the zero
    delta_k/v_proj are dropped; target_layers [] is every layer. Without the backbone's
    config the shapes and layer count come from the weights, with the same result."""
    cfg_doc = json.loads((FIXTURES / kind / "adapter" / REF_CONFIG_FILE).read_text())
    assert list(cfg_doc) == list(REF_FIELDS) and len(REF_FIELDS) == 49
    raw = ref_weights(kind)
    ad = load_adapter(FIXTURES / kind / "adapter", hf_config(kind))
    c = ad.config
    assert (c.rank, c.alpha, c.num_state_heads, c.delta_heads) == (8, 16.0, cfg_doc[
        "num_state_heads"], ("q", "o"))
    assert c.write_granularity == {"ssw": "message_mean"}.get(kind, "token")
    assert c.target_layers is None and c.layers == [0, 1, 2]
    assert ad.backbone is None and ad.meta["reference"]["config"] == cfg_doc
    sd = ad.module.state_dict()
    assert len(sd) == 3 * 7
    for i in range(3):
        pre = f"model.layers.{i}.self_attn."
        for ours, theirs in (("w_q.weight", "memory_q_proj"), ("w_k.weight", "memory_k_proj"),
                             ("w_v.weight", "memory_v_proj"), ("w_beta.weight", "beta_proj"),
                             ("w_beta.bias", "beta_bias"), ("b_q.weight", "delta_q_proj"),
                             ("b_o.weight", "delta_o_proj")):
            assert torch.equal(sd[f"layers.{i}.{ours}"], raw[pre + theirs]), (i, ours)
    assert load_adapter(FIXTURES / kind / "adapter").fingerprint() == ad.fingerprint()


def test_initialisation_only_fields_load_with_any_value(tmp_path):
    """Fields that only initialise parameters, or configure a part the required fields
    switch off, change nothing once weights are loaded: any value of their kind loads."""
    inert = {"beta_bias_init": -4.0, "output_init": "zero", "base_slice_ref_width": 16,
             "online_gain": 0.5, "memory_partition_sigmoid_gate_bias_init": 1.0,
             "global_memory_gate_bias_init": 0.0, "global_memory_read_logit_bias": 2.0,
             "memory_reader_hidden_size": 64, "memory_reader_residual_scale": 1.0,
             "memory_reader_read_only": False, "latent_memory_hidden_size": 8,
             "latent_memory_residual_scale": 0.5, "latent_memory_slots": 2,
             "latent_memory_init_std": 0.1, "latent_gate_init": 0.5,
             "delta_o_rmsnorm_eps": 1e-5, "delta_scale_init": 0.5, "delta_scale_max": 4.0,
             "delta_scale_granularity": "head"}
    assert sorted(inert) == sorted(k for k, (_, rule) in REF_FIELDS.items() if rule == "inert")
    base = load_adapter(FIXTURES / "tsw" / "adapter")
    ad = load_adapter(ref_copy(tmp_path, config=inert))
    assert ad.fingerprint() == base.fingerprint()
    # Fields left out take the reference's defaults (delta_heads aside, which defaults to
    # q, k, v and o there and so is refused).
    slim = {k: None for k in REF_FIELDS if k != "delta_heads"}
    assert load_adapter(ref_copy(tmp_path / "slim", config=slim)).fingerprint() == \
        base.fingerprint()
    with pytest.raises(AdapterError, match="delta_heads"):
        load_adapter(ref_copy(tmp_path / "noheads", config={"delta_heads": None}))
    # Case and whitespace as the reference reads them.
    ad = load_adapter(ref_copy(tmp_path / "case", config={"state_update_mode": " Standard",
                                                          "memory_write_granularity": "TOKEN",
                                                          "delta_heads": "q, o"}))
    assert ad.fingerprint() == base.fingerprint()


def test_one_gate_per_state_head_loads_as_the_same_gate_per_row(tmp_path):
    """rankwise_gates false: beta_proj (H, d) and beta_bias (H,) gate each state head as a
    whole; repeating each row r times is the same gate, so the runtime computes the same."""
    from deltamem.hf_runtime import DeltaMemHF

    raw = ref_weights("msw")
    per_head = dict(raw)
    for i in range(3):
        pre = f"model.layers.{i}.self_attn."
        per_head[pre + "beta_proj"] = raw[pre + "beta_proj"][::8].clone()
        per_head[pre + "beta_bias"] = raw[pre + "beta_bias"][::8].clone()
    ad = load_adapter(ref_copy(tmp_path, "msw", {"rankwise_gates": False}, per_head))
    w = ad.module.layer(1).w_beta
    assert torch.equal(w.weight, raw["model.layers.1.self_attn.beta_proj"][::8]
                       .repeat_interleave(8, 0))
    assert torch.equal(w.bias, raw["model.layers.1.self_attn.beta_bias"][::8]
                       .repeat_interleave(8, 0))
    rt = DeltaMemHF.from_pretrained(FIXTURES / "msw" / "backbone", adapter=ad)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        _, state, _ = rt.forward(ids)
    # Within each head, all rows share one gate: the per-row form of a per-head gate.
    p = ad.module.layer(0).project(torch.randn(5, 64))
    assert torch.equal(p.beta, p.beta[..., :1].expand_as(p.beta))
    assert state.abs().sum() > 0


def test_target_layers_name_the_wrapped_layers(tmp_path):
    raw = ref_weights("tsw")
    two = {k: v for k, v in raw.items() if ".layers.1." not in k}
    folder = ref_copy(tmp_path, "tsw", {"target_layers": [0, 2]}, two)
    ad = load_adapter(folder, hf_config("tsw"))
    assert ad.config.target_layers == [0, 2] and ad.config.layers == [0, 2]
    assert ad.config.num_layers == 3
    # Without the backbone's config the layer count is unknown: asked for, not guessed.
    with pytest.raises(AdapterError, match="give the backbone's config"):
        load_adapter(folder)
    # The weights must be exactly the target layers'.
    with pytest.raises(AdapterError, match=r"missing \[\], unexpected \[1\]"):
        load_adapter(ref_copy(tmp_path / "b", "tsw", {"target_layers": [0, 2]}), hf_config("tsw"))
    with pytest.raises(AdapterError, match=r"missing \[2\]"):
        load_adapter(ref_copy(tmp_path / "c", "tsw", None,
                              {k: v for k, v in raw.items() if ".layers.2." not in k}),
                     hf_config("tsw"))
    with pytest.raises(AdapterError, match="beyond the backbone's 3"):
        load_adapter(ref_copy(tmp_path / "d", "tsw", {"target_layers": [0, 5]}, two),
                     hf_config("tsw"))


# --- import: what is refused -------------------------------------------------------------------

REFUSED = [
    ("normalize_qk", False), ("couple_lambda", False), ("state_update_mode", "no_lambda"),
    ("state_update_mode", "lambda_outside"), ("num_memory_partitions", 4),
    ("num_global_memory_partitions", 1), ("memory_partition_routing", "hard"),
    ("memory_partition_basis", "independent"), ("tie_memory_partition_read_write", True),
    ("memory_partition_read_mode", "sigmoid"), ("slot_read_top_k", 2),
    ("global_memory_mode", "read_only"), ("global_memory_read_top_k", 1),
    ("global_memory_merge_mode", "joint_softmax"), ("memory_reader_layers", [1]),
    ("memory_readout_mode", "synthetic_kv"), ("memory_write_source", "raw_hidden"),
    ("memory_write_granularity", "sentence_mean"),
    ("memory_write_granularity", "message_proposals"),
    ("memory_write_proposals_per_message", 3), ("synthetic_memory_slots", 2),
    ("latent_memory_layers", [0]), ("target_modules", ["self_attn", "mlp"]),
    ("target_modules", "self_attn"), ("delta_heads", ["q", "k", "v", "o"]),
    ("delta_heads", ["q", "v"]), ("delta_heads", ["q", "x"]), ("delta_o_rmsnorm", True),
    ("trainable_delta_scale", True), ("delta_scale_parameterization", "free"),
    ("rank", 0), ("num_state_heads", 0), ("alpha", "16"), ("output_init", "orthogonal"),
    ("delta_scale_granularity", "token"), ("target_layers", [-1]), ("target_layers", 3),
    ("rankwise_gates", "yes"), ("surprise_field", 1),
]


@pytest.mark.parametrize(("field", "value"), REFUSED,
                         ids=[f"{f}={v}" for f, v in REFUSED])
def test_a_field_this_project_does_not_compute_is_refused_by_name(tmp_path, field, value):
    folder = ref_copy(tmp_path, config={field: value})
    with pytest.raises(AdapterError) as err:
        load_adapter(folder, hf_config("tsw"))
    assert f"{field} = {value!r}" in str(err.value)
    assert "1 field(s) refused" in str(err.value)


def test_every_required_field_has_a_refusal_test():
    required = {k for k, (_, rule) in REF_FIELDS.items() if rule not in ("map", "inert")}
    assert required <= {f for f, _ in REFUSED}
    assert {"rank", "alpha", "num_state_heads", "memory_write_granularity", "delta_heads",
            "target_layers", "rankwise_gates"} == {k for k, (_, r) in REF_FIELDS.items()
                                                   if r == "map"}


def test_all_refused_fields_are_named_at_once(tmp_path):
    folder = ref_copy(tmp_path, config={"couple_lambda": False, "delta_o_rmsnorm": True,
                                        "trainable_delta_scale": True})
    with pytest.raises(AdapterError, match="3 field") as err:
        load_adapter(folder)
    for name in ("couple_lambda = False", "delta_o_rmsnorm = True",
                 "trainable_delta_scale = True", "λ", "RMSNorm", "delta_scale_raw"):
        assert name in str(err.value)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    raw = ref_weights("tsw")
    pre = "model.layers.1.self_attn."
    # Δk/Δv: zeros are dropped, anything else is named.
    kv = dict(raw)
    kv[pre + "delta_v_proj"] = torch.full_like(raw[pre + "delta_v_proj"], 1e-3)
    with pytest.raises(AdapterError, match=r"non-zero.*model\.layers\.1\.self_attn\.delta_v_proj"):
        load_adapter(ref_copy(tmp_path / "kv", weights=kv))
    # A head delta_heads leaves out: its weights must be zero (and then it is left out).
    ad = load_adapter(ref_copy(tmp_path / "q", config={"delta_heads": ["q"]}, weights={
        k: (torch.zeros_like(v) if k.endswith("delta_o_proj") else v) for k, v in raw.items()}))
    assert ad.config.delta_heads == ("q",) and ad.module.layer(0).b_o is None
    with pytest.raises(AdapterError, match="delta_o_proj"):
        load_adapter(ref_copy(tmp_path / "q2", config={"delta_heads": ["q"]}))
    # Names as this project once guessed them (with .weight), or parameters of parts it
    # does not compute, are unrecognised.
    for bad in ({pre + "memory_q_proj.weight": raw[pre + "memory_q_proj"]},
                {pre + "lambda_proj": raw[pre + "beta_proj"]},
                {pre + "delta_o_rmsnorm_weight": torch.ones(64)}):
        with pytest.raises(AdapterError, match="unrecognised keys"):
            load_adapter(ref_copy(tmp_path / "x", weights={**raw, **bad}))
        shutil.rmtree(tmp_path / "x")
    # Wrong shapes, a missing parameter, another backbone.
    wrong = {**raw, pre + "memory_k_proj": raw[pre + "memory_k_proj"].t().contiguous()}
    with pytest.raises(AdapterError, match=r"memory_k_proj has shape \(64, 8\), expected \(8, 64\)"):
        load_adapter(ref_copy(tmp_path / "s", weights=wrong))
    lacking = {k: v for k, v in raw.items() if k != pre + "beta_bias"}
    with pytest.raises(AdapterError, match=r"layer 1 lacks \['beta_bias'\]"):
        load_adapter(ref_copy(tmp_path / "l", weights=lacking))
    other = hf_config("tsw")
    other.num_key_value_heads = 4
    with pytest.raises(AdapterError, match="this one has"):
        load_adapter(FIXTURES / "tsw" / "adapter", other)
    # Not a plain state dict: weights_only refuses it.
    folder = ref_copy(tmp_path / "pickle")
    torch.save({"x": object()}, folder / REF_WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="weights_only=True"):
        load_adapter(folder)


# --- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_export_of_an_imported_adapter_is_the_reference_folder_again(tmp_path, kind):
    """import then export gives back the release's files: the same 49 config fields and
    values, the same state dict (keys in order, shapes, dtype, values), loadable with
    weights_only=True; and importing that gives the same adapter, meta and all."""
    src = FIXTURES / kind / "adapter"
    ad = load_adapter(src)
    out = export_reference_adapter(ad, tmp_path / "out")
    assert json.loads((out / REF_CONFIG_FILE).read_text()) == \
        json.loads((src / REF_CONFIG_FILE).read_text())
    a, b = ref_weights(kind), torch.load(out / REF_WEIGHTS_FILE, weights_only=True)
    assert type(b) is dict and list(b) == list(a)
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(b[k], a[k]), k
    again = load_adapter(out)
    assert again.fingerprint() == ad.fingerprint() and again.meta == ad.meta
    assert again.config.to_dict() == ad.config.to_dict()
    # A release in bfloat16 (the released adapter's dtype) goes back out in bfloat16.
    bf = ref_copy(tmp_path, kind, weights={k: v.bfloat16() for k, v in a.items()})
    out = export_reference_adapter(load_adapter(bf), tmp_path / "bf-out")
    b = torch.load(out / REF_WEIGHTS_FILE, weights_only=True)
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)


def test_import_of_an_export_round_trips_a_project_adapter_exactly(tmp_path):
    """A project adapter (some layers, two heads, a backbone identity, meta) through the
    reference format and back: config, weights, identity and meta all equal; stored as
    bfloat16 it comes back rounded, still with its identity; the reference format needs the
    backbone's key/value width, so exporting a native adapter needs the backbone's config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tsw" / "backbone")
    ad = new_adapter(model, BackboneIdentity("tiny", "sha256:abc"), seed=3,
                     num_state_heads=2, target_layers=[2, 0])
    with torch.no_grad():
        for layer in ad.module.layers.values():
            layer.w_beta.weight.normal_(0, 0.1)
    ad.meta["note"] = "made here"
    with pytest.raises(AdapterError, match="backbone's config"):
        export_reference_adapter(ad, tmp_path / "x")
    out = export_reference_adapter(ad, tmp_path / "ref", model.config)
    doc = json.loads((out / REF_CONFIG_FILE).read_text())
    assert list(doc) == list(REF_FIELDS)
    assert doc["target_layers"] == [2, 0] and doc["num_state_heads"] == 2
    assert doc["output_init"] == "base_slice_fixed" and doc["delta_heads"] == ["q", "o"]
    sd = torch.load(out / REF_WEIGHTS_FILE, weights_only=True)
    assert sorted({k.split(".")[2] for k in sd}) == ["0", "2"]
    assert sd["model.layers.0.self_attn.delta_k_proj"].shape == (32, 16)
    assert not sd["model.layers.0.self_attn.delta_k_proj"].any()
    back = load_adapter(out)  # the sidecar gives the layer count, identity and meta
    assert back.config.to_dict() == ad.config.to_dict()
    assert back.fingerprint() == ad.fingerprint()
    assert back.backbone == ad.backbone and back.meta == ad.meta
    assert load_adapter(out, model.config).fingerprint() == ad.fingerprint()
    # And on to the project format and back again.
    assert load_adapter(save_adapter(back, tmp_path / "ours")).fingerprint() == ad.fingerprint()
    half = load_adapter(export_reference_adapter(ad, tmp_path / "bf16", model.config,
                                                 torch.bfloat16))
    for k, v in half.module.state_dict().items():
        assert torch.equal(v, ad.module.state_dict()[k].bfloat16().float()), k
    assert half.backbone == ad.backbone
    # Weights changed after the export (trained on in the reference): no identity claimed.
    sd["model.layers.0.self_attn.beta_bias"] += 1
    torch.save(sd, out / REF_WEIGHTS_FILE)
    changed = load_adapter(out)
    assert changed.backbone is None and changed.meta["imported_from"] == str(out)


def test_adapter_cli_imports_and_exports(tmp_path, capsys):
    from deltamem.cli import main

    src, backbone = FIXTURES / "msw" / "adapter", FIXTURES / "msw" / "backbone"
    assert main(["adapter", "import", str(src), str(tmp_path / "ours"), "--model",
                 str(backbone)]) == 0
    ours = load_adapter(tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_config.json").is_file()
    assert ours.fingerprint() == load_adapter(src).fingerprint()
    assert ours.backbone is not None and ours.backbone.name == "backbone"
    assert main(["adapter", "export", str(tmp_path / "ours"), str(tmp_path / "ref")]) == 0
    assert json.loads((tmp_path / "ref" / REF_CONFIG_FILE).read_text()) == \
        json.loads((src / REF_CONFIG_FILE).read_text())
    assert (tmp_path / "ref" / EXPORT_SIDECAR).is_file()
    assert load_adapter(tmp_path / "ref").backbone == ours.backbone
    capsys.readouterr()
    bad = ref_copy(tmp_path, "msw", {"couple_lambda": False})
    assert main(["adapter", "import", str(bad), str(tmp_path / "no")]) == 1
    assert "couple_lambda = False" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


# --- the reference's initialisation -----------------------------------------------------------

def test_msw_initialisation_fills_only_the_first_head_from_the_backbone():
    """B_q and B_o start as 0.05 × the column-normalised first 8 columns of the backbone's
    W_Q and W_O (F.normalize, ε = 1e-6, as the reference's base_slice_fixed); with H > 1 the
    other heads' columns are zero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "msw" / "backbone")
    for heads in (1, 4):
        ad = new_adapter(model, seed=0, num_state_heads=heads)
        for i, layer in ad.module.layers.items():
            attn = model.model.layers[int(i)].self_attn
            for b, w in ((layer.b_q, attn.q_proj.weight), (layer.b_o, attn.o_proj.weight)):
                want = torch.nn.functional.normalize(w[:, :8].float(), dim=0, eps=1e-6) * 0.05
                torch.testing.assert_close(b.weight[:, :8], want, rtol=1e-6, atol=0)
                cols = w[:, :8].float()  # one head: bit for bit the earlier initialisation
                assert torch.equal(b.weight[:, :8], 0.05 * cols / cols.norm(dim=0, keepdim=True))
                assert not b.weight[:, 8:].any() and b.weight.shape[1] == 8 * heads
            assert torch.equal(layer.w_beta.bias, torch.full((8 * heads,), -1.5))
            assert not layer.w_beta.weight.any()


# --- training an SSW adapter ------------------------------------------------------------------

def test_training_an_ssw_adapter_passes_message_ids(model_dir, tokenizer):
    """Training's write passes give an SSW adapter the history's message ids (numbered as the
    reference's session runtime numbers them), β regularises the messages' writes, the
    gradient reaches the write side through the state; a batch without message ids is
    refused rather than trained as token writes."""
    from deltamem import data as D
    from deltamem.episodes import (
        BetaProbe,
        Encoder,
        episode_loss,
        evaluate,
        general_loss,
        make_batch,
        state_gain,
        writes_messages,
    )
    from deltamem.hf_runtime import DeltaMemHF

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rt = DeltaMemHF.from_pretrained(model_dir, seed=0, target_layers=[28, 29],
                                        write_granularity="message_mean",
                                        scan_backend="chunked")
        enc = Encoder(tokenizer)
        eps = [D.make_episode("train", 0, i, 1) for i in range(2)]
        assert writes_messages(rt)
        batch = make_batch(enc, eps, [True, False], message_ids=True)
        start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        for b, ep in enumerate(eps):
            mids = batch["h_mids"][b]
            n = len(enc.history(ep))
            assert (mids[n:] == -1).all() and batch["h_mask"][b, :n].all()
            msgs = ep.history
            assert msgs[0]["role"] == "system"
            sys_len = len(enc.ids(msgs[:1]))
            assert (mids[:sys_len] == -1).all() and (mids[sys_len:n] >= 0).all()
            ids = batch["h_ids"][b]
            firsts = [sys_len + int(i) for i in
                      torch.nonzero(mids[sys_len + 1:n] != mids[sys_len:n - 1]).flatten() + 1]
            assert mids[n - 1] == len(msgs) - 2  # non-system messages, numbered from 0
            assert all(ids[t] == start for t in [sys_len, *firsts])  # a message per header
            assert len(firsts) == len(msgs) - 2
        # The read pass: the written question is one message, each answer token its own.
        r = batch["r_mids"][0][batch["r_mask"][0]]
        assert r[0] == 0 and (r[1:] >= 0).all()
        probe = BetaProbe(rt.adapter.module)
        loss, m = episode_loss(rt, batch, probe)
        assert all(o.shape[:2] == (2, int(batch["h_mids"].max()) + 1) for o in probe.outputs)
        assert 0 < m["mean_beta"] < 1 and m["beta_reg"] > 0
        loss.backward()
        assert rt.adapter.module.layer(28).w_k.weight.grad.abs().sum() > 0
        rt.adapter.module.zero_grad(set_to_none=True)
        probe.remove()
        with pytest.raises(ValueError, match="message_ids"):
            episode_loss(rt, make_batch(enc, eps, [True, False]))
        with torch.no_grad():
            ev = evaluate(rt, enc, {1: eps}, batch=2)
            g = state_gain(rt, enc, eps, batch=2)
            assert g["exact"] == ev["1"]
            # A sessionless request reads the fresh state: SSW leaves it the backbone's.
            rows = [(enc.ids([{"role": "user", "content": "Hi"}], True) + [42, 43], 10)]
            assert float(general_loss(rt, rows, enc.pad_id, "kl")) == 0.0
    finally:
        torch.set_num_threads(threads)


def test_train_takes_a_reference_adapter_and_a_write_granularity(tmp_path):
    from deltamem.train import starting_adapter
    from deltamem.train_config import ConfigError, TrainConfig

    assert TrainConfig(write_granularity="message_mean").write_granularity == "message_mean"
    with pytest.raises(ConfigError, match="--write-granularity"):
        TrainConfig(write_granularity="sentence_mean")
    cfg = TrainConfig(init_adapter=FIXTURES / "ssw" / "adapter")
    ad = starting_adapter(cfg, None, FIXTURES / "ssw" / "backbone")
    assert ad.config.write_granularity == "message_mean"
    assert ad.fingerprint() == load_adapter(FIXTURES / "ssw" / "adapter").fingerprint()
    cfg = TrainConfig(init_adapter=FIXTURES / "ssw" / "adapter", write_granularity="token")
    with pytest.raises(AdapterError, match="writes per 'message_mean'"):
        starting_adapter(cfg, None)
