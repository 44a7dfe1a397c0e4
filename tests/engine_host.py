"""One δ-mem engine for a whole test session, on its own asyncio loop in a background thread.

vLLM's AsyncLLM binds its output handler (and its ZMQ sockets) to the event loop it runs on,
so every coroutine that touches the engine must run on that loop. The host owns the loop:
tests submit coroutines with `host.run(coro, timeout)`; the API server tests run uvicorn on the
same `host.loop` with the same `host.engine` (e.g. `host.run(server.serve())` from a thread, or
`asyncio.run_coroutine_threadsafe(server.serve(), host.loop)`).

The engine's adapter is a seeded random one with B_q/B_o scaled up, so that a state visibly
changes the outputs (an untrained adapter's corrections are too small to show), while the model
still answers sensibly. `host.hf` is the HF reference runtime (float32) on the same adapter, the
oracle the engine is checked against.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ADAPTER_SEED = 1234
B_SCALE = 10.0  # B_q, B_o ×10: reads change the outputs visibly, answers stay sensible
MAX_NUM_BATCHED_TOKENS = 64  # small: any prompt over 64 tokens is prefilled in chunks
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 16


def make_test_adapter(model_dir: str | Path, path: str | Path, seed: int = ADAPTER_SEED,
                      b_scale: float = B_SCALE):
    """Save a seeded untrained adapter with B_q/B_o scaled by `b_scale` (0 = no corrections)
    under `path`; return the Adapter."""
    from deltamem.adapter import new_adapter_from_checkpoint, save_adapter

    adapter = new_adapter_from_checkpoint(model_dir, seed=seed)
    with torch.no_grad():
        for i in adapter.config.layers:
            layer = adapter.module.layer(i)
            for b in (layer.b_q, layer.b_o):
                if b is not None:
                    b.weight.mul_(b_scale)
    save_adapter(adapter, path, meta={"test": True, "b_scale": b_scale})
    return adapter


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` intra-op torch threads, then restore the setting. The engine's
    processes hold the cores; a test-process model on 2 OpenMP threads fighting them runs 5-10×
    slower than on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class OneThreadOracle:
    """A `DeltaMemHF` whose `run` and `forward` run on one torch thread (see
    `torch_threads`); everything else passes through."""

    def __init__(self, hf, threads: int = 1):
        self._hf = hf
        self._threads = threads

    def __getattr__(self, name: str):
        attr = getattr(self._hf, name)
        if name in ("run", "forward"):
            def call(*args, **kwargs):
                with torch_threads(self._threads):
                    return attr(*args, **kwargs)
            return call
        return attr


class EngineHost:
    """A background thread running an asyncio loop that owns one `DeltaMemEngine`."""

    def __init__(self, model_dir: str | Path, adapter_dir: str | Path, **config_kw: Any):
        self.model_dir = Path(model_dir)
        self.adapter_dir = Path(adapter_dir)
        self.config_kw = config_kw
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_loop, name="engine-host-loop",
                                        daemon=True)
        self.engine = None
        self._hf = None
        self._hf_lock = threading.Lock()

    # --- the loop ---------------------------------------------------------------------------
    def _serve_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Stopped: let pending callbacks and async generators finish before closing.
        try:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def run(self, coro: Coroutine, timeout: float | None = 120.0):
        """Run `coro` on the host's loop from any other thread and return its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("EngineHost.run called from the host's own loop (deadlock)")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"engine call did not finish within {timeout} s") from None

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Schedule `coro` on the host's loop without waiting (e.g. a uvicorn server)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    # --- lifecycle --------------------------------------------------------------------------
    def config(self, **overrides: Any):
        from server.engine.facade import EngineConfig

        kw = {"model_dir": self.model_dir, "adapter_dir": self.adapter_dir, "memory": True,
              "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS,
              "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, **self.config_kw}
        kw.update(overrides)
        return EngineConfig(**kw)

    def start(self, timeout: float = 600.0) -> EngineHost:
        self._thread.start()
        self.engine = self.start_engine(self.config(), timeout)
        return self

    def start_engine(self, cfg, timeout: float = 600.0):
        """Start a `DeltaMemEngine` inside the host's loop (AsyncLLM attaches its output
        handler to the running loop). Blocks the loop while vLLM starts (~30 s)."""
        from server.engine.facade import DeltaMemEngine

        async def _start():
            return DeltaMemEngine.start(cfg)

        return self.run(_start(), timeout)

    def stop_engine(self, engine, timeout: float = 120.0) -> None:
        """Shut an engine down on the host's loop (AsyncLLM cancels loop tasks)."""
        if engine is None:
            return

        async def _stop():
            engine.shutdown()

        self.run(_stop(), timeout)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        try:
            if self._thread.is_alive():
                self.stop_engine(engine)
        except Exception:  # teardown must go on
            log.exception("engine shutdown failed")
        finally:
            del engine
            gc.collect()
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(30)
        self._hf = None

    # --- oracles ----------------------------------------------------------------------------
    @property
    def hf(self):
        """The HF reference runtime (float32) on the engine's adapter, built on first use;
        its `run`/`forward` use one torch thread (`OneThreadOracle`)."""
        with self._hf_lock:
            if self._hf is None:
                from deltamem.adapter import load_adapter
                from deltamem.hf_runtime import DeltaMemHF

                self._hf = OneThreadOracle(DeltaMemHF.from_pretrained(
                    self.model_dir, adapter=load_adapter(self.adapter_dir)))
            return self._hf

    # --- helpers for tests ------------------------------------------------------------------
    async def collect(self, prompt_ids, sampling_params, initial_state=None, write_start=0,
                      engine=None, **kw):
        """Run one request to the end on this loop; return (tokens, finished chunk, timeline),
        timeline = (time of the first chunk, time of the last). `kw` goes to generate."""
        eng = engine or self.engine
        tokens: list[int] = []
        last = None
        first_t = None
        async for chunk in eng.generate(prompt_ids, sampling_params, initial_state,
                                        write_start, **kw):
            if first_t is None:
                first_t = self.loop.time()
            tokens += chunk.token_ids
            last = chunk
        return tokens, last, (first_t, self.loop.time())

    def generate(self, prompt_ids, sampling_params, initial_state=None, write_start=0,
                 engine=None, timeout: float = 120.0, **kw):
        """Synchronous `collect` for tests: (tokens, finished chunk)."""
        tokens, last, _ = self.run(self.collect(prompt_ids, sampling_params, initial_state,
                                                write_start, engine, **kw), timeout)
        return tokens, last
