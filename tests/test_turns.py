"""The heart of a session turn (server/sessions.py), without vLLM and without the model.

The tokenizer is tests/chatml_tokenizer.py: byte-level (one token per UTF-8 byte) with
SmolLM2's ChatML template and special-token ids, so every layout below is exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from memory_store import SessionRecord, StateIdentity
from server.sessions import (
    ChatFormat,
    SessionBusy,
    SessionLocks,
    TurnError,
    finish_turn,
    plan_turn,
)

try:  # pytest puts tests/ on sys.path (rootdir without tests/__init__.py)
    from chatml_tokenizer import SMOLLM2_SYSTEM, chatml_tokenizer
except ImportError:  # tests/ became a package
    from tests.chatml_tokenizer import SMOLLM2_SYSTEM, chatml_tokenizer

IDENTITY = StateIdentity("test-backbone", "test-adapter", 2, 1, 4)
IM_START, IM_END = 1, 2  # SmolLM2's ids, kept by the test tokenizer
BIG = 1_000_000  # a context length nothing here reaches
MAX_TOKENS = 16


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def fmt(tok):
    """SmolLM2's template: a default system prompt."""
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def fmt_plain():
    """The same ChatML template without a default system prompt."""
    return ChatFormat(chatml_tokenizer(None))


def system(c):
    return {"role": "system", "content": c}


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


def enc(fmt, text):
    return fmt.tok.encode(text, add_special_tokens=False)


def template_ids(fmt, messages):
    """The template's rendering of a conversation, with the generation prompt, as ids."""
    text = fmt.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return enc(fmt, text)


def new_record():
    return SessionRecord("s1", "t1", IDENTITY)


def full_of(plan):
    return plan.record.transcript + plan.new_tokens


def window_start(plan):
    return plan.spans[-1][0]


def check_plan(fmt, plan):
    """What holds for every plan: the spans make the prompt, the write start is where the
    unabsorbed tokens begin, and they are all at the end of the prompt."""
    full = full_of(plan)
    absorbed = plan.record.tokens_absorbed
    assert plan.prompt == [t for s, e in plan.spans for t in full[s:e]]
    assert plan.write_start == len(plan.prompt) - (len(full) - absorbed)
    assert plan.prompt[plan.write_start:] == full[absorbed:]
    assert plan.prompt[-len(fmt.gen_prompt):] == fmt.gen_prompt
    assert plan.boundaries[-1] == len(full) - len(fmt.gen_prompt)  # the reply starts there


def reply_tokens(fmt, text, on_im_end=True):
    return enc(fmt, text) + ([fmt.im_end] if on_im_end else [])


def turn(fmt, record, messages, reply="Sure.", *, on_im_end=True, finish=None, window=-1,
         max_model_len=BIG, max_tokens=MAX_TOKENS):
    """One planned and finished turn, committed as the store would (version + 1)."""
    plan = plan_turn(fmt, record, messages, window, max_model_len, max_tokens)
    check_plan(fmt, plan)
    generated = reply_tokens(fmt, reply, on_im_end)
    finish = finish or ("stop" if on_im_end else "length")
    rec = finish_turn(plan, generated, reply, None, finish, IDENTITY)
    assert rec.tokens_absorbed == len(rec.transcript) - 1
    return plan, dataclasses.replace(rec, version=rec.version + 1)


def four_turn_session(fmt):
    """A session of four exchanges of different lengths (the default system prompt)."""
    rec = new_record()
    for i, (q, a) in enumerate([("Hi!", "Hello, how can I help?"),
                                ("Tell me about owls, please. " * 3, "Owls are birds."),
                                ("And cats?", "Cats are mammals " * 5),
                                ("Thanks.", "You're welcome.")]):
        _, rec = turn(fmt, rec, [user(q)], a, on_im_end=(i != 2))  # turn 3 hits the limit
    return rec


# --- ChatFormat -------------------------------------------------------------------------------


