"""Turn orchestration for sessions: the transcript as tokens, the context window, the write
start, and the atomic commit (docs/design.md §2 and §3).

A session's transcript is an append-only token stream: every message is rendered on its own
(ChatML), so earlier tokens never change when the conversation grows. After a turn,
`tokens_absorbed == len(transcript) - 1`: the last sampled token has not been through the
model yet; the next turn writes it first, then its new messages.

A turn's prompt is [pinned system prompt] + [window of recent transcript, message-aligned]
+ [unabsorbed tokens: the previous turn's last token, the new messages, the generation
prompt]. The write start is where the unabsorbed tokens begin, so re-sent context is read and
never written twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from memory_store import SessionRecord, StateIdentity

TURN_LOG_KEEP = 64


class TurnError(ValueError):
    """A request that cannot be served as asked (maps to 400)."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None,
                 status: int = 400):
        super().__init__(message)
        self.code, self.param, self.status = code, param, status


class SessionBusy(RuntimeError):
    """Another turn holds the session longer than the bounded wait (maps to 409)."""


class ChatFormat:
    """Renders messages to tokens one by one (ChatML: SmolLM2, Qwen3)."""

    def __init__(self, tokenizer):
        template = tokenizer.chat_template or ""
        if "<|im_start|>" not in template:
            raise ValueError("the server renders ChatML chat templates (<|im_start|>…); this "
                             "model's template is different")
        self.tok = tokenizer
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.gen_prompt = self._enc("<|im_start|>assistant\n")
        self.newline = self._enc("\n")
        self.close = [self.im_end, *self.newline]
        # The template's own default system prompt (SmolLM2 adds one when none is given).
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False)
        head = "<|im_start|>system\n"
        self.default_system = None
        if probe.startswith(head):
            self.default_system = probe[len(head):probe.index("<|im_end|>")]

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def message(self, role: str, content: str) -> list[int]:
        return self._enc(f"<|im_start|>{role}\n{content}<|im_end|>\n")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@dataclass
