"""OpenAI's stateful APIs (/v1/responses, /v1/conversations) on δ-mem sessions, with the
official `openai` SDK against one live server on the shared engine: real engine, real Redis,
real HTTP (docs/design.md §7)."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch
from live import InThreadServer, free_port
from openai import APIStatusError, BadRequestError, NotFoundError, OpenAI

from memory_store import decode_record
from server.responses import decode_response_id, encode_response_id
from server.settings import Settings

MODEL = "SmolLM2-135M-Instruct"
KEY_A, KEY_B = "key-a", "key-b"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
N = 8  # generated tokens per turn: engine turns are slow on a small CPU


@pytest.fixture(scope="module")
def api(engine_host, redis_server, tmp_path_factory):
    settings = Settings(port=free_port(), data_dir=tmp_path_factory.mktemp("responses"),
                        redis_url=redis_server.url, memory_window_tokens=64,
                        max_model_len=engine_host.engine.cfg.max_model_len,
                        default_max_tokens=N, session_lock_timeout=30,
                        api_key=[KEY_A, KEY_B])
    srv = InThreadServer(engine_host, settings)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api):
    return OpenAI(base_url=api.url + "/v1", api_key=KEY_A, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client_b(api):
    return OpenAI(base_url=api.url + "/v1", api_key=KEY_B, max_retries=0, timeout=120)


def respond(client, text, **kw):
    return client.responses.create(model=MODEL, input=text, max_output_tokens=N,
                                   temperature=0, **kw)


def session_of(r) -> dict:
    return r.model_extra["session"]


def record(api, sid, headers=AUTH_A):
    r = httpx.get(f"{api.url}/v1/sessions/{sid}/export", headers=headers)
    assert r.status_code == 200, r.text
    return decode_record(r.content)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    return body["error"]


# --- ids --------------------------------------------------------------------------------------

def test_response_ids_round_trip_and_reject_garbage():
    rid = encode_response_id("conv_ab12", 7, b"\x01" * 16)
    assert rid.startswith("resp_") and "conv_ab12" not in rid
    assert decode_response_id(rid) == ("conv_ab12", 7, b"\x01" * 16)
    for bad in ("resp_", "resp_!!!", "chatcmpl-1", "resp_" + "A" * 40,
                encode_response_id("conv_ab12", 0, b"\x01" * 16)):
        assert decode_response_id(bad) is None


# --- responses --------------------------------------------------------------------------------

def test_chained_responses_equal_chat_completions(api, client):
    """Turns chained through previous_response_id leave the session exactly as the same turns
    sent through /v1/chat/completions with a session_id: transcript, messages, state."""
    texts = ["My sister Ana lives in Porto.", "She keeps bees.", "Where does Ana live?"]
    prev, outs = None, []
    for i, text in enumerate(texts):
        kw = {"instructions": "You are terse."} if i == 0 else {}
        if prev is not None:
            kw["previous_response_id"] = prev.id
        r = respond(client, text, **kw)
        assert r.object == "response" and r.id.startswith("resp_")
        assert r.status in ("completed", "incomplete") and r.output_text
        assert r.previous_response_id == (prev.id if prev else None)
        assert 0 < r.usage.output_tokens <= N
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        assert r.usage.output_tokens_details.reasoning_tokens == 0
        assert r.usage.input_tokens_details.cached_tokens >= 0
        if prev is not None:  # the same conversation, one version on
            assert r.conversation.id == prev.conversation.id
            assert session_of(r)["version"] == session_of(prev)["version"] + 1
        prev = r
        outs.append(r)
    sid = outs[0].conversation.id
    assert session_of(outs[-1])["turns"] == 3

    twin = "chat-twin"
    for i, text in enumerate(texts):
        messages = ([{"role": "system", "content": "You are terse."}] if i == 0 else []) + \
            [{"role": "user", "content": text}]
        c = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N,
                                           temperature=0, extra_body={"session_id": twin})
        assert c.choices[0].message.content == outs[i].output_text
    a, b = record(api, sid), record(api, twin)
    assert a.transcript == b.transcript
    assert [(m["role"], m["content"]) for m in a.messages] == \
        [(m["role"], m["content"]) for m in b.messages]
    assert a.turns == b.turns == 3 and a.tokens_absorbed == b.tokens_absorbed
    assert rel_err(a.state, b.state) <= 1e-4
    assert [e["write_start"] for e in a.meta["turn_log"]] == \
        [e["write_start"] for e in b.meta["turn_log"]]
    # A chat session is a conversation too: its items, and a response continuing it.
    items = client.conversations.items.list(twin, order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == \
        [(m["role"], m["content"]) for m in b.messages]
    r = respond(client, "And what does she keep?", conversation=twin)
    assert session_of(r)["turns"] == 4 and record(api, twin).version == 4


def test_a_branch_from_an_older_response_leaves_the_newer_intact(api, client):
    r1 = respond(client, "The password is swordfish.")
    r2 = respond(client, "The door is blue.", previous_response_id=r1.id)
    sid = r1.conversation.id
    before = record(api, sid)
    # From r1 (not the latest): a new session forked at r1's version.
    r3 = respond(client, "What colour is the door?", previous_response_id=r1.id)
    assert r3.conversation.id != sid and r3.previous_response_id == r1.id
    assert session_of(r3)["version"] == 1  # the branch's first version is its turn
    branch = record(api, r3.conversation.id)
    assert branch.turns == 2
    assert [m["content"] for m in branch.messages[:3]] == \
        [m["content"] for m in before.messages[:3]]  # system, r1's input, r1's reply
    assert "The door is blue." not in [m["content"] for m in branch.messages]
    # The original is as it was, and r2 still continues it.
    after = record(api, sid)
    assert after.version == before.version and after.transcript == before.transcript
    assert torch.equal(after.state, before.state)
    assert client.responses.retrieve(r2.id).output_text == r2.output_text
    r4 = respond(client, "And the password?", previous_response_id=r2.id)
    assert r4.conversation.id == sid and session_of(r4)["turns"] == 3
    # r1 again: another branch; both branches stay apart.
    r5 = respond(client, "Say it again.", previous_response_id=r1.id)
    assert r5.conversation.id not in (sid, r3.conversation.id)


def test_streaming_events_in_order(api, client):
    events = list(client.responses.create(model=MODEL, input="Count to three.",
                                          max_output_tokens=N, temperature=0, stream=True,
                                          metadata={"run": "stream"}))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas
    final = events[-1]
    done = "response.incomplete" if final.response.status == "incomplete" else \
        "response.completed"
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"]
                     * len(deltas), "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", done]
    created = events[0].response
    assert created.status == "in_progress" and created.output == []
    text = "".join(d.delta for d in deltas)
    item_id = events[2].item.id
    assert all(d.item_id == item_id for d in deltas)
    assert events[-4].text == text and events[-3].part.text == text
    assert events[-2].item.content[0].text == text and events[-2].item.id == item_id
    r = final.response
    assert r.id == created.id and r.output_text == text and r.metadata == {"run": "stream"}
    assert r.usage.output_tokens == N or r.status == "completed"
    got = client.responses.retrieve(r.id)
    assert got.output_text == text and got.output[0].id == item_id


def test_conversation_items_then_responses(api, client):
    conv = client.conversations.create(
        items=[{"role": "developer", "content": "Be brief."},
               {"type": "message", "role": "user", "content": "My name is Rui."},
               {"role": "user", "content": [{"type": "input_text", "text": "I live in "},
                                            {"type": "input_text", "text": "Faro."}]}],
        metadata={"topic": "intro"})
    assert conv.object == "conversation" and conv.metadata == {"topic": "intro"}
    cid = conv.id
    items = client.conversations.items.list(cid, order="asc").data
    assert [i.content[0].text for i in items] == ["Be brief.", "My name is Rui.",
                                                  "I live in Faro."]
    assert all(i.model_extra["absorbed"] is False for i in items)
    added = client.conversations.items.create(cid, items=[
        {"role": "user", "content": "I like figs."}, {"role": "user", "content": "Drop me."}])
    assert [i.content[0].text for i in added.data] == ["I like figs.", "Drop me."]
    drop = added.data[1].id
    assert client.conversations.items.retrieve(drop, conversation_id=cid).id == drop
    assert client.conversations.items.delete(drop, conversation_id=cid).id == cid  # pending
    with pytest.raises(NotFoundError):
        client.conversations.items.retrieve(drop, conversation_id=cid)
    pending = [i.id for i in client.conversations.items.list(cid, order="asc").data]
    assert len(pending) == 4

    r = respond(client, "Where do I live?", conversation=cid)
    assert r.conversation.id == cid and session_of(r)["version"] == 4  # create, add, delete
    # The pending items reached the model, before the input, in order; nothing was left.
    rec = record(api, cid)
    assert rec.meta["system"] == "Be brief."  # the developer message opened the session
    assert [m["content"] for m in rec.messages if m["role"] == "user"] == \
        ["My name is Rui.", "I live in Faro.", "I like figs.", "Where do I live?"]
    listed = client.conversations.items.list(cid, order="asc").data
    assert [i.id for i in listed][:4] == pending  # the same ids, now absorbed
    assert listed[0].role == "developer" and listed[-1].role == "assistant"
    assert listed[-1].id == r.output[0].id and listed[-1].content[0].text == r.output_text
    assert all(i.model_extra["absorbed"] for i in listed)
    page = client.conversations.items.list(cid, limit=2)  # newest first
    assert [i.id for i in page.data] == [listed[-1].id, listed[-2].id] and page.has_more
    inputs = client.responses.input_items.list(r.id, order="asc").data
    assert [i.content[0].text for i in inputs] == \
        ["Be brief.", "My name is Rui.", "I live in Faro.", "I like figs.", "Where do I live?"]
    # An absorbed item cannot be taken out of the state.
    with pytest.raises(APIStatusError) as exc:
        client.conversations.items.delete(pending[0], conversation_id=cid)
    assert exc.value.status_code == 409 and exc.value.body["code"] == "item_absorbed"
    assert "rollback" in exc.value.body["message"]
    # The next response in the conversation continues it.
    r2 = respond(client, "What is my name?", conversation={"id": cid})
    assert session_of(r2)["turns"] == 2 and session_of(r2)["version"] == 5
    # Metadata update, retrieve, delete.
    assert client.conversations.update(cid, metadata={"topic": "x"}).metadata == {"topic": "x"}
    assert client.conversations.retrieve(cid).metadata == {"topic": "x"}
    assert client.responses.retrieve(r2.id).output_text == r2.output_text  # still resolves
    assert client.conversations.delete(cid).deleted is True
    for call in (lambda: client.conversations.retrieve(cid),
                 lambda: client.responses.retrieve(r.id),
                 lambda: client.conversations.items.list(cid)):
        with pytest.raises(NotFoundError):
            call()


def test_concurrent_responses_in_one_conversation(api, client):
    """Two responses at once in one conversation: the second finds the session moved on when
    its turn starts, plans again on the new version, and continues after the first. A pending
    item is answered by a response without input."""
    conv = client.conversations.create(items=[{"role": "user", "content": "Say yes."}])
    r0 = client.responses.create(model=MODEL, conversation=conv.id, max_output_tokens=N,
                                 temperature=0)
    assert session_of(r0)["turns"] == 1 and r0.output_text
    with cf.ThreadPoolExecutor(2) as pool:
        rs = list(pool.map(lambda t: respond(client, t, conversation=conv.id),
                           ["First note.", "Second note."]))
    assert sorted(session_of(r)["turns"] for r in rs) == [2, 3]
    rec = record(api, conv.id)
    users = [m["content"] for m in rec.messages if m["role"] == "user"]
    assert rec.turns == 3 and users[0] == "Say yes."
    assert sorted(users[1:]) == ["First note.", "Second note."]
    for r in rs:
        assert client.responses.retrieve(r.id).output_text == r.output_text


def test_store_false_keeps_nothing(api, client):
    before = httpx.get(api.url + "/v1/sessions", headers=AUTH_A,
                       params={"limit": 100}).json()["data"]
    r = respond(client, "Say hi.", store=False)
    assert r.output_text and r.store is False and r.conversation is None
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r.id)
    assert httpx.get(api.url + "/v1/sessions", headers=AUTH_A,
                     params={"limit": 100}).json()["data"] == before
    # On a session: runs on its state, commits nothing.
    base = respond(client, "Remember the number 31.")
    sid = base.conversation.id
    v = record(api, sid).version
    r2 = respond(client, "Which number?", previous_response_id=base.id, store=False)
    assert r2.output_text and record(api, sid).version == v
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r2.id)


def test_retrieve_input_items_and_delete(api, client):
    r = respond(client, [{"role": "user", "content": "Name a fruit."}],
                metadata={"k": "v"}, instructions="Answer in one word.")
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    assert got.metadata == {"k": "v"} and got.instructions == "Answer in one word."
    assert got.usage.input_tokens == r.usage.input_tokens and got.status == r.status
    assert got.model_dump(exclude={"session"}) == r.model_dump(exclude={"session"})
    items = client.responses.input_items.list(r.id).data
    assert [i.content[0].text for i in items] == ["Name a fruit."]  # not the instructions
    assert httpx.delete(f"{api.url}/v1/responses/{r.id}", headers=AUTH_A).json() == \
        {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(NotFoundError):
        respond(client, "Another?", previous_response_id=r.id)
    # The conversation itself is still there (the turn stays in its state).
    assert client.conversations.retrieve(r.conversation.id).id == r.conversation.id


def test_tenants_are_isolated(api, client, client_b):
    r = respond(client, "Secret of A: 9911.")
    cid = r.conversation.id
    for call in (lambda: client_b.responses.retrieve(r.id),
                 lambda: client_b.responses.input_items.list(r.id),
                 lambda: client_b.responses.delete(r.id),
                 lambda: respond(client_b, "What is A's secret?", previous_response_id=r.id),
                 lambda: respond(client_b, "What is A's secret?", conversation=cid),
                 lambda: client_b.conversations.retrieve(cid),
                 lambda: client_b.conversations.items.list(cid),
                 lambda: client_b.conversations.items.create(
                     cid, items=[{"role": "user", "content": "x"}]),
                 lambda: client_b.conversations.delete(cid)):
        with pytest.raises(NotFoundError):
            call()
    assert client.responses.retrieve(r.id).output_text == r.output_text
    no_key = httpx.get(f"{api.url}/v1/responses/{r.id}")
    assert err(no_key, 401)["type"] == "authentication_error"


# --- errors -----------------------------------------------------------------------------------

def test_unsupported_fields_and_errors_in_openai_json(api, client):
    url = api.url + "/v1/responses"
    ok = {"model": MODEL, "input": "hi", "max_output_tokens": 4}
    cases = [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "see"},
            {"type": "input_file", "file_id": "file-1"}]}]}, "input[0].content[1]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
         "input[0].type"),
        ({"previous_response_id": "resp_x", "conversation": "conv_x"},
         "previous_response_id"),
        ({"input": [{"role": "assistant", "content": "hello"}]}, "input[0]"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"metadata": {"k": "v" * 600}}, "metadata.k"),
    ]
    for extra, param in cases:
        e = err(httpx.post(url, json={**ok, **extra}, headers=AUTH_A), 400)
        assert e["param"] == param, (extra, e)
        assert e["type"] == "invalid_request_error"
    e = err(httpx.post(url, json={**ok, "model": "gpt-9"}, headers=AUTH_A), 404)
    assert e["code"] == "model_not_found"
    e = err(httpx.post(url, json={**ok, "previous_response_id": "resp_nope"}, headers=AUTH_A),
            404)
    assert e["code"] == "response_not_found" and e["param"] == "previous_response_id"
    e = err(httpx.post(url, json={**ok, "conversation": "conv_nope"}, headers=AUTH_A), 404)
    assert e["code"] == "conversation_not_found"
    e = err(httpx.post(url, json={**ok, "stream": True, "conversation": "conv_nope"},
                       headers=AUTH_A), 404)  # refused before the stream starts
    for path in ("/v1/responses/resp_nope", "/v1/conversations/conv_nope",
                 "/v1/conversations/conv_nope/items", "/v1/responses/resp_nope/input_items"):
        err(httpx.get(api.url + path, headers=AUTH_A), 404)
    # The SDK raises the same errors.
    with pytest.raises(BadRequestError) as exc:
        client.responses.create(model=MODEL, input="hi", background=True)
    assert exc.value.body["param"] == "background"
    # A conversation's items: only text messages; a system message only first.
    conv = client.conversations.create(items=[{"role": "user", "content": "hi"}])
    e = err(httpx.post(f"{api.url}/v1/conversations/{conv.id}/items", headers=AUTH_A,
                       json={"items": [{"role": "system", "content": "late"}]}), 400)
    assert e["param"] == "items[0]"
    e = err(httpx.post(api.url + "/v1/conversations", headers=AUTH_A, json={"items": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}), 400)
    assert e["param"] == "items[0].content[0]"
    # A continuing conversation keeps its system prompt.
    r = respond(client, "Hello.", instructions="Be brief.")
    e = err(httpx.post(url, headers=AUTH_A, json={
        **ok, "previous_response_id": r.id, "instructions": "Be verbose."}), 400)
    assert e["param"] == "instructions"
    e = err(httpx.post(url, headers=AUTH_A, json={
        **ok, "previous_response_id": r.id,
        "input": [{"role": "assistant", "content": "I said so."},
                  {"role": "user", "content": "ok"}]}), 400)
    assert e["param"] == "input[0]"
