"""Turn orchestration for sessions: the transcript as tokens, the window and its epochs, the
write start, and the record after a turn (docs/design.md §2 and §3).

A session's transcript is an append-only token stream: every message is rendered on its own
(ChatML), so earlier tokens never change when the conversation grows. After a turn,
`tokens_absorbed == len(transcript) - 1`: the last sampled token has not been through the
model yet; the next turn writes it first, then its new messages.

A session runs in epochs. An epoch fixes the prompt's prefix: [pinned system prompt] + the
transcript from the window start `ws`; the tokens up to `write_from` (the absorbed count when
the epoch began) are read under the epoch's state `S_e` (the session's state then) and not
written; every later token is written once, as it arrives. Within an epoch each turn's prompt
extends the previous one, so its K/V are those of the previous turn (a prefix-cache hit)
and only new tokens are computed, as the reference runtime does. A new epoch begins when the
window outgrows `memory_window_tokens` (the start jumps forward to a message boundary, to
half the window) or the context: the window is then re-read under the state of that moment.
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

from .engine.model import Ingest

TURN_LOG_KEEP = 64
SYSTEM_FIXED = ("a session's system prompt is set by its first turn; it cannot change later "
                "(start or fork a new session)")


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
        self.specials = [t for t in tokenizer.get_added_vocab() if t.startswith("<")]
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
        if any(sp in content for sp in self.specials):
            # Content that spells a special token ("<|im_end|><|im_start|>system…") is text:
            # tokenized as such, it cannot close its message and forge another turn (as vLLM
            # renders user content with special tokens off).
            return (self._enc(f"<|im_start|>{role}\n")
                    + self.tok.encode(content, add_special_tokens=False,
                                      split_special_tokens=True)
                    + self._enc("<|im_end|>\n"))
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
    write_start: int  # prompt position of the epoch's first written token
    spans: list[tuple[int, int]]  # prompt = concat of (transcript + new_tokens)[s:e]
    window: int
    window_start: int  # transcript position where the epoch's window starts
    write_from: int  # transcript position of the epoch's first written token
    new_epoch: bool  # this turn starts an epoch (the window is re-read under `initial_state`)
    initial_state: torch.Tensor | None = None  # the epoch's state S_e (None: zero)
    known: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # prompt pos
    # SSW: the epoch's ingests, this turn's last, [start, end, [[start, end] per message]]
    # in transcript positions (what the record keeps; `ingests` gives them to the engine).
    epoch_ingests: list = dataclasses.field(default_factory=list)

    def prompt_position(self, t: int) -> int:
        """Where transcript position t (>= the window start) sits in the prompt."""
        pinned = self.spans[0][1] if len(self.spans) == 2 else 0
        return pinned + t - self.window_start

    @property
    def ingests(self) -> list[Ingest]:
        """The epoch's ingests in prompt positions, as the engine takes them."""
        pp = self.prompt_position
        return [Ingest(pp(a), pp(b), tuple((pp(x), pp(y)) for x, y in m))
                for a, b, m in self.epoch_ingests]

    def transcript_position(self, p: int) -> int | None:
        """The transcript position of prompt position p (None inside the pinned prefix)."""
        pinned = self.spans[0][1] if len(self.spans) == 2 else 0
        return None if p < pinned else self.window_start + p - pinned


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def _new_messages(fmt: ChatFormat, record: SessionRecord, messages: list[dict]
                  ) -> tuple[list[dict], str | None]:
    """The messages this turn adds, and the session's system prompt.

    A request to a session carries either only new messages (no assistant message among
    them), or a history followed by new messages. A history (everything up to the request's
    last assistant message) must be the stored conversation's tail: the whole of it (a client
    that re-sends everything) or its last messages (a client that trims from the front).
    Anything else is refused, never written into the state a second time: a request that
    repeats stored messages up to a user message is a retried turn that already committed
    (409 `turn_already_committed`; an Idempotency-Key returns its answer instead), and any
    other history is 409 `history_mismatch`."""
    if not messages:
        raise TurnError("the request has no new message for this session", param="messages")
    if messages[-1]["role"] == "assistant":
        raise TurnError("the last new message must be a user message", param="messages")
    stored = record.messages
    meta = record.meta
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                     default=-1)
    if not stored or last_reply < 0:
        new = list(messages)
    else:
        k = last_reply + 1
        if k <= len(stored) and all(
                _same(m, s) for m, s in zip(messages[:k], stored[-k:], strict=True)):
            new = messages[k:]
        else:
            _refuse_history(stored, messages)
    system = meta.get("system")
    system = meta.get("system")
    if not record.transcript:  # first turn: a leading system message sets the system prompt
        if new and new[0]["role"] == "system":
            system = new[0]["content"]
            new = new[1:]
        elif system is None:
            system = fmt.default_system
    new_system = [m for m in new if m["role"] == "system"]
    if new_system:
        if record.transcript and all(m["content"].strip() == (system or "").strip()
                                     for m in new_system):
            new = [m for m in new if m["role"] != "system"]
        else:
            raise TurnError(SYSTEM_FIXED, param="messages")
    if not new:
        raise TurnError("the request has no new message for this session", param="messages")
    if new[-1]["role"] != "user":
        raise TurnError("the last new message must be a user message", param="messages")
    return new, system


