"""Adapter files: the project's format, the reference release's format, and identities.

Project format (a folder):
    adapter_config.json    {"format": "deltamem-adapter", "version": 1 | 2, "config": {...},
                            "backbone": {"name": ..., "fingerprint": ...}, "meta": {...}}
    adapter.safetensors    the δ-mem parameters, keys "layers.<i>.<w_q|w_k|w_v|w_beta|b_q|b_o>.*",
                           stored as float32 (or float16 / bfloat16); always loaded as float32.
                           Version 2: a weight some of whose rows along the memory dimension
                           (the columns of b_q and b_o) are all zero is stored without them,
                           with "<key>.rows" (int32) naming the rows kept; the rest load as 0.
                           So heads that only some layers use cost nothing elsewhere.

Reference format (the public release, declare-lab/delta-Mem; docs/design.md §6):
    delta_mem_config.json  the 49 fields of the reference's HFDeltaMemConfig (REF_FIELDS says
                           how each is handled: loaded, or refused naming it)
    delta_mem_adapter.pt   a plain torch state dict (loaded with weights_only=True) keyed
                           "model.layers.<i>.self_attn.<name>", bare parameters without
                           ".weight": memory_{q,k,v}_proj (H·r, d), beta_proj (H·r, d) and
                           beta_bias (H·r,) (one gate per state head, (H, d) and (H,), with
                           rankwise_gates false), delta_q_proj (q heads·head dim, H·r),
                           delta_o_proj (d, H·r), and delta_k_proj / delta_v_proj (kv heads·head
                           dim, H·r), always saved, zero unless k/v are delta heads. Stored in
                           the backbone's dtype; nn.Linear's orientation, so no transposes.
    deltamem_export.json   (ours, only in folders `export_reference_adapter` writes; the
                           reference ignores it) the backbone identity, layer count and meta
                           of the exported adapter, restored by the import when the weights
                           are still the exported ones, so import(export(a)) == a.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .layer import BASE_SLICE_REF_WIDTH, BETA_BIAS_INIT, ONLINE_GAIN, DeltaMem, DeltaMemConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
REF_CONFIG_FILE = "delta_mem_config.json"
REF_WEIGHTS_FILE = "delta_mem_adapter.pt"
FORMAT_NAME = "deltamem-adapter"
FORMAT_VERSION = 2  # written only when rows are left out; version 1 files load as they are
ROWS_SUFFIX = ".rows"

# The reference's per-layer parameters (bare names under model.layers.<i>.self_attn) and ours.
REF_PARAMS = {
    "memory_q_proj": "w_q.weight",
    "memory_k_proj": "w_k.weight",
    "memory_v_proj": "w_v.weight",
    "delta_q_proj": "b_q.weight",
    "delta_k_proj": None,  # Δk: always saved, must be zero here (dropped)
    "delta_v_proj": None,  # Δv: likewise
    "delta_o_proj": "b_o.weight",
    "beta_proj": "w_beta.weight",
    "beta_bias": "w_beta.bias",
}
_REF_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(\w+)")
EXPORT_SIDECAR = "deltamem_export.json"
EXPORT_FORMAT = "deltamem-reference-export"

class AdapterError(ValueError):
    """An adapter that cannot be used: missing files, bad shapes, wrong backbone."""


@dataclass
class BackboneIdentity:
    name: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.name}@{self.fingerprint}"


@dataclass
class Adapter:
    """δ-mem parameters plus what they were made for."""

    module: DeltaMem
    backbone: BackboneIdentity | None
    meta: dict = field(default_factory=dict)

    @property
    def config(self) -> DeltaMemConfig:
        return self.module.cfg

    def fingerprint(self) -> str:
        return _fingerprint(self.config, self.module.state_dict())

    def check_backbone(self, backbone: BackboneIdentity) -> None:
        if self.backbone is None:
            return
        if self.backbone.fingerprint != backbone.fingerprint:
            raise AdapterError(
                f"adapter was trained for backbone {self.backbone} but the model is {backbone}; "
                "refusing to load it (a state or adapter of another backbone is meaningless)")


def _fingerprint(cfg: DeltaMemConfig, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def backbone_fingerprint(model_dir: str | Path) -> BackboneIdentity:
    """Identity of a backbone folder: its config's shapes and a hash of its weight files."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    h = hashlib.sha256()
    for key in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        h.update(f"{key}={cfg.get(key)};".encode())
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise AdapterError(f"no weight files in {model_dir}")
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return BackboneIdentity(name=model_dir.name, fingerprint="sha256:" + h.hexdigest()[:16])


