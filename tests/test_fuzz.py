"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), against a
live server on the shared engine: whatever a client sends, the answer is never a 5xx, and
every error is OpenAI's error JSON. Bounded: a fixed number of examples per operation and
mode, a server with tiny generation limits."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from live import InThreadServer, free_port

from server.settings import Settings

EXAMPLES = 25
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_server(engine_host, tmp_path_factory):
    s = Settings(port=free_port(), data_dir=tmp_path_factory.mktemp("fuzz"), api_key=[KEY],
                 max_model_len=engine_host.engine.cfg.max_model_len, default_max_tokens=2,
                 max_tokens_limit=4, max_body_bytes=100_000, max_messages=16,
                 session_lock_timeout=2, memory_window_tokens=64)
    srv = InThreadServer(engine_host, s)
    yield srv
    srv.stop()


def _operations(url: str):
    import schemathesis

    spec = httpx.get(url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    ops = []
    for result in schema.get_all_operations():
        ops.append(result.ok())
    return ops


def _check(response: httpx.Response, label: str) -> None:
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, f"{label}: not OpenAI error JSON: {response.text[:300]}"
        assert {"message", "type", "code", "param"} <= set(body["error"]), label


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_earns_a_5xx(fuzz_server, mode):
    from schemathesis import GenerationMode

    gen_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    ops = _operations(fuzz_server.url)
    assert len(ops) >= 8  # chat, models, health, metrics, the session endpoints, ...
    fuzzed = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for op in ops:
            try:
                fuzz_operation(op, gen_mode, fuzz_server.url, client)
            except Unsatisfiable:
                # An operation without parameters or body has no invalid request to make.
                assert gen_mode == GenerationMode.NEGATIVE, op.path
                continue
            fuzzed.append(f"{op.method.upper()} {op.path}")
    assert "POST /v1/chat/completions" in fuzzed and len(fuzzed) >= 6, fuzzed


def fuzz_operation(op, gen_mode, url: str, client: httpx.Client) -> None:
    """EXAMPLES generated requests to one operation, each answered below 500 and, when
    refused, in OpenAI's error JSON."""
    label = f"{op.method.upper()} {op.path}"

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=gen_mode))
    def run(case):
        kw = case.as_transport_kwargs(base_url=url)
        headers = {k: v for k, v in (kw.get("headers") or {}).items()
                   if k.lower() != "authorization"}
        body = {k: kw[k] for k in ("json",) if k in kw}
        if "data" in kw:  # raw bytes or text: sent as they are
            data = kw["data"]
            body["content"] = data if isinstance(data, bytes | str) else str(data)
        r = client.request(kw["method"], kw["url"], headers=headers, params=kw.get("params"),
                           **body)
        _check(r, label)

    run()