def test_tokenizer_is_byte_level(fmt):
    for text in ("hello", "héllo wörld\n", "日本語 \t x", ""):
        ids = enc(fmt, text)
        assert len(ids) == len(text.encode())
        assert all(i >= 3 for i in ids)
        assert fmt.tok.decode(ids) == text
    assert fmt.tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == \
        [0, IM_START, IM_END]
    assert fmt.tok.eos_token == fmt.tok.pad_token == "<|endoftext|>"


def test_message_layout(fmt):
    nl = enc(fmt, "\n")
    assert len(nl) == 1
    assert fmt.im_end == IM_END
    assert fmt.newline == nl
    assert fmt.close == [IM_END, *nl]
    assert fmt.gen_prompt == [IM_START, *enc(fmt, "assistant\n")]
    assert fmt.message("user", "hi there") == [IM_START, *enc(fmt, "user\nhi there"), IM_END, *nl]
    assert fmt.message("assistant", "") == [IM_START, *enc(fmt, "assistant\n"), IM_END, *nl]
    assert fmt.decode(fmt.message("user", "é\nx")) == "user\né\nx\n"


@pytest.mark.parametrize("conversation", [
    [system("Be brief."), user("Hi"), assistant("Hello!"), user("How are you?")],
    [user("Hi"), assistant(" Hello! "), user("  spaced  \n")],  # the template's default
    [user("only one")],
])
def test_messages_render_independently(fmt, fmt_plain, conversation):
    for f in (fmt, fmt_plain):
        msgs = list(conversation)
        if msgs[0]["role"] != "system" and f.default_system is not None:
            msgs = [system(f.default_system)] + msgs
        ids = [t for m in msgs for t in f.message(m["role"], m["content"])] + f.gen_prompt
        assert ids == template_ids(f, conversation)


def test_default_system_prompt_detected(fmt, fmt_plain):
    assert fmt.default_system == SMOLLM2_SYSTEM
    assert ChatFormat(chatml_tokenizer("Be nice.")).default_system == "Be nice."
    assert fmt_plain.default_system is None


def test_non_chatml_template_refused():
    tok = chatml_tokenizer(None)
    tok.chat_template = ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                         "{% endfor %}")
    with pytest.raises(ValueError, match="ChatML"):
        ChatFormat(tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match="ChatML"):
        ChatFormat(tok)


# --- the first turn ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [-1, 0, 1, 10_000])
def test_first_turn_pins_the_default_system_prompt(fmt, window):
    rec = new_record()
    plan = plan_turn(fmt, rec, [user("hi")], window, BIG, MAX_TOKENS)
    check_plan(fmt, plan)
    sys_msg = fmt.message("system", SMOLLM2_SYSTEM)
    user_msg = fmt.message("user", "hi")
    assert plan.new_tokens == sys_msg + user_msg + fmt.gen_prompt
    assert plan.prompt == plan.new_tokens == template_ids(fmt, [user("hi")])
    assert plan.write_start == 0
    assert plan.spans == [(0, len(plan.new_tokens))]
    assert plan.boundaries == [0, len(sys_msg), len(sys_msg) + len(user_msg)]
    assert plan.new_messages == [user("hi")]
    assert plan.expected_version == 0
    assert rec.meta["system"] == SMOLLM2_SYSTEM
    assert rec.meta["system_tokens"] == len(sys_msg)


def test_first_turn_leading_system_message_sets_the_system_prompt(fmt):
    msgs = [system("Be brief."), user("hi")]
    plan, rec = turn(fmt, new_record(), msgs, "Ok.")
    sys_msg = fmt.message("system", "Be brief.")
    assert plan.prompt == plan.new_tokens == sys_msg + fmt.message("user", "hi") + fmt.gen_prompt
    assert plan.prompt == template_ids(fmt, msgs)
    assert plan.write_start == 0
    assert plan.new_messages == [user("hi")]
    assert rec.meta["system"] == "Be brief."
    assert rec.meta["system_tokens"] == len(sys_msg)
    assert rec.transcript[:len(sys_msg)] == sys_msg
    assert rec.messages == [system("Be brief."), user("hi"), assistant("Ok.")]


