"""The settings object: flags, environment variables, and docs that list every one."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings, add_arguments, from_args

ROOT = Path(__file__).resolve().parent.parent


def parse(argv, monkeypatch=None):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(argv))


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("DELTAMEM_PORT", "9001")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("DELTAMEM_API_KEY", "a, b")
    s = parse([])
    assert s.port == 9001 and s.redis_url == "redis://example:6379/0"
    assert s.api_key == ["a", "b"] and set(s.keys()) == {"a", "b"}
    s = parse(["--port", "9002", "--no-memory", "--api-key", "z"])
    assert s.port == 9002 and s.no_memory is True and s.api_key == ["z"]


def test_tenants_are_hashes_of_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nk1\n\nk2\n")
    keys = Settings(api_key=["k0"], api_key_file=f).keys()
    assert set(keys) == {"k0", "k1", "k2"}
    assert all(t.startswith("k") and "k1" not in t[1:3] for t in keys.values())
    assert len(set(keys.values())) == 3


def test_every_setting_is_documented_in_help_and_readme():
    out = subprocess.run([sys.executable, "-m", "deltamem.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in out, flag
        assert f"`{flag}`" in readme and f"DELTAMEM_{name.upper()}" in readme, flag


def test_default_adapter_resolution(tmp_path, model_dir, caplog, monkeypatch):
    from deltamem.adapter import backbone_fingerprint, load_adapter, new_adapter_from_checkpoint
    from server.engine import build
    from server.engine.build import resolve_adapter

    assert resolve_adapter(Settings(no_memory=True, data_dir=tmp_path), model_dir) is None
    assert resolve_adapter(Settings(adapter="/x/y", data_dir=tmp_path), model_dir) == Path("/x/y")
    # The default model has a trained adapter in the package, made for this very backbone.
    with caplog.at_level("INFO"):
        shipped = resolve_adapter(Settings(data_dir=tmp_path), model_dir)
    assert shipped.parent == build.SHIPPED_ADAPTERS and "using the shipped adapter" in caplog.text
    ad = load_adapter(shipped)
    assert ad.meta["trained"] and ad.backbone == backbone_fingerprint(model_dir)
    assert (shipped / "TRAINING_CARD.md").is_file()
    assert (shipped / "adapter.safetensors").stat().st_size < 20 * 2**20
    # A backbone without one gets an untrained adapter, made once, with a loud warning.
    monkeypatch.setattr(build, "SHIPPED_ADAPTERS", tmp_path / "no-shipped-adapters")
    caplog.clear()
    with caplog.at_level("WARNING"):
        path = resolve_adapter(Settings(data_dir=tmp_path), model_dir)
    assert "UNTRAINED" in caplog.text
    made = load_adapter(path)
    assert made.fingerprint() == new_adapter_from_checkpoint(model_dir, seed=0).fingerprint()
    mtime = (path / "adapter.safetensors").stat().st_mtime_ns
    assert resolve_adapter(Settings(data_dir=tmp_path), model_dir) == path  # made once
    assert (path / "adapter.safetensors").stat().st_mtime_ns == mtime


def test_plugin_refuses_a_vllm_it_was_not_written_for():
    from server.engine.plugin import VLLMVersionError, check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.32.0+cpu")
    for other in ("0.32.1", "0.31.0", "1.0.0"):
        with pytest.raises(VLLMVersionError, match="0.32.0"):
            check_vllm_version(other)


def test_dtype_auto_picks_float32_without_native_bf16(monkeypatch):
    import torch

    from server.engine.build import resolve_dtype

    assert resolve_dtype("float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bf16, amx, want in ((False, False, "float32"), (True, False, "bfloat16"),
                            (False, True, "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_dtype("auto") == want
    assert Settings().dtype == "auto"
