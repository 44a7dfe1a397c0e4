"""The OpenAI-compatible API against live servers: real engine, real Redis, real HTTP, the
`openai` client. Continuity (docs/design.md, invariant 1) is checked against the HF reference runtime."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest
import torch
from live import InThreadServer, ServerProcess, free_port
from openai import APIStatusError, OpenAI

from memory_store import decode_record
from server.settings import Settings

MODEL = "SmolLM2-135M-Instruct"


def settings_for(engine_host, tmp_path, **kw) -> Settings:
    base = dict(port=free_port(), data_dir=tmp_path, memory_window_tokens=64,
                max_model_len=engine_host.engine.cfg.max_model_len, default_max_tokens=24,
                max_body_bytes=200_000, session_lock_timeout=30)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def api(engine_host, redis_server, tmp_path_factory):
    srv = InThreadServer(engine_host, settings_for(engine_host, tmp_path_factory.mktemp("api"),
                                                   redis_url=redis_server.url))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api):
    return OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def turn(client, sid, text, stream=False, max_tokens=16, **kw):
    args = dict(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                temperature=0, extra_body={"session_id": sid, **kw.pop("extra", {})}, **kw)
    if not stream:
        r = client.chat.completions.create(**args)
        return r.choices[0].message.content, r.model_extra["session"]
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage is not None and not chunks[-1].choices
    return text, finals[0].model_extra["session"]


def stored_record(url, sid, headers=None):
    data = httpx.get(f"{url}/v1/sessions/{sid}/export", headers=headers).content
    return decode_record(data)


def replay_state(hf, record) -> torch.Tensor:
    """The continuity oracle: the session's turns through the HF reference runtime, each
    with its own prompt and write start, from its epoch's state: the replayed state when its
    epoch began (zero for the session's first), as docs/design.md §2 defines a session."""
    T = record.transcript
    state = torch.zeros(1, *hf.state_shape)
    epoch_state = state
    for entry in record.meta["turn_log"]:
        if entry["new_epoch"]:
            epoch_state = state
        prompt = [t for s, e in entry["spans"] for t in T[s:e]]
        end = entry["spans"][-1][1]
        generated = T[end:end + entry["generated"]]
        ids = prompt + generated[:-1]  # the last sampled token is not through the model yet
        mask = torch.arange(len(ids)) >= entry["write_start"]
        with torch.no_grad():
            _, state, _ = hf.forward(torch.tensor([ids]), epoch_state, mask.unsqueeze(0))
    return state[0]


def assert_continuity(engine_host, url, sid, turns, headers=None):
    rec = stored_record(url, sid, headers)
    assert rec.turns == turns
    assert rec.tokens_absorbed == len(rec.transcript) - 1
    expected = replay_state(engine_host.hf, rec)
    err = ((rec.state - expected).norm() / expected.norm()).item()
    assert err <= 1e-4, f"stored state differs from the reference replay: rel err {err:.2e}"
    return rec


# --- sessions and continuity --------------------------------------------------------------------

def test_three_turn_session_streaming_and_not(engine_host, api, client):
    sid = "three-turns"
    a1, s1 = turn(client, sid, "My name is Alice and I live in Lisbon.")
    a2, s2 = turn(client, sid, "I have a dog called Rex.", stream=True)
    # A client that re-sends the whole history: only the last message is new.
    rec = stored_record(api.url, sid)
    history = [m for m in rec.messages if m["role"] != "system"]
    r = client.chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0, extra_body={"session_id": sid},
        messages=history + [{"role": "user", "content": "What is my dog called?"}])
    a3, s3 = r.choices[0].message.content, r.model_extra["session"]
    assert a1 and a2 and a3
    assert [s1["version"], s2["version"], s3["version"]] == [1, 2, 3]
    assert s3["tokens_absorbed"] == s3["transcript_tokens"] - 1
    rec = assert_continuity(engine_host, api.url, sid, 3)
    users = [m["content"] for m in rec.messages if m["role"] == "user"]
    assert users == ["My name is Alice and I live in Lisbon.", "I have a dog called Rex.",
                     "What is my dog called?"]  # nothing written twice
    # The window (64 tokens) no longer holds turn 1: later prompts are shorter than the
    # transcript, and re-sent context was read, not written.
    log = rec.meta["turn_log"]
    assert log[-1]["prompt_tokens"] < len(rec.transcript)
    assert all(e["write_start"] >= 0 for e in log)