def test_first_turn_empty_system_message_opts_out_of_the_default(fmt):
    # Today's behaviour, documented: an empty leading system message means no system prompt
    # at all (no tokens, nothing pinned), where the template would render an empty system
    # block; the stored messages keep it, so a re-sent history still matches.
    plan, rec = turn(fmt, new_record(), [system(""), user("hi")], "Ok.")
    assert plan.prompt == fmt.message("user", "hi") + fmt.gen_prompt
    assert plan.prompt != template_ids(fmt, [system(""), user("hi")])
    assert rec.meta["system"] == "" and rec.meta["system_tokens"] == 0
    assert rec.messages == [system(""), user("hi"), assistant("Ok.")]
    plan2 = plan_turn(fmt, rec, [system(""), user("hi"), assistant("Ok."), user("q")], 0, BIG,
                      MAX_TOKENS)
    assert plan2.new_messages == [user("q")]
    assert plan2.spans == [(rec.tokens_absorbed, len(full_of(plan2)))]


def test_first_turn_without_any_system_prompt(fmt_plain):
    plan, rec = turn(fmt_plain, new_record(), [user("hi")], "Ok.")
    assert plan.prompt == fmt_plain.message("user", "hi") + fmt_plain.gen_prompt
    assert plan.write_start == 0
    assert rec.meta["system"] is None and rec.meta["system_tokens"] == 0
    assert rec.messages == [user("hi"), assistant("Ok.")]
    # Nothing pinned later either: window -1 is one span from the start.
    plan2 = plan_turn(fmt_plain, rec, [user("again")], -1, BIG, MAX_TOKENS)
    check_plan(fmt_plain, plan2)
    assert plan2.spans == [(0, len(full_of(plan2)))]
    assert plan2.prompt == full_of(plan2)
    plan0 = plan_turn(fmt_plain, rec, [user("again")], 0, BIG, MAX_TOKENS)
    assert plan0.spans == [(rec.tokens_absorbed, len(full_of(plan0)))]
    assert plan0.write_start == 0


# --- the second turn --------------------------------------------------------------------------


@pytest.mark.parametrize("on_im_end, finish", [
    (True, "stop"),  # the reply ended on <|im_end|>
    (False, "length"),  # it hit max_tokens
    (False, "stop"),  # a stop string ended it
])
def test_second_turn_writes_the_last_reply_token_first(fmt, on_im_end, finish):
    plan1, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!", on_im_end=on_im_end,
                       finish=finish)
    generated = reply_tokens(fmt, "Hello there!", on_im_end)
    assert rec1.transcript == plan1.new_tokens + generated
    assert rec1.tokens_absorbed == len(rec1.transcript) - 1
    assert rec1.turns == 1
    assert rec1.messages == [system(SMOLLM2_SYSTEM), user("hi"), assistant("Hello there!")]
    assert rec1.meta["boundaries"] == plan1.boundaries
    log = rec1.meta["turn_log"]
    assert len(log) == 1
    assert {k: log[0][k] for k in ("turn", "spans", "write_start", "prompt_tokens", "generated",
                                   "finish_reason", "window")} == {
        "turn": 1, "spans": [[0, len(plan1.prompt)]], "write_start": 0,
        "prompt_tokens": len(plan1.prompt), "generated": len(generated),
        "finish_reason": finish, "window": -1}

    plan2 = plan_turn(fmt, rec1, [user("and now?")], -1, BIG, MAX_TOKENS)
    check_plan(fmt, plan2)
    nl = enc(fmt, "\n")
    close = nl if on_im_end else [IM_END, *nl]
    u2 = fmt.message("user", "and now?")
    assert plan2.new_tokens == close + u2 + fmt.gen_prompt
    assert plan2.expected_version == 1
    # The write starts at the previous reply's last token, then the new tokens.
    assert plan2.prompt[plan2.write_start] == rec1.transcript[-1]
    assert plan2.prompt[plan2.write_start:] == rec1.transcript[-1:] + plan2.new_tokens
    assert plan2.write_start == rec1.tokens_absorbed  # window -1: the prompt is everything
    assert plan2.prompt == rec1.transcript + plan2.new_tokens
    sys_len = rec1.meta["system_tokens"]
    assert plan2.spans == [(0, sys_len), (sys_len, len(plan2.prompt))]
    # The transcript stays the template's rendering of the conversation.
    assert plan2.prompt == template_ids(fmt, [user("hi"), assistant("Hello there!"),
                                              user("and now?")])
    n1 = len(plan1.new_tokens)
    a1 = n1 - len(fmt.gen_prompt)
    assert plan2.boundaries == [0, sys_len, a1, len(rec1.transcript) + len(close),
                                len(rec1.transcript) + len(close) + len(u2)]

    rec2 = finish_turn(plan2, reply_tokens(fmt, "Fine."), "Fine.", None, "stop", IDENTITY)
    assert rec2.tokens_absorbed == len(rec2.transcript) - 1
    assert rec2.transcript[:len(rec1.transcript)] == rec1.transcript  # append-only
    assert rec2.turns == 2
    assert rec2.messages == rec1.messages + [user("and now?"), assistant("Fine.")]
    assert [e["turn"] for e in rec2.meta["turn_log"]] == [1, 2]
    assert rec2.meta["turn_log"][-1]["write_start"] == plan2.write_start


