"""Hardening that needs neither the engine nor the model: the body limit on a real HTTP server,
API keys, the refusal to serve open, and a commit that outlives its cancelled turn."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import pytest
from fastapi import FastAPI, Request
from live import free_port

import memory_store as ms
from server.app import LimitsAndMetrics
from server.chat_service import ChatService, commit_through_cancellation
from server.errors import install_error_handlers
from server.protocol import ChatCompletionRequest
from server.sessions import SessionLocks
from server.settings import Settings, exposure_problem

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_server():
    """A real uvicorn server running the body limit and the error handlers in front of a
    JSON endpoint and a raw-body endpoint (as /import reads its body)."""
    import uvicorn

    app = FastAPI()
    app.add_middleware(LimitsAndMetrics, limit=LIMIT, metrics_of=lambda: None)
    install_error_handlers(app)

    @app.post("/json")
    async def _json(req: ChatCompletionRequest):
        return {"messages": len(req.messages)}

    @app.put("/raw")
    async def _raw(request: Request):
        return {"bytes": len(await request.body())}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def _chunked(port: int, method: str, path: str, chunks: int, size: int) -> bytes:
    """Send a chunked body of `chunks` chunks, never its end: a server that reads the whole
    body before answering would wait forever; one that enforces the limit answers 413."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(chunks):
            s.sendall(f"{size:x}\r\n".encode() + b" " * size + b"\r\n")
        s.settimeout(10)
        reply = b""
        while b"\r\n\r\n" not in reply and (part := s.recv(65536)):
            reply += part
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                           if ln.lower().startswith(b"content-length:")), b"0"))
        while len(body) < length and (part := s.recv(65536)):
            body += part
        return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("method,path", [("POST", "/json"), ("PUT", "/raw")])
def test_a_chunked_body_over_the_limit_is_refused_before_its_end(small_server, method, path):
    reply = _chunked(small_server, method, path, chunks=LIMIT // 8192 + 2, size=8192)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"code":"body_too_large"' in reply, reply


def test_a_small_chunked_body_is_served(small_server):
    import httpx

    def gen():
        yield b'{"messages": [{"role": "user", '
        yield b'"content": "hi"}]}'

    r = httpx.post(f"http://127.0.0.1:{small_server}/json", content=gen(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json() == {"messages": 1}
    r = httpx.put(f"http://127.0.0.1:{small_server}/raw", content=(b"x" * 100 for _ in range(3)))
    assert r.json() == {"bytes": 300}


def test_api_key_file_comments_and_blank_lines(tmp_path):
    f = tmp_path / "keys"
    f.write_text("key-one\n  # retired: oldkey\n#another\n\n   key-two  \n")
    keys = Settings(api_key_file=f).keys()
    assert sorted(keys) == ["key-one", "key-two"]
    assert all(t.startswith("k") and len(t) == 25 for t in keys.values())


class _Keyed:
    """What ChatService.tenant_of needs of a request."""

    def __init__(self, headers):
        self.headers = headers


def test_tenant_of_compares_every_key():
    svc = ChatService.__new__(ChatService)
    svc.keys = Settings(api_key=["alpha", "beta"]).keys()
    svc._key_digests = ChatService.key_digests(svc.keys)
    assert svc.tenant_of(_Keyed({"authorization": "Bearer beta"})) == svc.keys["beta"]
    assert svc.tenant_of(_Keyed({"x-api-key": "alpha"})) == svc.keys["alpha"]
    for bad in ({"authorization": "Bearer alph"}, {"authorization": "Bearer alphaa"}, {},
                {"authorization": "Basic alpha"}, {"x-api-key": "\udcff"}):
        with pytest.raises(Exception, match="invalid API key"):
            svc.tenant_of(_Keyed(bad))


def test_serving_open_beyond_loopback_is_refused_unless_asked():
    assert exposure_problem(Settings(host="127.0.0.1")) is None
    assert "--allow-open" in exposure_problem(Settings(host="0.0.0.0"))
    assert exposure_problem(Settings(host="0.0.0.0", api_key=["k"])) is None
    assert exposure_problem(Settings(host="0.0.0.0", allow_open=True)) is None
    # The command line refuses before it builds anything (no engine, no model needed).
    r = subprocess.run([sys.executable, "-m", "deltamem.cli", "serve", "--host", "0.0.0.0",
                        "--port", str(free_port())], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "without an API key" in r.stderr


class SlowCommitStore(ms.SqliteStore):
    """A real SQLite store whose commits take a while (a slow network to Redis)."""

    async def commit(self, record, expected_version):
        await asyncio.sleep(0.5)
        return await super().commit(record, expected_version)


def test_a_cancelled_turn_keeps_the_lock_until_its_commit_lands(tmp_path):
    async def main():
        store = SlowCommitStore(tmp_path / "s.sqlite3")
        locks = SessionLocks()
        rec = ms.SessionRecord("s1", "t", ms.StateIdentity("b", "none", 1, 1, 1),
                               transcript=[1, 2, 3], tokens_absorbed=2)
        seen = []

        async def first():
            async with locks.hold("t", "s1", 5):
                await commit_through_cancellation(store, rec, 0)

        async def second():
            async with locks.hold("t", "s1", 5):
                seen.append(await store.versions("t", "s1"))

        task = asyncio.create_task(first())
        await asyncio.sleep(0.1)  # the commit is under way
        task.cancel()  # the client went away
        queued = asyncio.create_task(second())
        with pytest.raises(asyncio.CancelledError):
            await task
        await queued
        await store.close()
        return seen

    # The queued turn got the lock only once version 1 had landed.
    assert asyncio.run(main()) == [[1]]
