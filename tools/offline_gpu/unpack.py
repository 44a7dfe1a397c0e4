"""Rebuild the default model's bf16 safetensors from `pack.py`'s output (numpy and torch only).

    python unpack.py META_DIR BLOB[,BLOB...] MODEL_DIR

Writes MODEL_DIR/model.safetensors and the small model files; exits 1 unless the file's sha256
is the one recorded at fetch time (so adapters trained there fit the same backbone here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

# What pack.py adds beside the model's own small files.
PACKING_FILES = {"header.bin", "index.json"}


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values transformers' GGUF reader produces (same operations, same order)."""
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "Q8_0":  # blocks of 34 bytes: fp16 scale, 32 int8
        b = raw.reshape(-1, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        return (d * b[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1)
    if kind == "Q4_1":  # blocks of 20 bytes: fp16 scale, fp16 minimum, 32 nibbles
        b = raw.reshape(-1, 20)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([b[:, 4:] & 0x0F, b[:, 4:] >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(-1)
    raise SystemExit(f"unsupported tensor type {kind}")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(-1, *w.shape[1:])


def main(meta: Path, blobs: list[Path], model_dir: Path) -> int:
    blob = b"".join(p.read_bytes() for p in blobs)
    cfg = json.loads((meta / "config.json").read_text())
    heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"]}
    tensors = {}
    for e in json.loads((meta / "index.json").read_text()):
        raw = np.frombuffer(blob, dtype=np.uint8, count=e["n"], offset=e["off"])
        w = dequantize(raw, e["type"]).reshape(e["shape"])
        if e["perm"]:
            w = unpermute(w, heads[e["perm"]])
        tensors[e["name"]] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    head_bytes = (meta / "header.bin").read_bytes()
    header = json.loads(head_bytes[8:])
    model_dir.mkdir(parents=True, exist_ok=True)
    out = model_dir / "model.safetensors"
    with open(out, "wb") as f:  # the original header, then the tensors in its offset order
        f.write(head_bytes)
        for _, name in sorted((v["data_offsets"][0], k) for k, v in header.items()
                              if k != "__metadata__"):
            f.write(tensors[name].view(torch.int16).numpy().tobytes())
    for f in meta.iterdir():  # the model's small files, as pack.py copied them
        if f.name not in PACKING_FILES:
            shutil.copy(f, model_dir / f.name)
    want = json.loads((meta / "deltamem_model.json").read_text())["safetensors_sha256"]
    got = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: sha256 {got} ({'matches' if got == want else 'MISMATCH, expected ' + want})")
    return 0 if got == want else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2].split(",")], Path(sys.argv[3])))
