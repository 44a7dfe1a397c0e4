"""Bad input, abuse and faults against live servers (real engine, real Redis, real HTTP): none
costs a 500, a leak or a lost turn (issue 34). The server here has two tenants, a short wait
for a busy session and small limits."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from live import InThreadServer, ServerProcess, free_port

from server.settings import Settings

MODEL = "SmolLM2-135M-Instruct"
A = {"Authorization": "Bearer fault-a"}
B = {"Authorization": "Bearer fault-b"}
LIMITED = {"Authorization": "Bearer fault-limited"}
MAX_SESSIONS = 3
MAX_SESSION_TOKENS = 900
# A turn that runs for seconds: it ignores end-of-sequence (vLLM's extension) until max_tokens.
LONG = "Continue the list to 500: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,"


def fault_settings(engine_host, data_dir, redis_url, **kw) -> Settings:
    return Settings(**{
        "port": free_port(), "data_dir": data_dir, "redis_url": redis_url,
        "api_key": ["fault-a", "fault-b", "fault-limited"], "memory_window_tokens": 64,
        "max_model_len": engine_host.engine.cfg.max_model_len, "default_max_tokens": 16,
        "max_body_bytes": 300_000, "session_lock_timeout": 0.3, **kw})


@pytest.fixture(scope="module")
def srv(engine_host, redis_server, tmp_path_factory):
    server = InThreadServer(engine_host, fault_settings(
        engine_host, tmp_path_factory.mktemp("faults"), redis_server.url))
    yield server
    server.stop()


def chat(srv, sid, text, headers=A, max_tokens=8, stream=False, timeout=120, **kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream, **kw}
    if sid is not None:
        body["session_id"] = sid
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=timeout)


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    return body["error"]


def version(srv, sid, headers=A) -> int:
    return httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=headers).json()["version"]


def test_bad_values_are_400s(srv):
    url = srv.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    e = err(httpx.post(url, json={**ok, "stop": ""}, headers=A), 400)
    assert "stop" in e["message"]
    e = err(httpx.post(url, json={**ok, "top_k": -7}, headers=A), 400)
    # A lone surrogate decodes from JSON but is not text.
    raw = json.dumps({**ok, "messages": [{"role": "user", "content": "a\ud800b"}]})
    err(httpx.post(url, content=raw, headers={**A, "content-type": "application/json"}), 400)
    raw = json.dumps({**ok, "session_id": "s\udfff"})
    err(httpx.post(url, content=raw, headers={**A, "content-type": "application/json"}), 400)


def test_a_stream_that_cannot_run_gets_its_status_first(srv):
    # Each of these is refused with its own status, before any event is sent.
    for kw, status in (({"max_tokens": 10**9}, 400), ({"session_id": "bad id!"}, 400)):
        r = chat(srv, None, "hi", stream=True, **{"max_tokens": 4, **kw})
        assert err(r, status)
    # A busy session: one turn holds it, a streamed turn waits 0.3 s and gets 409.
    chat(srv, "busy", "Hello.")
    body = {"model": MODEL, "session_id": "busy", "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True, "messages": [{"role": "user", "content": LONG}]}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=A,
                      timeout=120) as running:
        lines = running.iter_lines()
        assert [next(lines) for _ in range(4)]  # it is generating: the session is held
        assert err(chat(srv, "busy", "Me too.", stream=True), 409)["code"] == "session_busy"
        assert err(chat(srv, "busy", "Me too."), 409)["code"] == "session_busy"
        assert [ln for ln in lines if ln][-1] == "data: [DONE]"
    assert version(srv, "busy") == 2


def test_a_body_over_the_limit_is_refused_as_it_arrives(srv):
    # 6 MB sent chunked, without a Content-Length: 413 once 300 kB have arrived.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  b"fault-a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
                  b"\r\n\r\n")
        sent = 0
        s.settimeout(0.05)
        reply = b""
        while sent < 6_000_000 and not reply:
            s.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
            sent += 0x10000
            try:
                reply = s.recv(65536)
            except TimeoutError:
                pass
        s.settimeout(30)
        while b"\r\n\r\n" not in reply:
            reply += s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert sent < 1_000_000  # answered long before the 6 MB were sent
    # The import endpoint reads its body raw: the same limit, the same way.
    r = httpx.put(srv.url + "/v1/sessions/big/import", headers=A,
                  content=(b"x" * 65536 for _ in range(100)))
    assert err(r, 413)["code"] == "body_too_large"


def test_history_mismatch_and_idempotent_retries(srv):
    key = {"Idempotency-Key": "turn-1-of-idem"}
    first = chat(srv, "idem", "My locker code is 4512.", headers={**A, **key})
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    # The client retries (its answer was lost): the committed answer, nothing run again.
    again = chat(srv, "idem", "My locker code is 4512.", headers={**A, **key})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["choices"] == first.json()["choices"]
    assert again.json()["session"]["version"] == 1 and version(srv, "idem") == 1
    streamed = chat(srv, "idem", "My locker code is 4512.", headers={**A, **key}, stream=True)
    text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                   for ln in streamed.text.splitlines()
                   if ln.startswith("data: {") and json.loads(ln[6:])["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
    # The same key for another request is refused.
    e = err(chat(srv, "idem", "Something else.", headers={**A, **key}), 409)
    assert e["code"] == "idempotency_key_reused"
    # Without a key, the same messages again are a retried turn that committed: refused.
    reply = first.json()["choices"][0]["message"]["content"]
    stored = [{"role": "user", "content": "My locker code is 4512."}]
    body = {"model": MODEL, "session_id": "idem", "max_tokens": 4, "messages": stored}
    e = err(httpx.post(srv.url + "/v1/chat/completions", headers=A,
                       json={**body, "messages": stored + [
                           {"role": "assistant", "content": reply + " (edited)"},
                           {"role": "user", "content": "And?"}]}), 409)
    assert e["code"] == "history_mismatch" and e["param"] == "messages[1]"
    assert version(srv, "idem") == 1
    # The stored history and a new message continue it.
    r = httpx.post(srv.url + "/v1/chat/completions", headers=A, timeout=120, json={
        **body, "messages": stored + [{"role": "assistant", "content": reply},
                                      {"role": "user", "content": "And?"}]})
    assert r.status_code == 200 and r.json()["session"]["version"] == 2


@pytest.fixture
def limited(engine_host, tmp_path):
    """A server with small limits, on its own SQLite store."""
    server = InThreadServer(engine_host, fault_settings(
        engine_host, tmp_path, None, max_sessions_per_tenant=MAX_SESSIONS,
        max_session_tokens=MAX_SESSION_TOKENS))
    yield server
    server.stop()


def test_limits_on_sessions_and_tokens(limited):
    srv = limited
    for i in range(MAX_SESSIONS):
        assert chat(srv, f"lim-{i}", "Hi.", headers=LIMITED).status_code == 200
    e = err(chat(srv, "lim-extra", "Hi.", headers=LIMITED), 429)
    assert e["code"] == "too_many_sessions"
    # A fork is a new session too; deleting one makes room.
    r = httpx.post(f"{srv.url}/v1/sessions/lim-0/fork", headers=LIMITED, json={})
    assert err(r, 429)["code"] == "too_many_sessions"
    assert httpx.delete(f"{srv.url}/v1/sessions/lim-0", headers=LIMITED).status_code == 200
    assert chat(srv, "lim-extra", "Hi.", headers=LIMITED).status_code == 200
    # A session whose next turn could pass the token limit refuses it and says what to do.
    e = err(chat(srv, "lim-1", "More.", headers=LIMITED, max_tokens=MAX_SESSION_TOKENS), 400)
    assert e["code"] == "session_token_limit" and "fork" in e["message"]


def test_tenants_are_isolated_on_every_session_endpoint(srv):
    chat(srv, "mine", "Secret of A: 7741.")
    chat(srv, "mine", "Second turn of A.")
    before = httpx.get(f"{srv.url}/v1/sessions/mine", headers=A,
                       params={"full": True}).json()
    u = f"{srv.url}/v1/sessions/mine"
    for method, url, kw in (("GET", u, {}), ("GET", u, {"params": {"full": True}}),
                            ("GET", u + "/export", {}), ("DELETE", u, {}),
                            ("POST", u + "/rollback", {"json": {"version": 1}}),
                            ("POST", u + "/fork", {"json": {"new_session_id": "stolen"}})):
        r = httpx.request(method, url, headers=B, **kw)
        assert err(r, 404)["code"] == "session_not_found", (method, url)
    # B importing a record under the same id makes B's own session, not A's.
    blob = httpx.get(u + "/export", headers=A).content
    r = httpx.put(u + "/import", headers=B, content=blob, params={"overwrite": True})
    assert r.status_code == 200
    assert httpx.get(f"{srv.url}/v1/sessions/stolen", headers=A).status_code == 404
    after = httpx.get(u, headers=A, params={"full": True}).json()
    assert after == before
    # No key: nothing at all.
    assert err(httpx.get(u), 401)["type"] == "authentication_error"


def test_a_record_corrupted_in_the_store_is_the_servers_fault(srv, redis_server):
    import redis

    chat(srv, "rotten", "Hello.")
    tenant = Settings(api_key=["fault-a"]).keys()["fault-a"]
    r = redis.Redis.from_url(redis_server.url)
    cur = f"dmem:{{{tenant}/rotten}}:cur"
    hist = cur[:-len("cur")] + "hist"
    v = int(r.hget(cur, "v"))
    r.hset(hist, str(v), b"\x00garbage")  # bit rot, a bad restore, a buggy writer
    for resp in (httpx.get(f"{srv.url}/v1/sessions/rotten", headers=A), chat(srv, "rotten", "Hi")):
        e = err(resp, 500)
        assert e["type"] == "server_error" and e["code"] == "corrupt_session"
    # Bad bytes from a client are still the client's: 422.
    r = httpx.put(f"{srv.url}/v1/sessions/fresh/import", headers=A, content=b"\x00garbage")
    assert err(r, 422)["code"] == "corrupt_record"


def test_health_and_metrics_tell_a_stranger_nothing(srv, redis_server):
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 200 and h.json()["store"] == "ok"
    m = httpx.get(srv.url + "/metrics").text
    assert "deltamem_requests_total" in m and "deltamem_sessions" not in m
    port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    redis_server.stop()
    try:
        h = httpx.get(srv.url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["store"] == "error"
        assert port not in h.text and "127.0.0.1" not in h.text and "redis" not in h.text
    finally:
        redis_server.start()


def test_redis_down_mid_session_and_at_commit(srv, redis_server):
    sid = "redis-down"
    assert chat(srv, sid, "Remember: the boat is blue.").status_code == 200
    redis_server.stop()
    try:
        assert err(chat(srv, sid, "While it is down."), 503)["code"] == "store_unavailable"
    finally:
        redis_server.start()
    assert chat(srv, sid, "It is back.").json()["session"]["version"] == 2
    # The store goes away while a turn generates: the commit fails with 503, nothing is lost
    # or half-written, and the session goes on from its last version when the store is back.
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, srv, sid, LONG, max_tokens=200, ignore_eos=True)
        time.sleep(1.0)
        redis_server.stop()
        try:
            assert err(running.result(), 503)["code"] == "store_unavailable"
        finally:
            redis_server.start()
    assert version(srv, sid) == 2
    assert chat(srv, sid, "Again.").json()["session"]["version"] == 3


def test_a_client_that_goes_away_commits_nothing(srv):
    sid = "gone"
    chat(srv, sid, "Hello.")
    with pytest.raises(httpx.ReadTimeout):
        chat(srv, sid, LONG, max_tokens=300, timeout=1.0, ignore_eos=True)
    time.sleep(1.0)
    assert version(srv, sid) == 1
    r = chat(srv, sid, "Still there?")
    assert r.status_code == 200, r.text
    assert r.json()["session"]["version"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_sigkill_mid_turn_loses_nothing(srv, engine_host, redis_server, tmp_path, stream):
    """A replica killed mid-turn: the session stays at its last version, and another
    replica on the same Redis continues it."""
    args = ["--adapter", str(engine_host.adapter_dir), "--dtype", "float32",
            "--max-model-len", str(engine_host.engine.cfg.max_model_len),
            "--redis-url", redis_server.url, "--data-dir", str(tmp_path),
            "--memory-window-tokens", "64", "--kv-cache-gib", "1", "--max-num-seqs", "4",
            "--api-key", "fault-a"]
    victim = ServerProcess(args, log_path=tmp_path / "victim.log").start()
    sid = f"killed-{'stream' if stream else 'json'}"
    try:
        assert chat(victim, sid, "My train leaves at nine.").json()["session"]["version"] == 1
        body = {"model": MODEL, "session_id": sid, "max_tokens": 300, "temperature": 0,
                "stream": stream, "ignore_eos": True,
                "messages": [{"role": "user", "content": LONG}]}
        if stream:
            with httpx.stream("POST", victim.url + "/v1/chat/completions", json=body,
                              headers=A, timeout=60) as r:
                lines = r.iter_lines()
                assert [next(lines) for _ in range(4)]
                os.killpg(victim.proc.pid, signal.SIGKILL)
        else:
            killer = threading.Timer(3.0, os.killpg, (victim.proc.pid, signal.SIGKILL))
            killer.start()
            with pytest.raises(httpx.HTTPError):
                httpx.post(victim.url + "/v1/chat/completions", json=body, headers=A,
                           timeout=60)
            killer.join()
        victim.proc.wait(30)
    finally:
        victim.stop()
    assert version(srv, sid) == 1
    assert chat(srv, sid, "When does my train leave?").json()["session"]["version"] == 2