def test_a_continuing_session_reuses_its_kv(engine_host, api, client):
    """Within an epoch each turn's prompt extends the last one's, so vLLM's prefix cache
    serves the previous turns' K/V (up to the last KV block boundary they passed) and only
    the rest is computed; the state still equals the reference replay."""
    sid = "kv-reuse"
    facts = ["My sister Ana lives in Porto and keeps bees on her roof.",
             "My brother Rui moved to Faro last spring and works at the harbour.",
             "Our cousin Inês teaches maths in Braga and plays the cello on Sundays.",
             "Who keeps bees?"]
    for text in facts:
        turn(client, sid, text, max_tokens=12, extra={"memory_window_tokens": -1})
    rec = assert_continuity(engine_host, api.url, sid, 4)
    log = rec.meta["turn_log"]
    assert [e["new_epoch"] for e in log] == [True, False, False, False]
    bs = engine_host.engine.llm.vllm_config.cache_config.block_size
    for prev, cur in zip(log, log[1:], strict=False):
        through = prev["prompt_tokens"] + prev["generated"] - 1
        assert cur["cached_tokens"] == through // bs * bs, (prev, cur)
    assert log[-1]["cached_tokens"] > 0
    # A miss (the cache emptied, as by eviction or a restart) recomputes from the epoch's
    # state: nothing reused, the same stream.
    assert engine_host.run(engine_host.engine.llm.reset_prefix_cache())
    turn(client, sid, "And who plays the cello?", max_tokens=12,
         extra={"memory_window_tokens": -1})
    rec = assert_continuity(engine_host, api.url, sid, 5)
    last = rec.meta["turn_log"][-1]
    assert not last["new_epoch"] and last["cached_tokens"] == 0


def test_state_only_window_and_header_session_id(engine_host, api, client):
    sid = "state-only"
    for text in ("Remember: the code is 4417.", "What is the code?"):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=12,
            temperature=0, extra_headers={"X-Session-Id": sid},
            extra_body={"memory_window_tokens": 0})
        assert r.choices[0].message.content
    rec = assert_continuity(engine_host, api.url, sid, 2)
    first_user = rec.meta["boundaries"][1]
    assert rec.meta["turn_log"][1]["spans"][-1][0] >= first_user  # turn 1 not re-sent
    assert all(e["new_epoch"] for e in rec.meta["turn_log"])  # each turn re-reads nothing


def test_sessionless_request_keeps_nothing(api, client):
    before = httpx.get(api.url + "/v1/sessions").json()["data"]
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi"}])
    assert r.choices[0].message.content and r.model_extra.get("session") is None
    assert httpx.get(api.url + "/v1/sessions").json()["data"] == before


def test_client_disconnect_mid_stream_commits_nothing(engine_host, api, client):
    sid = "disconnect"
    turn(client, sid, "Hello there.")
    body = {"model": MODEL, "stream": True, "max_tokens": 200, "temperature": 0,
            "session_id": sid, "messages": [{"role": "user", "content": "Tell a long story."}]}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(ln.startswith("data: ") for ln in got)
    # The aborted turn left the session as it was; the next turn continues from version 1.
    time.sleep(1.0)
    assert httpx.get(f"{api.url}/v1/sessions/{sid}").json()["version"] == 1
    _, s = turn(client, sid, "Are you there?")
    assert s["version"] == 2
    assert_continuity(engine_host, api.url, sid, 2)