class TurnPlan:
    """Everything a turn needs and produces, before the engine runs."""

    record: SessionRecord
    expected_version: int
    new_messages: list[dict]
    new_tokens: list[int]  # appended to the transcript before generation
    boundaries: list[int]  # message start offsets in transcript + new_tokens
    prompt: list[int]
    write_start: int
    spans: list[tuple[int, int]]  # prompt = concat of (transcript + new_tokens)[s:e]
    window: int
    initial_state: torch.Tensor | None = None


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def plan_turn(fmt: ChatFormat, record: SessionRecord, messages: list[dict], window: int,
              max_model_len: int, max_tokens: int) -> TurnPlan:
    """Work out the new messages, the prompt and the write start of one turn."""
    if not messages:
        raise TurnError("the request has no new message for this session", param="messages")
    stored = record.messages
    T = record.transcript
    meta = record.meta
    if stored and stored[0]["role"] == "system" and messages[0]["role"] != "system":
        stored = stored[1:]  # a client that never sent the (default) system prompt
    # A client that re-sends the whole history: its prefix matches what is stored.
    if stored and len(messages) > len(stored) and all(
            _same(m, s) for m, s in zip(messages, stored, strict=False)):
        new = messages[len(stored):]
    else:
        new = list(messages)
    system = meta.get("system")
    if not T:  # first turn: a leading system message sets the session's system prompt
        if new and new[0]["role"] == "system":
            system = new[0]["content"]
            new = new[1:]
        elif system is None:
            system = fmt.default_system
    new_system = [m for m in new if m["role"] == "system"]
    if new_system:
        if T and all(m["content"].strip() == (system or "").strip() for m in new_system):
            new = [m for m in new if m["role"] != "system"]
        else:
            raise TurnError("a session's system prompt is set by its first turn; it cannot "
                            "change later (start or fork a new session)", param="messages")
    if not new:
        raise TurnError("the request has no new message for this session", param="messages")
    if new[-1]["role"] != "user":
        raise TurnError("the last new message must be a user message", param="messages")

    boundaries = list(meta.get("boundaries", []))
    toks: list[int] = []
    if T:
        # Close the previous assistant message (it ended on <|im_end|> unless it hit the
        # length limit), then the new messages.
        toks += fmt.newline if T[-1] == fmt.im_end else fmt.close
    sys_len = int(meta.get("system_tokens", 0))
    if not T and system:
        boundaries.append(0)
        toks += fmt.message("system", system)
        sys_len = len(toks)
    for m in new:
        boundaries.append(len(T) + len(toks))
        toks += fmt.message(m["role"], m["content"])
    boundaries.append(len(T) + len(toks))  # the assistant reply starts here
    toks += fmt.gen_prompt
    full = T + toks
    absorbed = record.tokens_absorbed

    budget = max_model_len - max_tokens
    unabsorbed = len(full) - absorbed
    if sys_len and absorbed >= sys_len:
        unabsorbed += sys_len  # the pinned system prompt is in every prompt
    if unabsorbed > budget:
        raise TurnError(
            f"this turn needs {unabsorbed} prompt tokens + max_tokens {max_tokens}, more than "
            f"the context length {max_model_len}", code="context_length_exceeded", status=400)
    # Window start: the earliest message boundary within the last `window` tokens of the
    # transcript, never past the first unabsorbed token; then moved later until it fits.
    lo = sys_len if absorbed >= sys_len else 0
    candidates = [b for b in boundaries if lo <= b <= absorbed] + [absorbed]
    if window == 0:
        w0 = absorbed
    elif window < 0:
        w0 = min(candidates)
    else:
        w0 = min([b for b in candidates if len(T) - b <= window] or [absorbed])

    def layout(w0):
        spans = []
        if lo and w0 > 0:
            spans.append((0, sys_len))
        spans.append((w0, len(full)))
        return spans

    spans = layout(w0)
    while sum(e - s for s, e in spans) > budget and w0 < absorbed:
        later = [b for b in candidates if b > w0]
        w0 = min(later) if later else absorbed
        spans = layout(w0)
    prompt = [t for s, e in spans for t in full[s:e]]
    write_start = len(prompt) - (len(full) - absorbed)
    plan = TurnPlan(record=record, expected_version=record.version, new_messages=new,
                    new_tokens=toks, boundaries=boundaries, prompt=prompt,
                    write_start=write_start, spans=spans, window=window,
                    initial_state=record.state)
    plan.record.meta = {**meta, "system": system, "system_tokens": sys_len}
    return plan


def finish_turn(plan: TurnPlan, generated: list[int], text: str, final_state,
                finish_reason: str, identity: StateIdentity) -> SessionRecord:
    """The record after a finished turn (not yet committed)."""
    rec = plan.record
    transcript = rec.transcript + plan.new_tokens + list(generated)
    messages = rec.messages + plan.new_messages + [{"role": "assistant", "content": text}]
    if not rec.messages and rec.meta.get("system") is not None:
        messages = [{"role": "system", "content": rec.meta["system"]}] + messages
    entry = {"turn": rec.turns + 1, "spans": [list(s) for s in plan.spans],
             "write_start": plan.write_start, "prompt_tokens": len(plan.prompt),
             "generated": len(generated), "finish_reason": finish_reason,
             "window": plan.window, "time": time.time()}
    log = (rec.meta.get("turn_log", []) + [entry])[-TURN_LOG_KEEP:]
    meta = {**rec.meta, "boundaries": plan.boundaries, "turn_log": log}
    return dataclasses.replace(
        rec, identity=identity, state=final_state, transcript=transcript, messages=messages,
        tokens_absorbed=len(transcript) - 1, turns=rec.turns + 1, meta=meta)


class SessionLocks:
    """Serialises turns on one session inside this process (a bounded wait, then busy).
    Across replicas the store's compare-and-set commit refuses the loser instead."""

    def __init__(self):
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, tenant: str, session_id: str, timeout: float):
        key = (tenant, session_id)
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            try:
                await asyncio.wait_for(lock.acquire(), timeout)
            except TimeoutError as e:
                raise SessionBusy(f"session {session_id!r} is busy with another turn") from e
            try:
                yield
            finally:
                lock.release()
        finally:
            lock_, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock_, users - 1)