def test_boundaries_are_message_starts(fmt):
    rec = four_turn_session(fmt)
    starts, pos = [], 0
    for m in rec.messages:
        starts.append(pos)
        pos += len(fmt.message(m["role"], m["content"]))
    assert rec.meta["boundaries"] == starts
    assert pos == len(rec.transcript) + 1  # the last reply's closing newline is not there yet
    assert all(rec.transcript[b] == IM_START for b in starts)


# --- re-sent history --------------------------------------------------------------------------


@pytest.mark.parametrize("with_system", [True, False])
def test_full_history_resend_appends_only_the_new_messages(fmt, with_system):
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    head = [system(SMOLLM2_SYSTEM + "\n")] if with_system else []
    history = head + [user("  hi\n"), assistant("Hello there!  ")]  # whitespace-trimmed match
    plan2, rec2 = turn(fmt, rec1, history + [user("next")], "Ok.")
    assert plan2.new_messages == [user("next")]
    assert plan2.new_tokens == fmt.newline + fmt.message("user", "next") + fmt.gen_prompt
    # And a third turn re-sending both exchanges.
    history += [user("next"), assistant("Ok.")]
    plan3 = plan_turn(fmt, rec2, history + [user("third")], -1, BIG, MAX_TOKENS)
    check_plan(fmt, plan3)
    assert plan3.new_messages == [user("third")]
    assert plan3.new_tokens == fmt.newline + fmt.message("user", "third") + fmt.gen_prompt


def test_full_history_resend_with_an_explicit_system_prompt(fmt):
    _, rec1 = turn(fmt, new_record(), [system("Be brief."), user("hi")], "Ok.")
    for head in ([system("Be brief.")], []):  # with it, or never re-sending it
        plan = plan_turn(fmt, rec1, head + [user("hi"), assistant("Ok."), user("q")], -1, BIG,
                         MAX_TOKENS)
        assert plan.new_messages == [user("q")]


def test_sending_only_the_new_message(fmt):
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    plan = plan_turn(fmt, rec1, [user("next")], -1, BIG, MAX_TOKENS)
    assert plan.new_messages == [user("next")]


def test_history_that_does_not_match_is_taken_as_all_new(fmt):
    # Today's behaviour, documented: a history that differs from the stored one is appended
    # whole, as new messages. A later issue will answer 409 instead.
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    msgs = [user("hi"), assistant("Something else"), user("next")]
    plan = plan_turn(fmt, rec1, msgs, -1, BIG, MAX_TOKENS)
    check_plan(fmt, plan)
    assert plan.new_messages == msgs
    assert plan.new_tokens == (fmt.newline + fmt.message("user", "hi")
                               + fmt.message("assistant", "Something else")
                               + fmt.message("user", "next") + fmt.gen_prompt)
    # So is a history that drops its first exchange (a client-side window).
    _, rec2 = turn(fmt, rec1, [user("q2")], "a2")
    tail = [user("q2"), assistant("a2"), user("q3")]
    assert plan_turn(fmt, rec2, tail, -1, BIG, MAX_TOKENS).new_messages == tail