def _init_adapter(cfg: DeltaMemConfig, backbone_weights, backbone: BackboneIdentity | None,
                  seed: int | None) -> Adapter:
    if seed is not None:
        torch.manual_seed(seed)
    mod = DeltaMem(cfg)
    for i in cfg.layers:
        w_q, w_o = backbone_weights(i)
        mod.layer(i).reset_parameters(w_q, w_o)
    return Adapter(mod, backbone, {"trained": False, "init_seed": seed})


def new_adapter(hf_model, backbone: BackboneIdentity | None = None, seed: int | None = None,
                **cfg_kw) -> Adapter:
    """A freshly initialised (untrained) adapter for a loaded HF Llama/Qwen3 model."""
    cfg = DeltaMemConfig.for_backbone(hf_model.config, **cfg_kw)
    layers = hf_model.model.layers

    def weights(i):
        attn = layers[i].self_attn
        return attn.q_proj.weight.detach(), attn.o_proj.weight.detach()

    return _init_adapter(cfg, weights, backbone, seed)


def new_adapter_from_checkpoint(model_dir: str | Path, seed: int | None = 0,
                                **cfg_kw) -> Adapter:
    """The same untrained adapter as `new_adapter`, read from the weight files alone (no
    model is built: the server makes its default adapter this way)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    cfg = DeltaMemConfig.for_backbone(AutoConfig.from_pretrained(model_dir), **cfg_kw)
    handles = [safe_open(str(f), "pt") for f in sorted(model_dir.glob("*.safetensors"))]

    def tensor(name):
        for h in handles:
            if name in h.keys():
                return h.get_tensor(name).float()
        raise AdapterError(f"{model_dir} has no weight {name}")

    def weights(i):
        pre = f"model.layers.{i}.self_attn."
        return tensor(pre + "q_proj.weight"), tensor(pre + "o_proj.weight")

    return _init_adapter(cfg, weights, backbone_fingerprint(model_dir), seed)


def widen_state_heads(adapter: Adapter, heads: int, seed: int | None = 0,
                      beta_bias: float | None = None) -> Adapter:
    """The same adapter with `heads` state heads per layer instead of its own, computing the
    same function: the old heads keep their weights, the new ones get a fresh write side and
    zero read-out columns (B_q, B_o), so they start silent and learn from the first step on.
    Lets a trained TSW adapter grow into MSW without starting over. `beta_bias` sets the new
    heads' b_β (default the reference's −1.5, docs/design.md §1): a low one gives slow heads, whose rows keep a write
    across hundreds of tokens where the trained heads keep it for tens."""
    old = adapter.config
    if heads < old.num_state_heads:
        raise AdapterError(f"cannot narrow an adapter from {old.num_state_heads} state heads "
                           f"to {heads}")
    if old.write_granularity != "token":
        raise AdapterError("widening is only defined for token writes (TSW)")
    if heads == old.num_state_heads:
        return adapter
    if seed is not None:
        torch.manual_seed(seed)
    cfg = DeltaMemConfig.from_dict({**old.to_dict(), "num_state_heads": heads})
    mod = DeltaMem(cfg)
    m_old = old.mem_dim
    with torch.no_grad():
        for i in cfg.layers:
            new, src = mod.layer(i), adapter.module.layer(i)
            new.reset_parameters()  # fresh write side for the new heads
            for name in ("w_q", "w_k", "w_v", "w_beta"):
                getattr(new, name).weight[:m_old] = getattr(src, name).weight
            new.w_beta.bias[:m_old] = src.w_beta.bias
            if beta_bias is not None:
                new.w_beta.bias[m_old:] = beta_bias
            for name in ("b_q", "b_o"):
                b_new, b_src = getattr(new, name), getattr(src, name)
                if b_new is not None:
                    b_new.weight.zero_()
                    b_new.weight[:, :m_old] = b_src.weight
    meta = {**adapter.meta, "widened_from": {"state_heads": old.num_state_heads,
                                             "fingerprint": adapter.fingerprint()}}
    return Adapter(mod, adapter.backbone, meta)


def save_adapter(adapter: Adapter, path: str | Path, meta: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapter folder. `dtype` is only how the weights are stored (float16 halves
    the file, for shipping within a size limit); loading always gives float32 weights."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f"adapter weights are stored as float32, float16 or bfloat16, "
                           f"not {dtype}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = adapter.module.state_dict()
    tensors = {k: v.detach().cpu().contiguous().to(dtype) for k, v in weights.items()}
    for k, v in weights.items():
        if torch.isfinite(v).all() and not torch.isfinite(tensors[k]).all():
            raise AdapterError(f"adapter weight {k} is out of {dtype}'s range "
                               f"(|w| up to {float(v.abs().max()):.3g}): store it as float32")
    tensors = _leave_out_zero_rows(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION if any(k.endswith(ROWS_SUFFIX) for k in tensors) else 1,
        "config": adapter.config.to_dict(),
        "backbone": None if adapter.backbone is None else {
            "name": adapter.backbone.name, "fingerprint": adapter.backbone.fingerprint},
        "meta": {**adapter.meta, **(meta or {})},
    }
    (path / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return path


def _memory_axis(key: str) -> int:
    """The axis of a δ-mem weight that runs over the state heads' rows: B_q and B_o read the
    memory (its columns), the rest write it."""
    return 1 if key.endswith(("b_q.weight", "b_o.weight")) else 0


def _leave_out_zero_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight without its all-zero rows along the memory axis, plus the rows kept, where
    that saves space: an adapter whose extra heads live in a few layers (zero elsewhere), or
    whose heads were widened to a higher rank, is stored at the size of what it holds."""
    out = {}
    for k, t in tensors.items():
        ax = _memory_axis(k)
        nonzero = (t != 0).any(dim=1 - ax) if t.dim() == 2 else None
        if nonzero is None or bool(nonzero.all()):  # biases are kept whole: rows cost more
            out[k] = t
            continue
        rows = nonzero.nonzero().flatten()
        out[k] = t.index_select(ax, rows).contiguous()
        out[k + ROWS_SUFFIX] = rows.to(torch.int32)
    return out


