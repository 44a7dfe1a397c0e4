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

Reference format (the public release):
    delta_mem_config.json  rank, alpha, num_state_heads, memory_write_granularity, delta_heads,
                           state_update_mode, target_layers, ...
    delta_mem_adapter.pt   a torch state dict keyed by module path, loaded with weights_only=True
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .layer import DeltaMem, DeltaMemConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
REF_CONFIG_FILE = "delta_mem_config.json"
REF_WEIGHTS_FILE = "delta_mem_adapter.pt"
FORMAT_NAME = "deltamem-adapter"
FORMAT_VERSION = 2  # written only when rows are left out; version 1 files load as they are
ROWS_SUFFIX = ".rows"

# Module names of the reference release, per attention layer, mapped to ours. The release
# documents `delta_q_proj` (the Δq up-projection B_q); the others follow the same naming.
REF_NAME_MAP = {
    "delta_q_proj": "b_q",
    "delta_o_proj": "b_o",
    "mem_q_proj": "w_q",
    "mem_k_proj": "w_k",
    "mem_v_proj": "w_v",
    "mem_beta_proj": "w_beta",
    "beta_proj": "w_beta",
}
_REF_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)$")


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
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for k, v in sorted(self.module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return "sha256:" + h.hexdigest()[:16]

    def check_backbone(self, backbone: BackboneIdentity) -> None:
        if self.backbone is None:
            return
        if self.backbone.fingerprint != backbone.fingerprint:
            raise AdapterError(
                f"adapter was trained for backbone {self.backbone} but the model is {backbone}; "
                "refusing to load it (a state or adapter of another backbone is meaningless)")


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
    """Load an adapter folder in either format. `hf_config` (the backbone's) is needed for
    the reference format, whose config does not carry the backbone's shapes."""
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


def import_reference_adapter(path: str | Path, hf_config) -> Adapter:
    """Read the reference release's folder into our module (no backbone fingerprint: the
    release does not carry one)."""
    path = Path(path)
    if hf_config is None:
        raise AdapterError("importing a reference adapter needs the backbone's config")
    ref = json.loads((path / REF_CONFIG_FILE).read_text())
    granularity = ref.get("memory_write_granularity", "token")
    granularity = {"token": "token", "tsw": "token", "message_mean": "message_mean",
                   "ssw": "message_mean"}.get(str(granularity).lower())
    if granularity is None:
        raise AdapterError(f"unsupported memory_write_granularity {ref.get('memory_write_granularity')!r}")
    heads = ref.get("delta_heads", ["q", "o"])
    if isinstance(heads, str):
        heads = [h for h in re.split(r"[^a-z]+", heads.lower()) if h]
    cfg = DeltaMemConfig.for_backbone(
        hf_config, rank=int(ref.get("rank", 8)), alpha=float(ref.get("alpha", 16)),
        num_state_heads=int(ref.get("num_state_heads", 1)), write_granularity=granularity,
        delta_heads=tuple(heads), target_layers=ref.get("target_layers"),
        state_update_mode=ref.get("state_update_mode", "standard"))
    raw = torch.load(path / REF_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    state = {}
    for key, tensor in raw.items():
        m = _REF_KEY.search(key)
        if not m or m.group(2) not in REF_NAME_MAP:
            raise AdapterError(f"unrecognised key in reference adapter: {key}")
        state[f"layers.{m.group(1)}.{REF_NAME_MAP[m.group(2)]}.{m.group(3)}"] = tensor
    return Adapter(_module_from_state(cfg, state), None, {"imported_from": str(path)})