# --- system-prompt and message rules ----------------------------------------------------------


def test_repeating_the_system_prompt_later_is_dropped(fmt):
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    plan = plan_turn(fmt, rec1, [system(" " + SMOLLM2_SYSTEM + "\n"), user("next")], -1, BIG,
                     MAX_TOKENS)
    assert plan.new_messages == [user("next")]
    assert plan.new_tokens == fmt.newline + fmt.message("user", "next") + fmt.gen_prompt
    _, rec_b = turn(fmt, new_record(), [system("Be brief."), user("hi")], "Ok.")
    plan = plan_turn(fmt, rec_b, [system("Be brief."), user("next")], -1, BIG, MAX_TOKENS)
    assert plan.new_messages == [user("next")]


def test_changing_the_system_prompt_is_refused(fmt):
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    for msgs in ([system("Be verbose."), user("next")],
                 [system("Be verbose."), user("hi"), assistant("Hello there!"), user("next")],
                 [user("next"), system("Be verbose."), user("more")]):
        with pytest.raises(TurnError, match="system prompt") as e:
            plan_turn(fmt, rec1, msgs, -1, BIG, MAX_TOKENS)
        assert (e.value.code, e.value.param, e.value.status) == ("invalid_request", "messages", 400)
    # On the first turn, a system message is only taken first.
    with pytest.raises(TurnError, match="system prompt"):
        plan_turn(fmt, new_record(), [user("a"), system("Be brief."), user("b")], -1, BIG,
                  MAX_TOKENS)


def test_the_last_new_message_must_be_a_user_message(fmt):
    with pytest.raises(TurnError, match="last new message must be a user message"):
        plan_turn(fmt, new_record(), [user("hi"), assistant("Hello")], -1, BIG, MAX_TOKENS)
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    with pytest.raises(TurnError, match="last new message must be a user message"):
        plan_turn(fmt, rec1, [user("next"), assistant("Prefilled")], -1, BIG, MAX_TOKENS)


def test_no_new_message_is_refused(fmt):
    with pytest.raises(TurnError, match="no new message"):
        plan_turn(fmt, new_record(), [system("Be brief.")], -1, BIG, MAX_TOKENS)
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    with pytest.raises(TurnError, match="no new message"):
        plan_turn(fmt, rec1, [system(SMOLLM2_SYSTEM)], -1, BIG, MAX_TOKENS)
    # Re-sending exactly the stored history is refused too (it is taken as all new, and then
    # its last message is the assistant's).
    with pytest.raises(TurnError):
        plan_turn(fmt, rec1, [user("hi"), assistant("Hello there!")], -1, BIG, MAX_TOKENS)


def test_empty_messages_on_a_later_turn_is_a_turn_error(fmt):
    _, rec1 = turn(fmt, new_record(), [user("hi")], "Hello there!")
    with pytest.raises(TurnError, match="no new message"):
        plan_turn(fmt, rec1, [], -1, BIG, MAX_TOKENS)


# --- the window -------------------------------------------------------------------------------


def test_window_zero_is_state_only(fmt):
    rec = four_turn_session(fmt)
    plan = plan_turn(fmt, rec, [user("q")], 0, BIG, MAX_TOKENS)
    check_plan(fmt, plan)
    sys_len = rec.meta["system_tokens"]
    absorbed = rec.tokens_absorbed
    full = full_of(plan)
    assert plan.spans == [(0, sys_len), (absorbed, len(full))]
    assert plan.prompt == fmt.message("system", SMOLLM2_SYSTEM) + full[absorbed:]
    assert plan.prompt == (fmt.message("system", SMOLLM2_SYSTEM) + [rec.transcript[-1]]
                           + fmt.newline + fmt.message("user", "q") + fmt.gen_prompt)
    assert plan.write_start == sys_len


def test_window_minus_one_is_all_that_fits(fmt):
    rec = four_turn_session(fmt)
    plan = plan_turn(fmt, rec, [user("q")], -1, BIG, MAX_TOKENS)
    check_plan(fmt, plan)
    assert plan.prompt == full_of(plan)
    assert plan.write_start == rec.tokens_absorbed


