from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

try:  # pytest puts tests/ on sys.path (rootdir without tests/__init__.py)
    from redis_server import RedisServer
except ImportError:  # tests/ became a package
    from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server (append-only file on) with ``.url``, ``.stop()``, ``.start()``.

    Fails, never skips, when redis-server cannot start: the Redis store is part of the
    contract under test.
    """
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except Exception as exc:
        server.close()
        pytest.fail(f"cannot start redis-server for the tests: {exc}", pytrace=False)
    yield server
    server.close()


# --- test tiers ---------------------------------------------------------------------------------
# `make test` runs everything. `make test-fast` runs `-m "not model"`: every test that needs
# neither the downloaded model nor the vLLM engine. A test needs the model when it uses the
# `model_dir` fixture (directly or through `tokenizer`, `hf_runtime`, `engine_host`, ...), and
# is marked here; a test that finds the model some other way carries `@pytest.mark.model`.


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


# --- the default model and the HF reference runtime (shared by the whole session) -------------


@pytest.fixture(scope="session")
def model_dir():
    from deltamem.model_fetch import FetchError, resolve_model

    try:
        return resolve_model(None)
    except FetchError as exc:
        pytest.fail(f"{exc} (make test fetches it first)", pytrace=False)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_runtime(model_dir):
    """Float32 HF backbone with a random (seeded) δ-mem adapter."""
    from deltamem.hf_runtime import DeltaMemHF

    return DeltaMemHF.from_pretrained(model_dir, seed=0)


# --- the shared δ-mem engine (tests/engine_host.py) ---------------------------------------------


@pytest.fixture
def zero_readout():
    """`with zero_readout(rt):` zeroes the read-out (B_q, B_o) of a runtime's adapter, so δ-mem
    writes but changes nothing, and restores every δ-mem weight (and drops gradients) after."""

    @contextmanager
    def zeroed(rt):
        import torch

        mod = rt.adapter.module
        saved = {k: v.clone() for k, v in mod.state_dict().items()}
        try:
            with torch.no_grad():
                for layer in mod.layers.values():
                    layer.b_q.weight.zero_()
                    layer.b_o.weight.zero_()
            yield mod
        finally:
            mod.load_state_dict(saved)
            mod.zero_grad(set_to_none=True)

    return zeroed


@pytest.fixture(scope="session")
def engine_host(model_dir, tmp_path_factory):
    """ONE δ-mem vLLM engine for the whole session (float32, random adapter with B ×10,
    64-token prefill chunks), on its own event loop in a background thread: `.engine`,
    `.loop`, `.run(coro, timeout)`, `.adapter_dir`, `.hf` (the HF reference on the same
    adapter). Shut down at session end."""
    try:
        from engine_host import EngineHost, make_test_adapter
    except ImportError:
        from tests.engine_host import EngineHost, make_test_adapter

    adapter_dir = tmp_path_factory.mktemp("engine") / "adapter"
    make_test_adapter(model_dir, adapter_dir)
    # Compiled, as served; DELTAMEM_TEST_EAGER=1 runs the same tests on the eager engine.
    host = EngineHost(model_dir, adapter_dir,
                      enforce_eager=os.environ.get("DELTAMEM_TEST_EAGER") == "1")
    try:
        host.start()
    except Exception as exc:
        host.close()
        pytest.fail(f"cannot start the shared vLLM engine: {exc}", pytrace=False)
    yield host
    host.close()
