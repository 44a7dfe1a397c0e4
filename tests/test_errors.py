"""The error module: every store, engine and turn error maps to a status and an OpenAI error
code, the same on the JSON path as in a stream. Needs neither the engine nor the model."""

from __future__ import annotations

import inspect
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import memory_store as ms
from memory_store import errors as store_errors
from server.engine.facade import EngineError
from server.errors import APIError, classify_error, error_body, install_error_handlers
from server.protocol import ChatCompletionRequest
from server.sessions import SessionBusy, TurnError

STORE_CLASSES = [c for _, c in inspect.getmembers(store_errors, inspect.isclass)
                 if issubclass(c, ms.StoreError)]
ALL_CLASSES = [*STORE_CLASSES, EngineError, TurnError, SessionBusy]


def _instance(cls):
    if cls is ms.TooManySessions:
        return cls("boom", limit=3)
    return cls("boom")


def test_every_store_error_class_is_covered():
    assert set(STORE_CLASSES) >= {ms.StoreUnavailable, ms.VersionConflict, ms.SessionNotFound,
                                  ms.InvalidSessionId, ms.CorruptRecord, ms.UnknownFormat,
                                  ms.IdentityMismatch, ms.StoreError}


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_maps(cls):
    status, detail = classify_error(_instance(cls))
    assert detail.code not in (None, "internal"), cls
    assert detail.type in ("invalid_request_error", "server_error", "service_unavailable")
    assert 400 <= status < 600
    assert detail.message == "boom"


@pytest.mark.parametrize("cls,status,code", [
    (ms.SessionNotFound, 404, "session_not_found"),
    (ms.InvalidSessionId, 400, "invalid_session_id"),
    (ms.VersionConflict, 409, "session_conflict"),
    (ms.IdentityMismatch, 409, "session_identity_mismatch"),
    (ms.TooManySessions, 429, "too_many_sessions"),
    (ms.UnknownFormat, 500, "corrupt_session"),  # a subclass takes its base's mapping
    (ms.CorruptRecord, 500, "corrupt_session"),  # stored data; an import says 422 itself
    (ms.StoreUnavailable, 503, "store_unavailable"),
    (SessionBusy, 409, "session_busy"),
    (EngineError, 503, "engine_error"),
])
def test_statuses(cls, status, code):
    got, detail = classify_error(_instance(cls))
    assert (got, detail.code) == (status, code)


def test_turn_error_and_api_error_carry_their_own_status():
    assert classify_error(TurnError("long", code="context_length_exceeded", param="messages")
                          )[0] == 400
    s, d = classify_error(APIError(401, "no key", "authentication_error", "invalid_api_key"))
    assert (s, d.type, d.code) == (401, "authentication_error", "invalid_api_key")


def test_unmapped_is_a_500_without_internals():
    status, detail = classify_error(KeyError("secret internal detail"))
    assert status == 500 and detail.code == "internal" and "secret" not in detail.message


@pytest.mark.parametrize("exc", [_instance(c) for c in ALL_CLASSES] + [RuntimeError("x")],
                         ids=lambda e: type(e).__name__)
def test_json_path_equals_stream_path(exc):
    """The handlers give the body the stream path sends (error_body) with its status."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise")
    async def _raise():
        raise exc

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/raise")
    status, body = error_body(exc)
    assert r.status_code == status and r.json() == body


def test_request_validation_is_openai_shaped():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/chat")
    async def _chat(req: ChatCompletionRequest):
        return {}

    with TestClient(app) as client:
        r = client.post("/chat", content=b"{not json", headers={"content-type":
                                                                "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = client.post("/chat", json={"messages": [], "model": "m"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        # Strings that are not Unicode text, and stop sequences vLLM refuses, are a 400 too.
        for bad in ({"messages": [{"role": "user", "content": "a\ud800b"}]},
                    {"messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]},
                    {"messages": [{"role": "user", "content": "hi"}], "stop": ""}):
            r = client.post("/chat", content=json.dumps(bad),  # ASCII: "\ud800" escaped
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_value"


def test_request_builds_its_sampling_params():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5,
                                max_completion_tokens=7, stop="x", top_k=10)
    sp = req.to_sampling_params(default_max_tokens=512, max_tokens_limit=100)
    assert (sp.max_tokens, sp.top_p, sp.stop, sp.temperature, sp.top_k) == (7, 0.5, ["x"], 1.0,
                                                                            10)
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]
                                 ).to_sampling_params(512, 4096).max_tokens == 512
    with pytest.raises(APIError) as e:
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=101
                              ).to_sampling_params(512, 100)
    assert e.value.param == "max_tokens"


def test_unsupported_fields_are_refused_by_name():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[],
                                user="u")
    with pytest.raises(APIError) as e:
        req.check_supported(max_messages=10)
    assert e.value.param == "tools" and e.value.code == "unsupported_parameter"
    many = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}] * 3)
    with pytest.raises(APIError, match="exceed the limit"):
        many.check_supported(max_messages=2)