def test_window_starts_at_a_message_boundary_within_the_last_w_tokens(fmt):
    rec = four_turn_session(fmt)
    T, absorbed = rec.transcript, rec.tokens_absorbed
    sys_len = rec.meta["system_tokens"]
    sys_msg = fmt.message("system", SMOLLM2_SYSTEM)
    bounds = rec.meta["boundaries"]
    assert bounds[0] == 0 and bounds[1] == sys_len
    last_reply = bounds[-1]
    prev = None
    for w in range(1, len(T) + 20):
        plan = plan_turn(fmt, rec, [user("q")], w, BIG, MAX_TOKENS)
        check_plan(fmt, plan)
        w0 = window_start(plan)
        within = [b for b in bounds[1:] if len(T) - b <= w]
        assert w0 == (min(within) if within else absorbed)
        assert sys_len <= w0 <= absorbed
        assert plan.prompt == sys_msg + full_of(plan)[w0:]
        assert prev is None or w0 <= prev  # a wider window never starts later
        prev = w0
    # Hand-picked: the last reply is the window from exactly its length on.
    plan = plan_turn(fmt, rec, [user("q")], len(T) - last_reply, BIG, MAX_TOKENS)
    assert window_start(plan) == last_reply
    plan = plan_turn(fmt, rec, [user("q")], len(T) - last_reply - 1, BIG, MAX_TOKENS)
    assert window_start(plan) == absorbed
    # The whole transcript after the system prompt.
    plan = plan_turn(fmt, rec, [user("q")], len(T) - sys_len, BIG, MAX_TOKENS)
    assert plan.spans == [(0, sys_len), (sys_len, len(full_of(plan)))]


def test_window_moves_later_until_the_prompt_fits(fmt):
    rec = four_turn_session(fmt)
    absorbed = rec.tokens_absorbed
    sys_len = rec.meta["system_tokens"]
    sys_msg = fmt.message("system", SMOLLM2_SYSTEM)
    bounds = [b for b in rec.meta["boundaries"] if b >= sys_len]
    full_len = len(rec.transcript) + len(fmt.newline + fmt.message("user", "q") + fmt.gen_prompt)
    for k, b in enumerate(bounds):
        exact = sys_len + full_len - b  # the prompt from boundary b, system pinned
        for window in (-1, 10_000):
            plan = plan_turn(fmt, rec, [user("q")], window, exact + MAX_TOKENS, MAX_TOKENS)
            check_plan(fmt, plan)
            assert window_start(plan) == b
            assert len(plan.prompt) == exact
            assert plan.prompt[:sys_len] == sys_msg
            # One token less: the next boundary (or the first unabsorbed token).
            plan = plan_turn(fmt, rec, [user("q")], window, exact + MAX_TOKENS - 1, MAX_TOKENS)
            check_plan(fmt, plan)
            nxt = bounds[k + 1] if k + 1 < len(bounds) else absorbed
            assert window_start(plan) == nxt
            assert len(plan.prompt) <= exact - 1
    # A window narrower than what fits is kept.
    plan = plan_turn(fmt, rec, [user("q")], len(rec.transcript) - bounds[-1],
                     sys_len + full_len - bounds[1] + MAX_TOKENS, MAX_TOKENS)
    assert window_start(plan) == bounds[-1]


@pytest.mark.parametrize("explicit", [False, True])
def test_the_system_prompt_is_pinned_in_every_prompt(fmt, explicit):
    rec = new_record()
    first = [system("Be brief.")] if explicit else []
    sys_msg = fmt.message("system", "Be brief." if explicit else SMOLLM2_SYSTEM)
    for i in range(4):
        _, rec = turn(fmt, rec, (first if i == 0 else []) + [user(f"question {i} " * 4)],
                      f"answer {i} " * 6)
    tight = len(sys_msg) + 1 + len(fmt.newline + fmt.message("user", "q") + fmt.gen_prompt)
    for window in (-1, 0, 1, 5, 40, 10_000):
        for max_model_len in (BIG, tight + MAX_TOKENS, tight + MAX_TOKENS + 60):
            plan = plan_turn(fmt, rec, [user("q")], window, max_model_len, MAX_TOKENS)
            check_plan(fmt, plan)
            assert plan.prompt[:len(sys_msg)] == sys_msg
            assert plan.spans[0] == (0, len(sys_msg))
            assert len(plan.prompt) <= max_model_len - MAX_TOKENS