def test_concurrent_turns_on_one_session_lose_nothing(engine_host, api, client):
    sid = "concurrent"
    texts = [f"Note number {i}." for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: turn(client, sid, t, max_tokens=8), texts))
    versions = sorted(s["version"] for _, s in results)
    assert versions == [1, 2, 3, 4]  # serialised, none lost
    rec = assert_continuity(engine_host, api.url, sid, 4)
    assert sorted(m["content"] for m in rec.messages if m["role"] == "user") == texts


# --- session management -------------------------------------------------------------------------

def test_session_endpoints(engine_host, api, client):
    sid = "manage"
    turn(client, sid, "First.")
    turn(client, sid, "Second.")
    info = httpx.get(f"{api.url}/v1/sessions/{sid}", params={"full": True}).json()
    assert info["version"] == 2 and info["versions"] == [1, 2] and info["state_bytes"] == 7680
    ids = []
    cursor = None
    while True:
        page = httpx.get(api.url + "/v1/sessions",
                         params={"limit": 2, **({"after": cursor} if cursor else {})}).json()
        ids += [s["id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sid in ids and len(ids) == len(set(ids))
    # Rollback to version 1 is a new version with version 1's content.
    rb = httpx.post(f"{api.url}/v1/sessions/{sid}/rollback", json={"version": 1}).json()
    assert rb["version"] == 3 and rb["turns"] == 1
    # Fork: a copy that continues independently.
    fk = httpx.post(f"{api.url}/v1/sessions/{sid}/fork", json={"new_session_id": "manage-b"})
    assert fk.status_code == 200 and fk.json()["version"] == 1
    _, s = turn(client, "manage-b", "Third, in the fork.")
    assert s["turns"] == 2
    assert httpx.get(f"{api.url}/v1/sessions/{sid}").json()["turns"] == 1
    assert_continuity(engine_host, api.url, "manage-b", 2)
    # Export / import under a new id.
    blob = httpx.get(f"{api.url}/v1/sessions/manage-b/export").content
    r = httpx.put(f"{api.url}/v1/sessions/manage-c/import", content=blob)
    assert r.status_code == 200 and r.json()["turns"] == 2
    r = httpx.put(f"{api.url}/v1/sessions/manage-c/import", content=blob[:-3])
    assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt_record"
    # Delete.
    assert httpx.delete(f"{api.url}/v1/sessions/manage-c").json()["deleted"] is True
    assert httpx.get(f"{api.url}/v1/sessions/manage-c").status_code == 404


def test_models_health_metrics(api, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["memory"]["state_bytes"] == 7680
    h = httpx.get(api.url + "/health")
    assert h.status_code == 200 and h.json()["engine"] == "ok" and h.json()["store"] == "ok"
    m = httpx.get(api.url + "/metrics").text
    for name in ("deltamem_requests_total", "deltamem_tokens_total",
                 "deltamem_state_commit_seconds_bucket", "deltamem_state_load_seconds_bucket",
                 "deltamem_sessions", "deltamem_request_seconds_bucket"):
        assert name in m


# --- errors ---------------------------------------------------------------------------------------

def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    return body["error"]


def test_openai_error_shapes(api):
    url = api.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    e = _err(httpx.post(url, content=b"{not json", headers={"content-type":
                                                               "application/json"}), 400)
    assert e["code"] == "invalid_json"
    e = _err(httpx.post(url, json={**ok, "max_tokens": "many"}), 400)
    assert e["param"] == "max_tokens"
    _err(httpx.post(url, json={**ok, "messages": []}), 400)
    _err(httpx.post(url, json={**ok, "messages": [{"role": "robot", "content": "x"}]}), 400)
    e = _err(httpx.post(url, json={**ok, "tools": [{"type": "function"}]}), 400)
    assert e["param"] == "tools" and e["code"] == "unsupported_parameter"
    _err(httpx.post(url, json={**ok, "n": 2}), 400)
    e = _err(httpx.post(url, json={**ok, "model": "gpt-9"}), 404)
    assert e["code"] == "model_not_found"
    _err(httpx.post(url, json={**ok, "max_tokens": 10**6}), 400)
    e = _err(httpx.post(url, json={**ok, "session_id": "bad id!"}), 400)
    assert e["code"] == "invalid_session_id"
    e = _err(httpx.post(url, json={**ok, "messages": [{"role": "user", "content": "x" * 300_000}]}),
             413)
    assert e["code"] == "body_too_large"
    e = _err(httpx.post(api.url + "/v1/sessions/nope/rollback", json={"version": 1}), 404)
    assert e["code"] == "session_not_found"
    _err(httpx.get(api.url + "/v1/nothing-here"), 404)
    e = _err(httpx.post(url, json={**ok, "max_tokens": 4, "messages": [
        {"role": "user", "content": "word " * 3000}]}), 400)
    assert e["code"] == "context_length_exceeded"


def test_api_key_isolation(engine_host, redis_server, tmp_path):
    srv = InThreadServer(engine_host, settings_for(engine_host, tmp_path,
                                                   redis_url=redis_server.url,
                                                   api_key=["key-a", "key-b"]))
    try:
        a = OpenAI(base_url=srv.url + "/v1", api_key="key-a", max_retries=0)
        b = OpenAI(base_url=srv.url + "/v1", api_key="key-b", max_retries=0)
        nokey = httpx.post(srv.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert _err(nokey, 401)["type"] == "authentication_error"
        with pytest.raises(APIStatusError) as exc:
            OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert exc.value.status_code == 401
        turn(a, "shared-name", "Secret of A: 9911.")
        hb = {"Authorization": "Bearer key-b"}
        ha = {"Authorization": "Bearer key-a"}
        assert httpx.get(srv.url + "/v1/sessions/shared-name", headers=hb).status_code == 404
        assert httpx.get(srv.url + "/v1/sessions/shared-name/export",
                         headers=hb).status_code == 404
        assert httpx.delete(srv.url + "/v1/sessions/shared-name", headers=hb).status_code == 404
        # B "continuing" the same id starts its own session; A's is untouched.
        _, sb = turn(b, "shared-name", "Hello from B.")
        assert sb["version"] == 1 and sb["turns"] == 1
        ra = httpx.get(srv.url + "/v1/sessions/shared-name", headers=ha,
                       params={"full": True}).json()
        assert ra["turns"] == 1 and "9911" in json.dumps(ra["messages"])
        listed = httpx.get(srv.url + "/v1/sessions", headers=hb).json()["data"]
        assert [s["id"] for s in listed] == ["shared-name"] and listed[0]["turns"] == 1
    finally:
        srv.stop()


# --- replicas and restarts (own processes, own engines) ----------------------------------------

@pytest.mark.slow
def test_two_replicas_and_a_restart_on_one_redis(engine_host, api, client, redis_server,
                                                 tmp_path):
    args = ["--adapter", str(engine_host.adapter_dir), "--dtype", "float32",
            "--max-model-len", str(engine_host.engine.cfg.max_model_len),
            "--redis-url", redis_server.url, "--data-dir", str(tmp_path),
            "--memory-window-tokens", "64", "--kv-cache-gib", "1", "--max-num-seqs", "4"]
    other = ServerProcess(args, log_path=tmp_path / "replica.log").start()
    try:
        c2 = OpenAI(base_url=other.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        sid = "replicas"
        # Turns alternate between the two replicas: no affinity needed.
        for i, c in enumerate([client, c2, client, c2]):
            _, s = turn(c, sid, f"Turn {i}: my lucky number is {i * 7}.", max_tokens=10)
            assert s["version"] == i + 1
        assert_continuity(engine_host, api.url, sid, 4)
        # Stop the replica, start a new process on the same store: the session continues.
        other.stop()
        other = ServerProcess(args, log_path=tmp_path / "replica2.log").start()
        c3 = OpenAI(base_url=other.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        _, s = turn(c3, sid, "After the restart.", max_tokens=10)
        assert s["version"] == 5
        assert_continuity(engine_host, other.url, sid, 5)
    finally:
        other.stop()