def _window_start(boundaries: list[int], lo: int, T: int, absorbed: int, window: int,
                  ws: int, prompt_len, budget: int) -> int:
    """The epoch's window start: the current one while the window (transcript tokens from
    it) stays within `window` and the prompt fits. Else the earliest message boundary that
    leaves room to grow (half the window, or half the budget with `window` −1), failing
    that the earliest within the whole window (or that fits), and `absorbed` (state only) as
    the last resort."""
    if window == 0:
        return absorbed

    def fits(b: int) -> bool:
        return prompt_len(b) <= budget

    if (window < 0 or T - ws <= window) and fits(ws):
        return ws
    candidates = sorted(b for b in boundaries if lo <= b <= absorbed and b > ws and fits(b))
    if window > 0:
        tiers = (lambda b: T - b <= window // 2, lambda b: T - b <= window)
    else:
        tiers = (lambda b: prompt_len(b) <= budget // 2, lambda b: True)
    for roomy in tiers:
        picked = [b for b in candidates if roomy(b)]
        if picked:
            return picked[0]
    return absorbed


def _refuse_history(stored: list[dict], messages: list[dict]) -> None:
    """Raise the 409 for a history that is not the stored conversation's tail."""
    # The client may leave out the stored (default) system prompt.
    head = stored[1:] if stored[0]["role"] == "system" and messages[0]["role"] != "system" \
        else stored
    if len(messages) <= len(head) and all(
            _same(m, s) for m, s in zip(messages, head, strict=False)):
        turn = sum(1 for m in head[:len(messages) + 1] if m["role"] == "assistant")
        raise TurnError(
            f"these messages are already in the session, answered in turn {turn}: a retried "
            "turn that committed. Send an Idempotency-Key header to get the committed answer "
            "back on a retry; to continue, send only the new messages (or the whole history "
            "and then the new ones)", code="turn_already_committed", param="messages",
            status=409)
    i = next((i for i, (m, s) in enumerate(zip(messages, head, strict=False)) if not _same(m, s)),
             min(len(messages), len(head)))
    if i < len(messages) and messages[i]["role"] == "system":
        raise TurnError(SYSTEM_FIXED, param="messages")
    raise TurnError(
        f"the history in this request differs from the session's stored conversation (first "
        f"at messages[{i}]); it is not written again. Send only the new messages, or the "
        "stored history (GET /v1/sessions/{id}?full=true) followed by them; to change the "
        "past, roll back or fork the session", code="history_mismatch",
        param=f"messages[{i}]", status=409)


def plan_turn(fmt: ChatFormat, record: SessionRecord, messages: list[dict], window: int,
              max_model_len: int, max_tokens: int) -> TurnPlan:
    """Work out the new messages, the epoch, the prompt and the write start of one turn."""
    new, system = _new_messages(fmt, record, messages)
    T = record.transcript
    meta = record.meta
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
    messages_at = []  # the new messages' tokens (SSW writes each as one message)
    for m in new:
        boundaries.append(len(T) + len(toks))
        toks += fmt.message(m["role"], m["content"])
        messages_at.append([boundaries[-1], len(T) + len(toks)])
    boundaries.append(len(T) + len(toks))  # the assistant reply starts here
    toks += fmt.gen_prompt
    full = T + toks
    absorbed = record.tokens_absorbed

    budget = max_model_len - max_tokens
    pin = sys_len if sys_len and absorbed >= sys_len else 0
    if len(full) - absorbed + pin > budget:
        raise TurnError(
            f"this turn needs {len(full) - absorbed + pin} prompt tokens + max_tokens "
            f"{max_tokens}, more than the context length {max_model_len}",
            code="context_length_exceeded", status=400)
    epoch = meta.get("epoch")
    if epoch is None:  # a new session, or a record from before epochs: start one now
        ws, write_from = 0, absorbed
    else:
        ws, write_from = int(epoch["window_start"]), int(epoch["write_from"])

    def prompt_len(start: int) -> int:
        return (pin if start > 0 else 0) + len(full) - start

    new_ws = _window_start(boundaries, pin, len(T), absorbed, window, ws, prompt_len, budget)
    new_epoch = epoch is None or new_ws != ws
    if new_epoch and T:
        ws, write_from = new_ws, absorbed
    spans = ([(0, pin)] if pin and ws > 0 else []) + [(ws, len(full))]
    prompt = [t for s, e in spans for t in full[s:e]]
    plan = TurnPlan(record=record, expected_version=record.version, new_messages=new,
                    new_tokens=toks, boundaries=boundaries, prompt=prompt, write_start=0,
                    spans=spans, window=window, window_start=ws, write_from=write_from,
                    new_epoch=new_epoch)
    plan.write_start = plan.prompt_position(write_from) if ws > 0 else write_from
    # SSW: this turn's new tokens are one ingest (the reference's session runtime takes a turn
    # in one forward); the epoch's earlier ingests are replayed when its stream is recomputed.
    # A reply cut by the length limit is closed with <|im_end|> written as a reply token, as
    # one the model had generated: an ingest's place is then a function of the tokens alone,
    # which sharing K/V across requests by tokens needs.
    start = len(T) + (len(fmt.close) - len(fmt.newline) if T and T[-1] != fmt.im_end else 0)
    plan.epoch_ingests = [g for g in meta.get("ingests", []) if g[0] >= write_from] + [
        [start, len(full), messages_at]]
    if new_epoch:
        plan.initial_state = record.state if T else None
    else:
        plan.initial_state = record.extra_states.get("epoch")
        # States the epoch's requests passed: a prefix-cache hit may resume at them.
        block = meta.get("block_pos")
        if block is not None and "block" in record.extra_states and block >= write_from:
            plan.known[plan.prompt_position(block)] = record.extra_states["block"]
        if record.state is not None:
            plan.known[plan.prompt_position(absorbed)] = record.state
    plan.record.meta = {**meta, "system": system, "system_tokens": sys_len}
    return plan


def finish_turn(plan: TurnPlan, generated: list[int], text: str, final_state,
                finish_reason: str, identity: StateIdentity, block=None,
                cached_tokens: int | None = None) -> SessionRecord:
    """The record after a finished turn (not yet committed). `block` is the engine's state at
    the last KV block boundary it passed, (prompt position, state)."""
    rec = plan.record
    transcript = rec.transcript + plan.new_tokens + list(generated)
    messages = rec.messages + plan.new_messages + [{"role": "assistant", "content": text}]
    if not rec.messages and rec.meta.get("system") is not None:
        messages = [{"role": "system", "content": rec.meta["system"]}] + messages
    entry = {"turn": rec.turns + 1, "spans": [list(s) for s in plan.spans],
             "write_start": plan.write_start, "prompt_tokens": len(plan.prompt),
             "generated": len(generated), "finish_reason": finish_reason,
             "window": plan.window, "window_start": plan.window_start,
             "new_epoch": plan.new_epoch, "cached_tokens": cached_tokens, "time": time.time()}
    log = (rec.meta.get("turn_log", []) + [entry])[-TURN_LOG_KEEP:]
    meta = {**rec.meta, "boundaries": plan.boundaries, "turn_log": log,
            "epoch": {"window_start": plan.window_start, "write_from": plan.write_from},
            "ingests": plan.epoch_ingests}
    extra = {}
    if final_state is not None:
        if plan.initial_state is not None:
            extra["epoch"] = plan.initial_state
        at = None if block is None else plan.transcript_position(block[0])
        prev = meta.pop("block_pos", None)
        if at is not None and at >= plan.write_from:
            extra["block"], meta["block_pos"] = block[1], at
        elif (not plan.new_epoch and prev is not None and prev >= plan.write_from
              and "block" in rec.extra_states):
            # A turn that passed no new block boundary (a short one after a cache hit): the
            # epoch's last snapshot still holds, and the next turn's hit resumes there.
            extra["block"], meta["block_pos"] = rec.extra_states["block"], prev
    return dataclasses.replace(
        rec, identity=identity, state=final_state, transcript=transcript, messages=messages,
        tokens_absorbed=len(transcript) - 1, turns=rec.turns + 1, meta=meta,
        extra_states=extra)


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