# --- the context limit ------------------------------------------------------------------------


def test_unabsorbed_tokens_over_the_budget_are_refused(fmt):
    # First turn: everything is unabsorbed.
    need = len(template_ids(fmt, [user("hello")]))
    plan = plan_turn(fmt, new_record(), [user("hello")], -1, need + MAX_TOKENS, MAX_TOKENS)
    assert len(plan.prompt) == need
    with pytest.raises(TurnError) as e:
        plan_turn(fmt, new_record(), [user("hello")], -1, need + MAX_TOKENS - 1, MAX_TOKENS)
    assert (e.value.code, e.value.status) == ("context_length_exceeded", 400)
    assert str(need) in str(e.value)
    # Later: the pinned system prompt + the last reply token + the new tokens.
    rec = four_turn_session(fmt)
    text = "x" * 300
    need = (rec.meta["system_tokens"] + 1
            + len(fmt.newline + fmt.message("user", text) + fmt.gen_prompt))
    plan = plan_turn(fmt, rec, [user(text)], -1, need + MAX_TOKENS, MAX_TOKENS)
    check_plan(fmt, plan)
    assert len(plan.prompt) == need
    assert window_start(plan) == rec.tokens_absorbed  # nothing else fits
    for window in (-1, 0, 50):
        with pytest.raises(TurnError) as e:
            plan_turn(fmt, rec, [user(text)], window, need + MAX_TOKENS - 1, MAX_TOKENS)
        assert e.value.code == "context_length_exceeded"
        assert str(need) in str(e.value)
    with pytest.raises(TurnError, match="context length") as e:
        plan_turn(fmt, rec, [user("q")], -1, BIG, BIG)  # max_tokens alone fills the context
    assert e.value.code == "context_length_exceeded"


# --- a randomized multi-turn run --------------------------------------------------------------

TURNS = 24
_ALPHABET = "abcdefghij  XYZ.,!?\n\té日ü"


def _text(rng, lo, hi):
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(lo, hi)))