def _restore_zero_rows(stored: dict[str, torch.Tensor],
                       expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of _leave_out_zero_rows, given the module's own shapes."""
    state = {k: v for k, v in stored.items() if not k.endswith(ROWS_SUFFIX)}
    for key in [k for k in stored if k.endswith(ROWS_SUFFIX)]:
        name = key[:-len(ROWS_SUFFIX)]
        if name not in state or name not in expected:
            raise AdapterError(f"adapter file has rows {key} for no weight it holds")
        ax, rows = _memory_axis(name), stored[key].long()
        full = torch.zeros(expected[name].shape, dtype=state[name].dtype)
        kept = list(state[name].shape)
        if (kept[:ax] + kept[ax + 1:] != list(full.shape[:ax] + full.shape[ax + 1:])
                or rows.numel() != kept[ax] or rows.numel() and (
                    rows.min() < 0 or rows.max() >= full.shape[ax])):
            raise AdapterError(f"adapter weight {name}: its stored rows do not match "
                               f"{key} or its shape {tuple(full.shape)}")
        full.index_copy_(ax, rows, state[name])
        state[name] = full
    return state


def _module_from_state(cfg: DeltaMemConfig, state: dict[str, torch.Tensor]) -> DeltaMem:
    mod = DeltaMem(cfg)
    expected = mod.state_dict()
    state = _restore_zero_rows(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"adapter weights do not match its config: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterError(f"adapter weight {k} has shape {tuple(v.shape)}, "
                               f"expected {tuple(expected[k].shape)}")
    mod.load_state_dict({k: v.float() for k, v in state.items()})
    return mod


def load_adapter(path: str | Path, hf_config=None) -> Adapter:
    """Load an adapter folder in either format: the project's, or the reference release's
    (imported on load, so `deltamem serve --adapter REF_DIR` serves it). `hf_config` (the
    backbone's HF config) is checked against a reference adapter's shapes and gives its layer
    count; without it the layer count comes from the weights (or the export's sidecar)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        doc = json.loads((path / CONFIG_FILE).read_text())
        if doc.get("format") != FORMAT_NAME or doc.get("version") not in (1, FORMAT_VERSION):
            raise AdapterError(f"{path / CONFIG_FILE}: unknown adapter format "
                               f"{doc.get('format')!r} v{doc.get('version')!r}")
        cfg = DeltaMemConfig.from_dict(doc["config"])
        mod = _module_from_state(cfg, load_file(str(path / WEIGHTS_FILE)))
        bb = doc.get("backbone")
        backbone = BackboneIdentity(bb["name"], bb["fingerprint"]) if bb else None
        return Adapter(mod, backbone, doc.get("meta", {}))
    if (path / REF_CONFIG_FILE).is_file():
        return import_reference_adapter(path, hf_config)
    raise AdapterError(f"{path} holds no adapter ({CONFIG_FILE} or {REF_CONFIG_FILE})")


# --- the reference release's format --------------------------------------------------------

MAP = "map"  # becomes part of DeltaMemConfig (or of the weights: rankwise_gates)
INERT = "inert"  # initialisation only, or a part that the required fields switch off

# Every field of the reference's HFDeltaMemConfig, in its order: (its default there, which a
# file that leaves the field out gets; and MAP, INERT or the one value this project computes).
# A field whose value is not loadable is refused, naming it and why (REF_REFUSED).
REF_FIELDS: dict[str, tuple[object, object]] = {
    "rank": (8, MAP),
    "alpha": (16.0, MAP),
    "beta_bias_init": (-1.5, INERT),
    "normalize_qk": (True, True),
    "couple_lambda": (True, True),
    "state_update_mode": ("standard", "standard"),
    "rankwise_gates": (True, MAP),
    "output_init": ("zero", INERT),
    "base_slice_ref_width": (8, INERT),
    "online_gain": (0.05, INERT),
    "num_state_heads": (1, MAP),
    "num_memory_partitions": (1, 1),
    "num_global_memory_partitions": (0, 0),
    "memory_partition_routing": ("soft", "soft"),
    "memory_partition_basis": ("shared", "shared"),
    "tie_memory_partition_read_write": (False, False),
    "memory_partition_read_mode": ("softmax", "softmax"),
    "memory_partition_sigmoid_gate_bias_init": (-2.0, INERT),
    "slot_read_top_k": (0, 0),
    "global_memory_mode": ("shared_rw", "shared_rw"),
    "global_memory_read_top_k": (0, 0),
    "global_memory_merge_mode": ("gated_residual", "gated_residual"),
    "global_memory_gate_bias_init": (-2.0, INERT),
    "global_memory_read_logit_bias": (0.0, INERT),
    "memory_reader_layers": ([], []),
    "memory_reader_hidden_size": (1024, INERT),
    "memory_reader_residual_scale": (0.1, INERT),
    "memory_reader_read_only": (True, INERT),
    "memory_readout_mode": ("delta", "delta"),
    "memory_write_source": ("learned_hidden", "learned_hidden"),
    "memory_write_granularity": ("token", MAP),
    "memory_write_proposals_per_message": (2, 2),
    "synthetic_memory_slots": (1, 1),
    "latent_memory_layers": ([], []),
    "latent_memory_hidden_size": (1024, INERT),
    "latent_memory_residual_scale": (0.1, INERT),
    "latent_memory_slots": (4, INERT),
    "latent_memory_init_std": (0.002, INERT),
    "latent_gate_init": (0.01, INERT),
    "target_modules": (["self_attn"], ["self_attn"]),
    "target_layers": ([], MAP),
    "delta_heads": (["q", "k", "v", "o"], MAP),
    "delta_o_rmsnorm": (False, False),
    "delta_o_rmsnorm_eps": (1e-6, INERT),
    "trainable_delta_scale": (False, False),
    "delta_scale_init": (1.0, INERT),
    "delta_scale_max": (2.0, INERT),
    "delta_scale_granularity": ("layer", INERT),
    "delta_scale_parameterization": ("alpha_over_rank", "alpha_over_rank"),
}
# What a refused value would need that this project does not compute.
REF_REFUSED = {
    "normalize_qk": "q̂ and k̂ without tanh and L2 normalisation",
    "couple_lambda": "an independent λ (keep) gate, lambda_proj (here λ = 1 − β)",
    "state_update_mode": "an update other than the standard delta rule "
                         "S ← diag(1−β) S + diag(β)(v − S k)kᵀ",
    "num_memory_partitions": "memory partitions",
    "num_global_memory_partitions": "global memory partitions",
    "memory_partition_routing": "memory partition routing",
    "memory_partition_basis": "memory partitions",
    "tie_memory_partition_read_write": "memory partitions",
    "memory_partition_read_mode": "memory partition reads",
    "slot_read_top_k": "top-k slot reads",
    "global_memory_mode": "global memory",
    "global_memory_read_top_k": "global memory reads",
    "global_memory_merge_mode": "global memory merging",
    "memory_reader_layers": "memory reader layers",
    "memory_readout_mode": "a read-out other than the Δ corrections",
    "memory_write_source": "writes from something other than the attention input",
    "memory_write_proposals_per_message": "message proposal writes",
    "synthetic_memory_slots": "synthetic KV slots",
    "latent_memory_layers": "latent memory read-outs",
    "target_modules": "δ-mem on modules other than the attention (self_attn)",
    "delta_o_rmsnorm": "an RMSNorm on Δo (delta_o_rmsnorm_weight)",
    "trainable_delta_scale": "a trained scale on the corrections (delta_scale_raw)",
    "delta_scale_parameterization": "a correction scale other than α/r",
}
_REF_OUTPUT_INITS = ("zero", "random", "base_slice", "base_slice_fixed")
_REF_GRANULARITY = {"token": "token", "message_mean": "message_mean"}


def _ref_normalise(default, value):
    """A field's value in its default's kind, as the reference reads it (strings stripped and
    lower-cased, numbers as numbers, lists as lists); ValueError when it is not of that kind."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError("expected a whole number")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value.strip().lower()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError("expected a list")


def _ref_delta_heads(value) -> tuple[str, ...]:
    """The reference's normalize_delta_heads: a list or a comma-separated string, 'none'."""
    items = value.split(",") if isinstance(value, str) else list(value)
    heads = [str(h).strip().lower() for h in items if str(h).strip()]
    if heads == ["none"]:
        return ()
    return tuple(dict.fromkeys(heads))


def check_reference_config(ref: dict) -> tuple[dict, list[str]]:
    """Every field of a reference `delta_mem_config.json` checked: (the full config, missing
    fields at the reference's defaults and values normalised as the reference does; the
    problems, one line per field that cannot be loaded here, naming it and its value)."""
    problems = []
    if not isinstance(ref, dict):
        return {}, [f"the config is a {type(ref).__name__}, not an object"]
    unknown = [k for k in ref if k not in REF_FIELDS]
    for k in unknown:  # the reference itself refuses a field it does not have
        problems.append(f"{k} = {ref[k]!r}: not a field of the reference's HFDeltaMemConfig")
    full = {}
    for name, (default, rule) in REF_FIELDS.items():
        if name == "delta_heads":  # a list or a comma-separated string: below
            continue
        value = ref.get(name, default)
        try:
            full[name] = v = _ref_normalise(default, value)
        except ValueError as e:
            problems.append(f"{name} = {value!r}: {e}")
            continue
        if rule is MAP or rule is INERT:
            continue
        if v != rule:
            problems.append(f"{name} = {value!r}: this project computes only {name} = "
                            f"{rule!r}; {value!r} needs {REF_REFUSED[name]}")
    checks = {
        "rank": lambda v: v >= 1 or "must be at least 1",
        "num_state_heads": lambda v: v >= 1 or "must be at least 1",
        "base_slice_ref_width": lambda v: v >= 1 or "must be at least 1",
        "output_init": lambda v: v in _REF_OUTPUT_INITS or f"not one of {_REF_OUTPUT_INITS}",
        "delta_scale_granularity": lambda v: v in ("layer", "head") or "not 'layer' or 'head'",
        "memory_write_granularity": lambda v: v in _REF_GRANULARITY or (
            "needs per-sentence writes (sentence_mean), which this project does not compute"
            if v == "sentence_mean" else "not 'token' or 'message_mean'"),
        "target_layers": lambda v: all(isinstance(i, int) and not isinstance(i, bool)
                                       and i >= 0 for i in v) or "not a list of layer indices",
    }
    for name, check in checks.items():
        if name in full and (why := check(full[name])) is not True:
            problems.append(f"{name} = {ref.get(name, REF_FIELDS[name][0])!r}: {why}")
    raw = ref.get("delta_heads", REF_FIELDS["delta_heads"][0])
    if not isinstance(raw, (str, list, tuple)):
        problems.append(f"delta_heads = {raw!r}: expected a list of heads")
    else:
        heads = _ref_delta_heads(raw)
        full["delta_heads"] = list(heads)
        kv = [h for h in heads if h in ("k", "v")]
        other = [h for h in heads if h not in ("q", "k", "v", "o")]
        if other:
            problems.append(f"delta_heads = {raw!r}: unknown heads {other}")
        elif kv:
            problems.append(f"delta_heads = {raw!r}: needs Δ corrections of "
                            f"{' and '.join(kv)} (delta_k_proj / delta_v_proj); this "
                            "project corrects q and o only")
    full = {name: full[name] for name in REF_FIELDS if name in full}  # the reference's order
    return full, problems


def _ref_config_error(path: Path, problems: list[str]) -> AdapterError:
    return AdapterError(f"{path / REF_CONFIG_FILE}: the reference adapter cannot be loaded "
                        f"here: {len(problems)} field(s) refused:\n  " + "\n  ".join(problems))


def _kv_out_sizes(hf_config) -> tuple[int, int]:
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads)
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return kv * head_dim, kv * head_dim


