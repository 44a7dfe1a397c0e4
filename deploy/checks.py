"""Checks of chat completion answers, shared by the locustfile and the tests.

No locust import here: locust monkey-patches the standard library with gevent when imported.
"""

from __future__ import annotations

import json


class Malformed(AssertionError):
    """An answer that arrived but is not what the API promises."""


def check_usage(usage) -> None:
    if not isinstance(usage, dict):
        raise Malformed(f"no usage: {usage!r}")
    p, c, t = (usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    if not (isinstance(p, int) and isinstance(c, int) and p > 0 and c > 0 and t == p + c):
        raise Malformed(f"inconsistent usage: {usage!r}")


def check_session(session, session_id: str | None, version: int | None) -> None:
    if session_id is None:
        if session is not None:
            raise Malformed(f"a sessionless answer carries a session: {session!r}")
        return
    if not isinstance(session, dict) or session.get("id") != session_id:
        raise Malformed(f"answer without its session {session_id!r}: {session!r}")
    if session.get("version") != version:
        raise Malformed(f"session {session_id!r}: version {session.get('version')!r}, "
                        f"expected {version}")


def check_completion(body, session_id: str | None, version: int | None) -> str:
    """A non-streamed answer; returns its text."""
    if not isinstance(body, dict) or body.get("object") != "chat.completion":
        raise Malformed(f"not a chat.completion: {str(body)[:200]}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise Malformed("no choices")
    content = (choices[0].get("message") or {}).get("content")
    if not isinstance(content, str) or not content.strip():
        raise Malformed(f"empty answer: {content!r}")
    if choices[0].get("finish_reason") not in ("stop", "length"):
        raise Malformed(f"finish_reason {choices[0].get('finish_reason')!r}")
    check_usage(body.get("usage"))
    check_session(body.get("session"), session_id, version)
    return content


def parse_sse(lines, session_id: str | None, version: int | None) -> str:
    """A streamed answer (an iterable of SSE lines, bytes or str); returns its text."""
    text: list[str] = []
    finals, usages, done = [], [], False
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line:
            continue
        if done:
            raise Malformed(f"data after [DONE]: {line[:100]!r}")
        if not line.startswith("data: "):
            raise Malformed(f"not an SSE data line: {line[:100]!r}")
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            raise Malformed(f"error in stream: {chunk['error']}")
        if chunk.get("object") != "chat.completion.chunk":
            raise Malformed(f"not a chat.completion.chunk: {payload[:200]}")
        if chunk.get("usage"):
            usages.append(chunk["usage"])
        for choice in chunk.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason"):
                finals.append(chunk)
    if not done:
        raise Malformed("stream did not end with data: [DONE]")
    if len(finals) != 1:
        raise Malformed(f"{len(finals)} chunks with a finish_reason, expected 1")
    if finals[0]["choices"][0]["finish_reason"] not in ("stop", "length"):
        raise Malformed(f"finish_reason {finals[0]['choices'][0]['finish_reason']!r}")
    if len(usages) != 1:
        raise Malformed(f"{len(usages)} usage chunks, expected 1")
    check_usage(usages[0])
    content = "".join(text)
    if not content.strip():
        raise Malformed("empty streamed answer")
    check_session(finals[0].get("session"), session_id, version)
    return content