@pytest.mark.parametrize("kind", ["default", "explicit", "none"])
def test_random_multi_turn_layouts(fmt, fmt_plain, kind):
    rng = random.Random(f"turns-{kind}")
    f = fmt_plain if kind == "none" else fmt
    rec = new_record()
    history: list[dict] = []  # what a client would keep (no system prompt)
    sys_msg: list[int] = []
    seen = dict.fromkeys(("resent", "refused", "squeezed", "length"), 0)
    for i in range(TURNS):
        head = [system("Sys " + _text(rng, 1, 30))] if i == 0 and kind == "explicit" else []
        resent = [dict(m, content=" " + m["content"] + "\n") for m in history] \
            if history and rng.random() < 0.4 else []  # a client re-sending the whole history
        seen["resent"] += bool(resent)
        fresh = [user(_text(rng, 1, 20)), assistant(_text(rng, 1, 20))] \
            if rng.random() < 0.2 else []
        fresh.append(user(_text(rng, 0, 60)))
        msgs = head + resent + fresh
        stored = list(rec.messages)
        T = rec.transcript
        expected_new = [] if not T else f.newline if T[-1] == IM_END else f.close
        if i == 0:
            system_text = head[0]["content"] if head else f.default_system
            if system_text:
                sys_msg = f.message("system", system_text)
                expected_new = expected_new + sys_msg
        expected_new = expected_new + [t for m in fresh for t in f.message(m["role"],
                                                                          m["content"])]
        expected_new += f.gen_prompt
        pinned = len(sys_msg) if T else 0
        need = len(expected_new) + (pinned + 1 if T else 0)
        window = rng.choice([-1, 0, rng.randint(1, 400), rng.randint(1, 40)])
        max_model_len = rng.choice([BIG, need + MAX_TOKENS + rng.randint(0, 250),
                                    need + MAX_TOKENS - rng.randint(1, 3)])
        budget = max_model_len - MAX_TOKENS
        if need > budget:
            with pytest.raises(TurnError) as e:
                plan_turn(f, rec, msgs, window, max_model_len, MAX_TOKENS)
            assert e.value.code == "context_length_exceeded"
            seen["refused"] += 1
            max_model_len, budget = BIG, BIG - MAX_TOKENS
        plan = plan_turn(f, rec, msgs, window, max_model_len, MAX_TOKENS)
        check_plan(f, plan)
        full = full_of(plan)
        absorbed = rec.tokens_absorbed
        assert plan.new_messages == fresh
        assert plan.new_tokens == expected_new
        # The transcript is the template's rendering of the conversation.
        assert full == template_ids(f, stored + fresh if stored else msgs)
        assert len(plan.prompt) <= budget
        assert plan.prompt[:len(sys_msg)] == sys_msg
        w0 = window_start(plan)
        assert pinned <= w0 <= absorbed
        assert w0 == absorbed or (w0 in plan.boundaries and full[w0] == IM_START)
        if window == 0:
            assert w0 == absorbed
        if window > 0 and w0 != absorbed:
            assert len(T) - w0 <= window
        seen["squeezed"] += len(full) > budget  # not all of the transcript fits
        # The earliest start allowed: each earlier boundary is outside the window or too long.
        for b in plan.boundaries:
            if pinned <= b < w0:
                assert (window == 0 or (window > 0 and len(T) - b > window)
                        or pinned + len(full) - b > budget)
        on_im_end = rng.random() < 0.7
        seen["length"] += not on_im_end
        reply = _text(rng, 1, 80)
        new_rec = finish_turn(plan, reply_tokens(f, reply, on_im_end), reply, None,
                              "stop" if on_im_end else "length", IDENTITY)
        assert new_rec.transcript[:len(T)] == T
        assert new_rec.tokens_absorbed == len(new_rec.transcript) - 1
        assert new_rec.turns == i + 1
        assert new_rec.messages[len(stored):] == (
            ([system(rec.meta["system"])] if i == 0 and kind != "none" else [])
            + fresh + [assistant(reply)])
        history += fresh + [assistant(reply)]
        rec = dataclasses.replace(new_rec, version=new_rec.version + 1)
    assert len(rec.meta["turn_log"]) == TURNS
    assert all(seen.values()), seen  # each case came up


# --- SessionLocks -----------------------------------------------------------------------------


async def test_session_locks_serialise_one_key():
    locks = SessionLocks()
    events = []
    a_in = asyncio.Event()
    release_a = asyncio.Event()

    async def a():
        async with locks.hold("t", "s", timeout=5):
            events.append("a in")
            a_in.set()
            await release_a.wait()
            events.append("a out")

    async def b():
        async with locks.hold("t", "s", timeout=5):
            events.append("b in")
        events.append("b out")

    ta = asyncio.create_task(a())
    await a_in.wait()
    tb = asyncio.create_task(b())
    await asyncio.sleep(0.02)
    assert events == ["a in"]  # b waits
    assert locks._locks[("t", "s")][1] == 2
    # Other keys (another session, or the same id of another tenant) do not wait.
    async with locks.hold("t", "other", timeout=0.5), locks.hold("t2", "s", timeout=0.5):
        pass
    release_a.set()
    await asyncio.wait_for(asyncio.gather(ta, tb), 5)
    assert events == ["a in", "a out", "b in", "b out"]
    assert locks._locks == {}


async def test_session_locks_waiter_past_its_timeout_is_busy():
    locks = SessionLocks()
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder():
        async with locks.hold("t", "s", timeout=5):
            held.set()
            await release.wait()

    th = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(SessionBusy, match="busy"):
        async with locks.hold("t", "s", timeout=0.05):
            pytest.fail("entered a held session")
    assert locks._locks[("t", "s")][1] == 1
    release.set()
    await asyncio.wait_for(th, 5)
    assert locks._locks == {}
    async with locks.hold("t", "s", timeout=0.05):  # free again
        assert locks._locks[("t", "s")][1] == 1
    assert locks._locks == {}