def import_reference_adapter(path: str | Path, hf_config=None) -> Adapter:
    """A reference release folder as this project's Adapter (docs/design.md §6). Every
    config field is checked (check_reference_config); the weights must be exactly the
    config's layers and parameters with the config's shapes (and the backbone's, given
    `hf_config`); Δk/Δv must be zero and are dropped, as must the weights of a q or o head
    that delta_heads leaves out. The backbone identity is None unless the folder is one this
    project exported and its weights are unchanged (its sidecar then restores identity and
    meta)."""
    path = Path(path)
    try:
        ref = json.loads((path / REF_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path / REF_CONFIG_FILE}: unreadable: {e}") from None
    full, problems = check_reference_config(ref)
    if problems:
        raise _ref_config_error(path, problems)
    try:
        raw = torch.load(path / REF_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - missing file, pickle refused by weights_only, ...
        raise AdapterError(f"{path / REF_WEIGHTS_FILE}: cannot be loaded as a plain state dict "
                           f"(weights_only=True): {e}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path / REF_WEIGHTS_FILE}: not a state dict but a "
                           f"{type(raw).__name__}")
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in raw.items():
        m = _REF_KEY.fullmatch(str(key))
        if m is None or m.group(2) not in REF_PARAMS or not torch.is_tensor(t):
            bad.append(str(key))
            continue
        per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if bad:
        raise AdapterError(f"{path / REF_WEIGHTS_FILE}: unrecognised keys {bad[:6]}"
                           f"{' ...' if len(bad) > 6 else ''} (expected "
                           f"model.layers.<i>.self_attn.<{'|'.join(REF_PARAMS)}>)")
    if not per_layer:
        raise AdapterError(f"{path / REF_WEIGHTS_FILE}: holds no δ-mem weights")
    sidecar = _read_sidecar(path)

    H, r = full["num_state_heads"], full["rank"]
    m = H * r
    first = per_layer[min(per_layer)]
    for name in ("memory_q_proj", "delta_q_proj", "delta_k_proj", "delta_v_proj",
                 "delta_o_proj"):
        if name not in first or first[name].dim() != 2:
            raise AdapterError(f"{path / REF_WEIGHTS_FILE}: layer {min(per_layer)} has no "
                               f"2-d {name}")
    d, q_out = first["memory_q_proj"].shape[1], first["delta_q_proj"].shape[0]
    k_out, v_out = first["delta_k_proj"].shape[0], first["delta_v_proj"].shape[0]
    target = full["target_layers"]
    if hf_config is not None:
        expect = DeltaMemConfig.for_backbone(hf_config)
        kv_expect = _kv_out_sizes(hf_config)
        if (d, q_out, (k_out, v_out)) != (expect.hidden_size, expect.q_out_size, kv_expect):
            raise AdapterError(
                f"{path}: the adapter is for a backbone of hidden size {d}, {q_out} query and "
                f"{k_out} key/value features; this one has {expect.hidden_size}, "
                f"{expect.q_out_size} and {kv_expect[0]}")
        n_layers = expect.num_layers
    elif sidecar is not None and isinstance(sidecar.get("num_layers"), int):
        n_layers = sidecar["num_layers"]
    elif not target:
        n_layers = max(per_layer) + 1
    else:
        raise AdapterError(f"{path}: target_layers = {target} does not say how many layers the "
                           "backbone has: give the backbone's config (the model) to import it")
    layers = list(target) if target else list(range(n_layers))
    if any(i >= n_layers for i in layers):
        raise AdapterError(f"{path / REF_CONFIG_FILE}: target_layers = {target} names layers "
                           f"beyond the backbone's {n_layers}")
    missing, extra = sorted(set(layers) - set(per_layer)), sorted(set(per_layer) - set(layers))
    if missing or extra:
        raise AdapterError(f"{path / REF_WEIGHTS_FILE}: its layers do not match target_layers "
                           f"= {target} of a {n_layers}-layer backbone: missing {missing}, "
                           f"unexpected {extra}")

    cfg = DeltaMemConfig(
        rank=r, alpha=full["alpha"], num_state_heads=H,
        write_granularity=_REF_GRANULARITY[full["memory_write_granularity"]],
        delta_heads=tuple(h for h in full["delta_heads"]),
        target_layers=list(target) if target else None, hidden_size=d, q_out_size=q_out,
        num_layers=n_layers)
    gate = m if full["rankwise_gates"] else H
    shapes = {"memory_q_proj": (m, d), "memory_k_proj": (m, d), "memory_v_proj": (m, d),
              "delta_q_proj": (q_out, m), "delta_k_proj": (k_out, m),
              "delta_v_proj": (v_out, m), "delta_o_proj": (d, m), "beta_proj": (gate, d),
              "beta_bias": (gate,)}
    inactive = [n for n, h in (("delta_q_proj", "q"), ("delta_o_proj", "o"))
                if h not in cfg.delta_heads] + ["delta_k_proj", "delta_v_proj"]
    state: dict[str, torch.Tensor] = {}
    nonzero = []
    dtypes = set()
    for i in layers:
        got = per_layer[i]
        absent = [n for n in REF_PARAMS if n not in got]
        if absent:
            raise AdapterError(f"{path / REF_WEIGHTS_FILE}: layer {i} lacks {absent}")
        for name, t in got.items():
            key = f"model.layers.{i}.self_attn.{name}"
            if tuple(t.shape) != shapes[name]:
                raise AdapterError(f"{path / REF_WEIGHTS_FILE}: {key} has shape "
                                   f"{tuple(t.shape)}, expected {shapes[name]}")
            if not t.is_floating_point():
                raise AdapterError(f"{path / REF_WEIGHTS_FILE}: {key} is {t.dtype}")
            dtypes.add(str(t.dtype).removeprefix("torch."))
            if name in inactive:
                if bool((t != 0).any()):
                    nonzero.append(key)
                continue
            t = t.detach().to(torch.float32)
            if name.startswith("beta_") and not full["rankwise_gates"]:
                t = t.repeat_interleave(r, dim=0)  # one gate per head = the same gate per row
            state[f"layers.{i}.{REF_PARAMS[name]}"] = t
    if nonzero:
        raise AdapterError(
            f"{path / REF_WEIGHTS_FILE}: non-zero weights of corrections this adapter does not "
            f"apply here (delta_heads = {list(cfg.delta_heads)}; Δk and Δv are not computed "
            f"by this project): {nonzero[:6]}{' ...' if len(nonzero) > 6 else ''}")
    mod = _module_from_state(cfg, state)
    meta = {"imported_from": str(path),
            "reference": {"config": full, "dtype": "/".join(sorted(dtypes)),
                          "kv_out_size": [k_out, v_out]}}
    adapter = Adapter(mod, None, meta)
    if sidecar is not None and sidecar.get("fingerprint") == adapter.fingerprint():
        bb = sidecar.get("backbone")
        adapter.backbone = BackboneIdentity(bb["name"], bb["fingerprint"]) if bb else None
        adapter.meta = sidecar.get("meta", {})
    return adapter


def _read_sidecar(path: Path) -> dict | None:
    f = path / EXPORT_SIDECAR
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == EXPORT_FORMAT else None


def export_reference_adapter(adapter: Adapter, path: str | Path, hf_config=None,
                             dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` in the reference release's format, loadable by the reference
    (attach_delta_mem + load_delta_mem_adapter): the 49-field config and a plain state dict
    (torch.save, loads with weights_only=True) in `dtype` (default: the dtype of the release
    an imported adapter came from, else float32), plus this project's sidecar.

    The reference saves Δk and Δv (zeros here) at the backbone's key/value width: it comes
    from `hf_config`, or from the reference folder an imported adapter came from; without
    either this is an AdapterError. Fields this project does not compute get the values it
    does (normalize_qk, couple_lambda, rankwise_gates true, ...); initialisation-only fields
    keep an imported adapter's values, else this project's initialisation's."""
    cfg = adapter.config
    ref_meta = adapter.meta.get("reference") if isinstance(adapter.meta, dict) else None
    ref_meta = ref_meta if isinstance(ref_meta, dict) else {}
    if dtype is None:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            ref_meta.get("dtype"), torch.float32)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f"reference adapters are stored as float32, float16 or bfloat16, "
                           f"not {dtype}")
    if hf_config is not None:
        expect = DeltaMemConfig.for_backbone(hf_config)
        got = (cfg.hidden_size, cfg.q_out_size, cfg.num_layers)
        want = (expect.hidden_size, expect.q_out_size, expect.num_layers)
        if got != want:
            raise AdapterError(f"the adapter is for a backbone of hidden size, query features "
                               f"and layers {got}; this one has {want}")
        k_out, v_out = _kv_out_sizes(hf_config)
    elif isinstance(ref_meta.get("kv_out_size"), list) and len(ref_meta["kv_out_size"]) == 2:
        k_out, v_out = (int(x) for x in ref_meta["kv_out_size"])
    else:
        raise AdapterError("exporting to the reference format needs the backbone's config "
                           "(the model): the format holds zero Δk/Δv weights of the "
                           "backbone's key/value width")
    doc = {name: (list(default) if isinstance(default, list) else default)
           for name, (default, _) in REF_FIELDS.items()}
    doc.update(output_init="base_slice_fixed", beta_bias_init=BETA_BIAS_INIT,
               online_gain=ONLINE_GAIN, base_slice_ref_width=BASE_SLICE_REF_WIDTH)
    kept = ref_meta.get("config") if isinstance(ref_meta.get("config"), dict) else {}
    for name, (_, rule) in REF_FIELDS.items():
        if rule is INERT and name in kept:
            doc[name] = kept[name]
    doc.update(rank=cfg.rank, alpha=float(cfg.alpha), num_state_heads=cfg.num_state_heads,
               rankwise_gates=True, memory_write_granularity=cfg.write_granularity,
               delta_heads=list(cfg.delta_heads),
               target_layers=[] if cfg.target_layers is None else list(cfg.target_layers))
    m, d = cfg.mem_dim, cfg.hidden_size
    sd: dict[str, torch.Tensor] = {}
    for i in cfg.layers:
        layer = adapter.module.layer(i)
        zeros = torch.zeros
        weights = {
            "memory_q_proj": layer.w_q.weight, "memory_k_proj": layer.w_k.weight,
            "memory_v_proj": layer.w_v.weight,
            "delta_q_proj": layer.b_q.weight if layer.b_q is not None
            else zeros(cfg.q_out_size, m),
            "delta_k_proj": zeros(k_out, m), "delta_v_proj": zeros(v_out, m),
            "delta_o_proj": layer.b_o.weight if layer.b_o is not None else zeros(d, m),
            "beta_proj": layer.w_beta.weight, "beta_bias": layer.w_beta.bias,
        }
        for name, w in weights.items():
            w = w.detach().cpu().float()
            t = w.to(dtype).contiguous().clone()
            key = f"model.layers.{i}.self_attn.{name}"
            if bool(torch.isfinite(w).all()) and not bool(torch.isfinite(t).all()):
                raise AdapterError(f"adapter weight {key} is out of {dtype}'s range: export "
                                   "it as float32")
            sd[key] = t
    # What importing the folder gives: the weights as stored, back in float32.
    rounded = {k: v.detach().cpu().to(dtype).float()
               for k, v in adapter.module.state_dict().items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / REF_CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    torch.save(sd, path / REF_WEIGHTS_FILE)
    (path / EXPORT_SIDECAR).write_text(json.dumps({
        "format": EXPORT_FORMAT, "version": 1,
        "fingerprint": _fingerprint(cfg, rounded),  # of what importing this folder gives
        "num_layers": cfg.num_layers,
        "backbone": None if adapter.backbone is None else {
            "name": adapter.backbone.name, "fingerprint": adapter.backbone.fingerprint},
        "meta": adapter.meta}, indent=2))
    return path
