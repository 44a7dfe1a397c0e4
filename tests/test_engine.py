"""The vLLM engine with δ-mem (server/engine): real vLLM on the CPU, default model, one shared
engine (tests/engine_host.py), checked against the HF reference runtime.

The shared engine runs float32 with a seeded random adapter whose B_q/B_o are scaled ×10 (a
state then visibly changes the answers) and a 64-token step budget, so any longer prompt is
prefilled in chunks. It runs under vLLM's default compilation, as served
(DELTAMEM_TEST_EAGER=1: the same tests on the eager engine). Two extra engines (an eager zero-B
δ-mem engine with a tiny KV cache, then the compiled plain backbone) are started one after the
other in one test and shut down at its end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

try:  # pytest puts tests/ on sys.path (rootdir without tests/__init__.py)
    from engine_host import MAX_NUM_BATCHED_TOKENS, OneThreadOracle, make_test_adapter
except ImportError:  # tests/ became a package
    from tests.engine_host import MAX_NUM_BATCHED_TOKENS, OneThreadOracle, make_test_adapter

REL_TOL = 1e-4  # final state vs reference, float32
COLOURS = "Name three colours."
PROMPTS = [COLOURS, "What is the capital of France?", "Write a haiku about the sea.",
           "How many legs does a spider have?"]


# --- helpers ----------------------------------------------------------------------------------

def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def rand_state(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def greedy(max_tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def min_margin(step_logits) -> float:
    """Smallest top-1/top-2 logit gap of a greedy HF run (a near-tie explains a flip)."""
    gaps = [float(v[0] - v[1]) for v in (lg.topk(2).values for lg in step_logits)]
    return min(gaps) if gaps else float("inf")


def assert_matches_hf(host, tokenizer, ids, state, write_start, max_tokens, tokens, final):
    ref = host.hf.run(ids, state, write_start=write_start, max_new_tokens=max_tokens,
                      eos_token_ids=(tokenizer.eos_token_id,))
    assert tokens == ref.tokens, (
        f"engine {tokenizer.decode(tokens)!r} != HF {tokenizer.decode(ref.tokens)!r} "
        f"(smallest HF logit margin {min_margin(ref.step_logits):.4f})")
    err = rel_err(final.final_state, ref.final_state)
    assert err <= REL_TOL, f"final state rel err {err:.2e} vs HF"
    return ref


def wait_idle(host, engine=None, timeout: float = 20.0) -> dict:
    """Poll the worker until it holds no request; return its stats."""
    eng = engine or host.engine
    deadline = time.monotonic() + timeout
    while True:
        st = host.run(eng.stats())
        if st.get("active_requests") == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


@pytest.fixture(scope="module")
def host(engine_host):
    return engine_host


@pytest.fixture(scope="module")
def shape(host):
    return host.engine.state_shape


# --- the shared engine against the HF reference -------------------------------------------------

def test_greedy_tokens_and_final_state_match_hf(host, tokenizer, shape):
    # The path under test: every layer's δ-mem projections inside its qkv_proj GEMM.
    assert host.run(host.engine.stats())["fused_projections"] == shape[0]
    ids = chat(tokenizer, COLOURS)
    answers = set()
    for seed in (0, 1, 3):
        state = rand_state(shape, seed)
        tokens, fin = host.generate(ids, greedy(16), state)
        assert fin.finished and fin.finish_reason in ("stop", "length")
        assert fin.prompt_tokens == len(ids) and fin.completion_tokens == len(tokens)
        assert fin.final_state.shape == shape and fin.final_state.dtype == torch.float32
        assert_matches_hf(host, tokenizer, ids, state, 0, 16, tokens, fin)
        answers.add(tuple(tokens))
    # The adapter is strong enough that the state changes the answer.
    assert len(answers) >= 2, "three different states gave the same answer"


def test_a_stop_the_worker_ran_past_hands_back_the_absorbed_state(host, tokenizer, shape):
    """A stop string is found in the API process, after the worker has run the request's
    next step (so does async scheduling on CUDA with a stop token): the worker fed the last
    sampled token too. The final state is still the one after the prompt and every reply
    token but the last (invariant 5), as the HF runtime has it."""
    ids = chat(tokenizer, COLOURS)
    state = rand_state(shape, 5)
    tokens, _ = host.generate(ids, greedy(12), state)
    # A stop string that the reply's text first contains once token k is out.
    k, stop = next((i, t) for i in range(2, len(tokens))
                   if len(t := tokenizer.decode(tokens[i:i + 1]).strip()) >= 2
                   and t not in tokenizer.decode(tokens[:i]))
    before = host.run(host.engine.stats())["states_before_latest"]
    stopped, fin = host.generate(ids, greedy(12, stop=[stop]), state)
    assert fin.finish_reason == "stop" and stopped == tokens[:k + 1]
    assert_matches_hf(host, tokenizer, ids, state, 0, k + 1, stopped, fin)
    # The worker had run past the stop, and the earlier state was the one taken.
    assert host.run(host.engine.stats())["states_before_latest"] == before + 1


def test_a_continuing_request_reuses_the_prefix_cache_exactly(host, tokenizer, shape):
    """Turn continuity in the engine (docs/design.md, invariant 3): a request whose prompt
    extends a finished one (same initial state and write start) reuses its K/V up to the
    last KV block boundary the first one passed, resumes from the state the first one
    reported there, and still matches the HF runtime over the whole prompt. Without that
    state, or under another cache salt (tenant), nothing is reused, and the answer is the
    same."""
    bs = host.engine.llm.vllm_config.cache_config.block_size
    notes = " ".join(f"Day {i}: I watered the {c} plant and read {i + 2} pages."
                     for i, c in enumerate(["fern", "cactus", "palm", "ivy"] * 6))
    ids1 = chat(tokenizer, notes)
    s0, ws = rand_state(shape, 7), 5
    t1, f1 = host.generate(ids1, greedy(8), s0, ws)
    through = len(ids1) + len(t1) - 1  # the last sampled token never went through the model
    assert len(ids1) > bs and f1.block is not None and f1.block[0] == through // bs * bs
    # The snapshot is the state after the prompt's first block_pos tokens.
    bp = f1.block[0]
    with torch.no_grad():
        _, ref_block, _ = host.hf.forward(torch.tensor([ids1[:bp]]), s0.unsqueeze(0),
                                          (torch.arange(bp) >= ws).unsqueeze(0))
    assert rel_err(f1.block[1], ref_block[0]) <= REL_TOL
    more = tokenizer.encode("\n<|im_start|>user\nWhich plant on day 3?<|im_end|>\n"
                            "<|im_start|>assistant\n", add_special_tokens=False)
    ids2 = ids1 + t1[:-1] + more
    known = {bp: f1.block[1], through: f1.final_state}
    t2, f2 = host.generate(ids2, greedy(8), s0, ws, known=known)
    assert f2.cached_tokens == bp > 0
    assert_matches_hf(host, tokenizer, ids2, s0, ws, 8, t2, f2)
    for kw in ({}, {"known": known, "cache_salt": "another-tenant"}):
        t3, f3 = host.generate(ids2, greedy(8), s0, ws, **kw)
        assert f3.cached_tokens == 0, kw
        assert t3 == t2 and rel_err(f3.final_state, f2.final_state) <= REL_TOL


def test_a_hit_inside_the_read_only_prefix_needs_no_known_state(host, tokenizer, shape):
    """Positions up to the write start hold the initial state: a hit may resume anywhere
    there, block-aligned, without a known state."""
    bs = host.engine.llm.vllm_config.cache_config.block_size
    ids = chat(tokenizer, " ".join(f"Fact {i}: box {i} is {['red', 'blue'][i % 2]}."
                                   for i in range(40)) + " Which colour is box 7?")
    s0 = rand_state(shape, 8)
    ws = len(ids) - 3
    assert ws > bs
    t1, f1 = host.generate(ids, greedy(6), s0, ws)
    t2, f2 = host.generate(ids, greedy(6), s0, ws)
    assert f2.cached_tokens == ws // bs * bs
    assert t2 == t1 and rel_err(f2.final_state, f1.final_state) <= REL_TOL
    assert_matches_hf(host, tokenizer, ids, s0, ws, 6, t2, f2)


def test_batched_requests_match_each_alone(host, tokenizer, shape):
    reqs = [(chat(tokenizer, PROMPTS[i % 4]), rand_state(shape, 100 + i), ws)
            for i, ws in enumerate([0, 5, 0, 12, 0, 3, 0, 40])]
    sp = greedy(12)
    alone = [host.generate(ids, sp, s, ws) for ids, s, ws in reqs]

    async def together():
        return await asyncio.gather(*[host.collect(ids, sp, s, ws) for ids, s, ws in reqs])

    batched = host.run(together())
    # They really ran together: every request streamed before any had finished.
    assert max(r[2][0] for r in batched) < min(r[2][1] for r in batched)
    for i, ((t_a, f_a), (t_b, f_b, _)) in enumerate(zip(alone, batched, strict=True)):
        assert t_b == t_a, f"request {i}: batched tokens differ from alone"
        err = rel_err(f_b.final_state, f_a.final_state)
        assert err <= REL_TOL, f"request {i}: batched state rel err {err:.2e}"
    assert len({tuple(t) for t, _ in alone}) > 1


def test_long_prompt_chunked_prefill_matches_hf(host, tokenizer, shape):
    sc = host.engine.llm.vllm_config.scheduler_config
    assert sc.max_num_batched_tokens == MAX_NUM_BATCHED_TOKENS and sc.enable_chunked_prefill
    colours, herbs = ["red", "blue", "green", "white"], ["basil", "mint", "thyme", "sage"]
    notes = " ".join(f"Note {i}: the {colours[i % 4]} pot on shelf {i % 7} holds {i * 3} "
                     f"seeds of {herbs[(i // 4) % 4]}." for i in range(32))
    ids = chat(tokenizer, notes + " Which pot holds basil?")
    assert len(ids) > 8 * MAX_NUM_BATCHED_TOKENS  # at least 9 prefill chunks
    short = chat(tokenizer, PROMPTS[1])
    s_long, s_short = rand_state(shape, 7, 0.5), rand_state(shape, 8)

    async def both():  # a short request decodes while the long one is prefilled
        return await asyncio.gather(host.collect(ids, greedy(6), s_long, 3),
                                    host.collect(short, greedy(8), s_short))

    (t_long, f_long, _), (t_short, f_short, _) = host.run(both())
    assert_matches_hf(host, tokenizer, ids, s_long, 3, 6, t_long, f_long)
    assert_matches_hf(host, tokenizer, short, s_short, 0, 8, t_short, f_short)


def test_write_start(host, tokenizer, shape):
    ids = chat(tokenizer, COLOURS)
    T = len(ids)
    state = rand_state(shape, 3)

    # Inside the prompt: tokens before it are read, not written; the state is HF's.
    tokens, fin = host.generate(ids, greedy(8), state, write_start=10)
    assert_matches_hf(host, tokenizer, ids, state, 10, 8, tokens, fin)
    _, fin0 = host.generate(ids, greedy(8), state, write_start=0)
    assert rel_err(fin.final_state, fin0.final_state) > 1e-2  # the first 10 tokens wrote nothing

    # Beyond everything: nothing is written, the state comes back as it went in; but every
    # token read it, since another state gives another answer (both equal HF's).
    far = T + 100
    tokens, fin = host.generate(ids, greedy(8), state, write_start=far)
    assert torch.equal(fin.final_state, state)
    assert_matches_hf(host, tokenizer, ids, state, far, 8, tokens, fin)
    other = rand_state(shape, 0)
    tokens_other, fin_other = host.generate(ids, greedy(8), other, write_start=far)
    assert torch.equal(fin_other.final_state, other)
    assert tokens_other != tokens

    # Inside the generation: the fed-back generated tokens at positions >= T + 3 are written
    # (the last one is never fed back).
    tokens, fin = host.generate(ids, greedy(8, ignore_eos=True), state, write_start=T + 3)
    assert len(tokens) == 8 and not torch.equal(fin.final_state, state)
    ref = host.hf.run(ids, state, write_start=T + 3, max_new_tokens=8, eos_token_ids=())
    assert tokens == ref.tokens
    assert rel_err(fin.final_state, ref.final_state) <= REL_TOL


def test_bad_initial_state_refused(host, tokenizer, shape):
    from server.engine.facade import EngineError

    bad = torch.zeros(shape[0] - 1, *shape[1:])
    with pytest.raises(EngineError, match="shape"):
        host.generate(chat(tokenizer, COLOURS), greedy(2), bad)


def test_abort_mid_stream_leaves_nothing_behind(host, tokenizer, shape):
    eng = host.engine
    ids = chat(tokenizer, PROMPTS[2])
    sp = greedy(1900, ignore_eos=True)  # ~30 s or more to finish: an abort shows in time
    before = wait_idle(host)

    async def break_early():
        n = 0
        async for chunk in eng.generate(ids, sp, rand_state(shape, 5)):
            n += len(chunk.token_ids)
            if n >= 3:
                break  # the generator is dropped, its finally aborts the request
        return n

    async def cancel_consumer():  # what a server sees when a client disconnects
        started = asyncio.Event()

        async def consume():
            async for _ in eng.generate(ids, sp, rand_state(shape, 6)):
                started.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 60)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    for case in (break_early, cancel_consumer):
        host.run(case())
        t0 = time.monotonic()
        st = wait_idle(host, timeout=10)
        assert st["active_requests"] == 0, f"{case.__name__}: request not aborted: {st}"
        # Its state was dropped, not parked in the outbox of finished states.
        assert st["outbox"] == before["outbox"], f"{case.__name__}: {st}"
        while eng.llm.output_processor.has_unfinished_requests():
            assert time.monotonic() - t0 < 10, f"{case.__name__}: request not aborted"
            time.sleep(0.1)
    # The engine still serves, and correctly.
    tokens, fin = host.generate(chat(tokenizer, COLOURS), greedy(4), rand_state(shape, 0))
    assert_matches_hf(host, tokenizer, chat(tokenizer, COLOURS), rand_state(shape, 0), 0, 4,
                      tokens, fin)
    assert wait_idle(host)["outbox"] == before["outbox"]
    # A caller with no use for the state (a sessionless request) gets the same answer and
    # leaves no state behind to fetch.
    same, fin = host.generate(chat(tokenizer, COLOURS), greedy(4), rand_state(shape, 0),
                              keep_state=False)
    assert same == tokens and fin.final_state is None and fin.block is None
    assert wait_idle(host)["outbox"] == before["outbox"]


# --- refusals at start (no engine is started) ---------------------------------------------------

@pytest.fixture
def no_vllm_start(monkeypatch):
    from vllm.v1.engine.async_llm import AsyncLLM

    def refuse(*a, **k):
        raise AssertionError("a vLLM engine was started")

    monkeypatch.setattr(AsyncLLM, "from_engine_args", refuse)


def test_speculative_decoding_refused(host, no_vllm_start):
    from server.engine.facade import DeltaMemEngine, EngineError

    cfg = host.config(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 3})
    with pytest.raises(EngineError, match="speculative decoding"):
        DeltaMemEngine.start(cfg)


def test_adapter_of_another_backbone_refused(host, tmp_path, no_vllm_start):
    from server.engine.facade import DeltaMemEngine, EngineError

    other = tmp_path / "other-backbone"
    shutil.copytree(host.adapter_dir, other)
    doc = json.loads((other / "adapter_config.json").read_text())
    doc["backbone"] = {"name": "SomeOtherModel-1B", "fingerprint": "sha256:0123456789abcdef"}
    (other / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="SomeOtherModel-1B.*refusing"):
        DeltaMemEngine.start(host.config(adapter_dir=other))
    with pytest.raises(EngineError, match="no adapter"):
        DeltaMemEngine.start(host.config(adapter_dir=None))


# --- B_q = B_o = 0 equals plain vLLM; preemption with recompute ---------------------------------

def test_zero_b_equals_plain_vllm_and_recompute_resets_state(host, tokenizer, shape, model_dir,
                                                             tmp_path):
    """Two extra engines, one at a time. A δ-mem engine with B_q = B_o = 0 (the state is still
    written, but changes nothing) must give plain vLLM's tokens. Its KV cache holds 3 blocks of
    128 tokens, so two requests of 116 + 24 tokens cannot both grow past 128: one is preempted
    and later recomputed from position 0, and must restart from its initial state: the final
    states equal the HF reference's teacher-forced run over prompt + generated tokens."""
    from deltamem.adapter import load_adapter
    from deltamem.hf_runtime import DeltaMemHF

    zero_dir = tmp_path / "zero-b"
    make_test_adapter(model_dir, zero_dir, b_scale=0.0)
    small = {"max_model_len": 384, "max_num_seqs": 4, "max_num_batched_tokens": 384,
             "kv_cache_gib": 1, "enforce_eager": True,
             # Extra engines keep out of the process-wide Prometheus registry.
             "extra_engine_args": {"num_gpu_blocks_override": 4, "disable_log_stats": True}}
    chats = [chat(tokenizer, p) for p in PROMPTS[:3]]
    g = torch.Generator().manual_seed(11)
    pre_prompts = [torch.randint(1000, 40000, (116,), generator=g).tolist() for _ in range(2)]
    pre_states = [rand_state(shape, 20 + i) for i in range(2)]
    write_start = 10

    eng = host.start_engine(host.config(adapter_dir=zero_dir, **small))
    try:
        zero_b = [host.generate(ids, greedy(24), rand_state(shape, 30 + i), engine=eng)
                  for i, ids in enumerate(chats)]
        before = host.run(eng.stats())["recomputes"]

        async def crowd():
            return await asyncio.gather(*[
                host.collect(p, greedy(24, ignore_eos=True), s, write_start, engine=eng)
                for p, s in zip(pre_prompts, pre_states, strict=True)])

        crowded = host.run(crowd(), 300)
        stats = wait_idle(host, eng)
    finally:
        host.stop_engine(eng)
    assert stats["recomputes"] > before, f"no request was preempted and recomputed: {stats}"
    assert stats["active_requests"] == 0 and stats["outbox"] == 0

    hf0 = OneThreadOracle(DeltaMemHF.from_pretrained(model_dir, adapter=load_adapter(zero_dir)))
    for i, (p, s, (toks, fin, _)) in enumerate(zip(pre_prompts, pre_states, crowded,
                                                   strict=True)):
        assert len(toks) == 24
        seq = p + toks[:-1]  # the last sampled token is never fed back
        mask = (torch.arange(len(seq)) >= write_start).unsqueeze(0)
        with torch.no_grad():
            _, ref, _ = hf0.forward(torch.tensor([seq]), s.unsqueeze(0), mask)
        err = rel_err(fin.final_state, ref[0])
        assert err <= REL_TOL, f"request {i}: state after recompute rel err {err:.2e}"
    del hf0

    # Plain vLLM compiled, as its defaults run it; the zero-B engine above ran eager.
    plain = host.start_engine(host.config(memory=False, adapter_dir=None,
                                          **{**small, "enforce_eager": False}))
    try:
        base = [host.generate(ids, greedy(24), engine=plain) for ids in chats]
    finally:
        host.stop_engine(plain)
    for ids, (t_zero, _), (t_plain, f_plain) in zip(chats, zero_b, base, strict=True):
        assert f_plain.final_state is None
        assert t_zero == t_plain, (f"zero-B δ-mem {tokenizer.decode(t_zero)!r} != plain "
                                   f"{tokenizer.decode(t_plain)!r} for {tokenizer.decode(ids)!r}")


def _message_ids(ingest, start: int, end: int) -> list[int]:
    """Per token of prompt[start:end], its message's number in `ingest` (-1: none)."""
    out = [-1] * (end - start)
    for j, (a, b) in enumerate(ingest.messages):
        out[a - start:b - start] = [j] * (b - a)
    return out


def test_ssw_engine_serves_a_session_as_the_reference(host, tokenizer, model_dir, tmp_path):
    """An SSW adapter served (one more engine, eager), two turns of a session planned as the
    server plans them: the engine's states and answers are the HF runtime's under the
    reference's session semantics (a turn's new tokens one forward that reads the state from
    before it and writes its messages' means at its end; each reply token a one-token
    message). Turn 2 resumes at the block boundary turn 1 snapshotted in its reply; the same
    turn with its cache kept apart (another salt) recomputes the epoch's stream, two ingests
    and a reply in 64-token steps, to the same answer and state."""
    import dataclasses

    from transformers import DynamicCache

    from deltamem.adapter import load_adapter, save_adapter
    from deltamem.hf_runtime import DeltaMemHF
    from memory_store import SessionRecord, StateIdentity
    from server.sessions import ChatFormat, finish_turn, plan_turn

    adapter = make_test_adapter(model_dir, tmp_path / "tsw")
    adapter.module.cfg.write_granularity = "message_mean"
    ssw_dir = save_adapter(adapter, tmp_path / "ssw")
    fmt, ident = ChatFormat(tokenizer), StateIdentity("backbone", "ssw", 30, 1, 8)
    user = "My cat is called Tom and I live in Oslo, near the harbour."
    eng = host.start_engine(host.config(adapter_dir=ssw_dir, enforce_eager=True,
                                        extra_engine_args={"disable_log_stats": True}))
    try:
        plan1 = plan_turn(fmt, SessionRecord("s", "t", ident),
                          [{"role": "user", "content": user}], -1, 2048, 100)
        toks1, fin1 = host.generate(plan1.prompt, greedy(100, ignore_eos=True), None,
                                    plan1.write_start, engine=eng, known=plan1.known,
                                    ingests=plan1.ingests)
        rec1 = dataclasses.replace(finish_turn(plan1, toks1, "", fin1.final_state, "length",
                                               ident, fin1.block), version=1)
        plan2 = plan_turn(fmt, rec1, [{"role": "user", "content": "What is my cat called?"}],
                          -1, 2048, 16)
        kw = {"known": plan2.known, "ingests": plan2.ingests, "engine": eng}
        sp = greedy(16, ignore_eos=True)
        toks2, fin2 = host.generate(plan2.prompt, sp, plan2.initial_state, plan2.write_start,
                                    **kw)
        toks2b, fin2b = host.generate(plan2.prompt, sp, plan2.initial_state,
                                      plan2.write_start, cache_salt="apart", **kw)
    finally:
        host.stop_engine(eng)
    assert len(plan2.ingests) == 2 and plan2.write_start == 0
    assert plan2.ingests[1].start == len(rec1.transcript) + 1  # after the closing <|im_end|>
    blk = fin1.block[0]
    assert len(plan1.prompt) < blk < len(rec1.transcript)  # a reply token: a safe point
    assert blk in plan2.known and fin2.cached_tokens == blk and not fin2b.cached_tokens

    hf = OneThreadOracle(DeltaMemHF.from_pretrained(model_dir, adapter=load_adapter(ssw_dir)))
    cache = DynamicCache()

    def fwd(ids, state, mids):
        with torch.no_grad():
            logits, state, _ = hf.forward(torch.tensor([ids]), state, None,
                                          message_ids=torch.tensor([mids]),
                                          past_key_values=cache)
        return logits[0, -1], state

    g1, g2 = plan2.ingests
    logits, state = fwd(plan1.prompt, None, _message_ids(g1, 0, g1.end))
    for n, tok in enumerate(toks1):
        if n < 8:  # the engine's greedy reply, teacher-forced here
            assert tok == int(logits.argmax())
        if n == len(toks1) - 1:  # turn 1 does not write its last token, turn 2 does
            assert rel_err(fin1.final_state, state[0]) <= REL_TOL
        logits, state = fwd([tok], state, [0])
    # A reply the length limit cut (this one) is closed by <|im_end|>, written as a reply token.
    for tok in plan2.prompt[len(rec1.transcript):g2.start]:
        logits, state = fwd([tok], state, [0])
    ids2 = plan2.prompt[g2.start:]
    logits, state = fwd(ids2, state, _message_ids(g2, g2.start, g2.end))
    ref = []
    for _ in range(16):
        ref.append(int(logits.argmax()))
        if len(ref) == 16:
            break
        logits, state = fwd([ref[-1]], state, [0])
    assert toks2 == ref, (tokenizer.decode(toks2), tokenizer.decode(ref))
    assert toks2b == toks2
    for fin in (fin2, fin2b):
        assert rel_err(fin.final_state, state[0]) <= REL_TOL


# --- the worker runtime's bookkeeping, without vLLM ----------------------------------------------

# The runtime's two scan paths: the numba kernel (the CPU engine's) and the torch varlen scan
# on fixed buffers (an accelerator's, capturable in a CUDA graph), each held to the reference.
SCAN_PATHS = pytest.mark.parametrize("scan", ["kernel", "torch"])


def _runtime(layers: int = 2, d: int = 32, seed: int = 0, heads: int = 1,
             granularity: str = "token", scan: str = "kernel", max_requests: int = 32):
    """A worker runtime on a small random adapter (no backbone)."""
    from deltamem.layer import DeltaMem, DeltaMemConfig
    from server.engine.model import DeltaMemRuntime

    torch.manual_seed(seed)
    cfg = DeltaMemConfig(hidden_size=d, q_out_size=d, num_layers=layers, num_state_heads=heads,
                         write_granularity=granularity)
    mod = DeltaMem(cfg)
    for i in cfg.layers:
        mod.layer(i).reset_parameters()
        torch.nn.init.normal_(mod.layer(i).w_beta.weight, std=0.1)
    rt = DeltaMemRuntime(mod, torch.device("cpu"), scan=scan, max_requests=max_requests)
    # What the engine installs on its attention modules, on stand-ins.
    rt.test_layers = {}
    for i in rt.layer_ids:
        rt.test_layers[i] = torch.nn.Module()
        rt.install(rt.test_layers[i], i)
    return rt


def _corrections(rt, layer, x):
    """(Δq, Δo) of one layer, as the engine's attention forward computes them (eager)."""
    from server.engine.model import memory_corrections

    return memory_corrections(rt.test_layers[layer], x)


def _request(state, write_start, key, **more):
    from server.engine.model import EXTRA_ARGS_KEY, encode_state

    extra = {EXTRA_ARGS_KEY: {"state": encode_state(state), "write_start": write_start,
                              "key": key, **more}}
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


def _step(rt, runner_requests, batch):
    """One forward: batch = [(req_id, x (n, d) of its tokens this step, start position)]."""
    rt.plan_step([b[0] for b in batch], [len(b[1]) for b in batch], [b[2] for b in batch],
                 runner_requests)
    x = torch.cat([b[1] for b in batch])
    rt.begin_forward(x.shape[0])
    try:
        for layer in rt.layer_ids:  # same x per layer: only the bookkeeping is under test
            _corrections(rt, layer, x)
    finally:
        rt.end_forward()


def _reference_state(rt, x, s0, write_start):
    out = []
    mask = (torch.arange(x.shape[0]) >= write_start).unsqueeze(0)
    for slot, layer in enumerate(rt.layer_ids):
        mem = rt.module.layer(layer)
        _, fin = mem.scan_tokens(mem.project(x.unsqueeze(0)), s0[slot].unsqueeze(0), mask)
        out.append(fin[0])
    return torch.stack(out)


@SCAN_PATHS
def test_runtime_chunks_recompute_and_gaps(scan):
    from server.engine.model import decode_state

    rt = _runtime(scan=scan)
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(10, d, generator=g), torch.randn(7, d, generator=g)
    s_a, s_b = torch.randn(rt.state_shape, generator=g), torch.randn(rt.state_shape,
                                                                     generator=g)
    reqs = {"a": _request(s_a, 2, "A"), "b": _request(s_b, 0, "B")}
    want_a, want_b = _reference_state(rt, x_a, s_a, 2), _reference_state(rt, x_b, s_b, 0)

    # Chunked prefill, interleaved with another request, batch order changing between steps.
    _step(rt, reqs, [("a", x_a[:4], 0), ("b", x_b[:3], 0)])
    _step(rt, reqs, [("b", x_b[3:], 3), ("a", x_a[4:7], 4)])
    _step(rt, reqs, [("a", x_a[7:], 7)])
    assert rel_err(rt.requests["a"].state, want_a) < 1e-5
    assert rel_err(rt.requests["b"].state, want_b) < 1e-5

    # Preempted and recomputed from position 0: restarts from the initial state, not from
    # the state that already holds these tokens' writes.
    _step(rt, reqs, [("a", x_a[:5], 0)])
    assert rt.recomputes == 1
    _step(rt, reqs, [("a", x_a[5:], 5)])
    assert rel_err(rt.requests["a"].state, want_a) < 1e-5

    # A step that skips or repeats absorbed tokens (e.g. a prefix-cache hit) is a bug: raise.
    for bad_start in (12, 4):
        with pytest.raises(RuntimeError, match="absorbed"):
            _step(rt, reqs, [("a", x_a[:1], bad_start)])

    # Finished requests: states handed out by the caller's key, and forgotten.
    assert rt.take_states(["B"])["B"]["shape"] == list(rt.state_shape)  # live: marked taken
    rt.on_request_removed("b")  # already taken: nothing goes to the outbox
    rt.on_request_removed("a")
    assert set(rt.requests) == set() and list(rt.outbox) == ["A"]
    got = rt.take_states(["A", "B", "nobody"])
    assert set(got) == {"A"} and not rt.outbox
    assert rel_err(decode_state(got["A"]["state"], rt.state_shape), want_a) < 1e-5


@SCAN_PATHS
def test_runtime_hands_back_the_state_where_the_reply_stopped(scan):
    """The worker ran past a stop (async scheduling's step in flight, a stop string seen late
    in the API process): the state at the absorbed position comes back, with the KV block
    snapshot of that moment, from the states kept before the last HISTORY one-token steps; an
    older one is reported missing, never replaced by a later state."""
    from server.engine.model import HISTORY, decode_state

    rt = _runtime(heads=4, scan=scan)
    d, bs = rt.module.cfg.hidden_size, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, d, generator=g)
    s0 = torch.randn(rt.state_shape, generator=g)
    reqs = {"a": _request(s0, 1, "A")}
    _step_at(rt, reqs, "a", x[:6], 0, bs)  # prefill: no history
    assert rt.requests["a"].history == []
    for p in range(6, 16):  # decode, one token a step
        _step_at(rt, reqs, "a", x[p:p + 1], p, bs)
    rm = rt.requests["a"]
    assert [h[0] for h in rm.history] == list(range(16 - HISTORY, 16))
    rt.on_request_removed("a")
    kept = rt.outbox["A"]
    for want in (16, 15, 16 - HISTORY):
        rt.outbox["A"] = kept  # taking forgets it: put it back for the next position
        got = rt.take_states(["A"], {"A": want})["A"]
        assert got["pos"] == want
        ref = _reference_state(rt, x[:want], s0, 1)
        assert rel_err(decode_state(got["state"], rt.state_shape), ref) < 1e-5
        blk = (want // bs) * bs  # the last block boundary passed by then
        assert got["block"][0] == blk
        ref_blk = _reference_state(rt, x[:blk], s0, 1)
        assert rel_err(decode_state(got["block"][1], rt.state_shape), ref_blk) < 1e-5
    rt.outbox["A"] = kept
    assert rt.take_states(["A"], {"A": 16 - HISTORY - 1})["A"] == {
        "missing": 16 - HISTORY - 1, "pos": 16}
    # A longer step (a recompute's prefill) forgets the kept states: they are of another run.
    reqs = {"b": _request(s0, 0, "B")}
    _step_at(rt, reqs, "b", x[:1], 0, bs)
    assert [h[0] for h in rt.requests["b"].history] == [0]
    _step_at(rt, reqs, "b", x[1:4], 1, bs)
    assert rt.requests["b"].history == []


@SCAN_PATHS
@pytest.mark.parametrize("heads", [1, 4], ids=["tsw", "msw"])
def test_runtime_corrections_match_the_layer_math(heads, scan):
    """The worker's fused projections and read-out (one matmul each) against DeltaMemLayer's
    project / scan / delta_q / delta_o, for one head and for MSW's four (float32)."""
    rt = _runtime(heads=heads, scan=scan)
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(2)
    x, s0 = torch.randn(9, d, generator=g), torch.randn(rt.state_shape, generator=g)
    rt.plan_step(["a"], [9], [0], {"a": _request(s0, 3, "A")})
    rt.begin_forward(9)
    try:
        got = [_corrections(rt, layer, x) for layer in rt.layer_ids]
    finally:
        rt.end_forward()
    mask = (torch.arange(9) >= 3).unsqueeze(0)
    for slot, layer in enumerate(rt.layer_ids):
        mem = rt.module.layer(layer)
        reads, fin = mem.scan_tokens(mem.project(x.unsqueeze(0)), s0[slot].unsqueeze(0), mask)
        assert rel_err(got[slot][0], mem.delta_q(reads)[0]) < 1e-5
        assert rel_err(got[slot][1], mem.delta_o(reads)[0]) < 1e-5
        assert rel_err(rt.requests["a"].state[slot], fin[0]) < 1e-5


@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"],
                         ids=["eager", "compiled-aot-eager", "compiled-inductor"])
@SCAN_PATHS
def test_scan_op_matches_the_reference_on_varlen_batches(backend, scan):
    """The engine's memory path (projections, the `deltamem::scan` op, read-out) on random
    varlen steps (decode and prefill chunks mixed, random write starts and initial states,
    padded rows as a CUDA-graph batch has), eager and under torch.compile with dynamic token
    counts (one compile serves every step), against the per-token reference scan on each
    request alone. Float32; tolerance 1e-5 relative."""
    from deltamem.scan import delta_rule_scan_reference
    from server.engine.model import memory_corrections

    rt = _runtime(heads=4, seed=5, scan=scan)
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(6)
    fn = memory_corrections
    if backend is not None:
        torch._dynamo.reset()
        fn = torch.compile(memory_corrections, backend=backend, dynamic=True, fullgraph=True)
    for step, lens in enumerate(([1, 7, 1, 13, 2], [3], [1, 1, 1, 1], [9, 1, 30])):
        ids = [f"s{step}r{i}" for i in range(len(lens))]
        init = [torch.randn(rt.state_shape, generator=g) for _ in lens]
        ws = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in lens]
        reqs = {rid: _request(s0, w, rid) for rid, s0, w in zip(ids, init, ws, strict=True)}
        xs = [torch.randn(n, d, generator=g) for n in lens]
        pad = 3 * (step % 2)
        x = torch.cat([*xs, torch.randn(pad, d, generator=g)])
        rt.plan_step(ids, lens, [0] * len(lens), reqs)
        rt.begin_forward(x.shape[0])
        try:
            got = {i: fn(rt.test_layers[i], x) for i in rt.layer_ids}
        finally:
            rt.end_forward()
        for slot, layer in enumerate(rt.layer_ids):
            mem = rt.module.layer(layer)
            dq, do = got[layer]
            assert dq.shape == do.shape == (x.shape[0], d)
            if pad:
                assert not dq[-pad:].any() and not do[-pad:].any()
            at = 0
            for b, (rid, xb) in enumerate(zip(ids, xs, strict=True)):
                p_ = mem.project(xb.unsqueeze(0))
                mask = (torch.arange(len(xb)) >= ws[b]).unsqueeze(0)
                reads, fin = delta_rule_scan_reference(p_.q, p_.k, p_.v, p_.beta,
                                                       init[b][slot].unsqueeze(0), mask)
                assert rel_err(dq[at:at + len(xb)], mem.delta_q(reads)[0]) < 1e-5
                assert rel_err(do[at:at + len(xb)], mem.delta_o(reads)[0]) < 1e-5
                assert rel_err(rt.requests[rid].state[slot], fin[0]) < 1e-5
                at += len(xb)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("lens", [(1, 10), (1, 2)], ids=["gemm-read-out", "kernel-read-out"])
def test_bf16_memory_path_is_the_float32_one_within_rounding(compiled, lens):
    """A bfloat16 engine packs the projections and read-out in bfloat16 (on the CPU through
    vLLM's prepacked GEMM); the state stays float32. Against the float32 path on the same
    step: Δq, Δo and the new states agree to bfloat16 rounding (2% relative). A step of
    more than `READ_OUT_IN_KERNEL` tokens reads out through the GEMM, a shorter one inside
    the CPU kernel."""
    from server.engine.model import READ_OUT_IN_KERNEL, memory_corrections

    n = sum(lens)
    assert (n > READ_OUT_IN_KERNEL) == (lens == (1, 10))

    g = torch.Generator().manual_seed(8)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        rt = _runtime(heads=4, seed=9)
        for i in rt.layer_ids:
            rt.install(rt.test_layers[i], i, dtype=dtype)
        fn = memory_corrections
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(memory_corrections, dynamic=True, fullgraph=True)
        g.manual_seed(8)
        x = torch.randn(n, rt.module.cfg.hidden_size, generator=g)
        s0 = torch.randn(rt.state_shape, generator=g)
        rt.plan_step(["a", "b"], list(lens), [0, 0], {"a": _request(s0, 0, "A"),
                                                    "b": _request(s0, 1, "B")})
        rt.begin_forward(n)
        try:
            got = [fn(rt.test_layers[i], x.to(dtype)) for i in rt.layer_ids]
        finally:
            rt.end_forward()
        out[dtype] = (got, rt.requests["b"].state)
    (f32, st32), (b16, st16) = out[torch.float32], out[torch.bfloat16]
    assert st16.dtype == torch.float32 and rel_err(st16, st32) < 2e-2
    for (dq32, do32), (dq16, do16) in zip(f32, b16, strict=True):
        assert dq16.dtype == torch.bfloat16
        assert rel_err(dq16, dq32) < 2e-2 and rel_err(do16, do32) < 2e-2


def test_runtime_state_math_is_float32_under_a_bf16_default_dtype():
    # vLLM loads a bf16 model with torch's default dtype set to bf16; the runtime is built and
    # warmed up inside that (a bf16 `make serve` once crashed in the warm-up step).
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rt = _runtime()
        for m in rt.test_layers.values():
            assert m.deltamem_in.weight.dtype == m.deltamem_in_bias.dtype == torch.float32
        rt.begin_forward(3)
        dq, _ = _corrections(rt, rt.layer_ids[0], torch.randn(3, rt.module.cfg.hidden_size,
                                                              dtype=torch.bfloat16))
        rt.end_forward()
        assert dq.dtype == torch.float32 and torch.isfinite(dq).all()
    finally:
        torch.set_default_dtype(prev)


@SCAN_PATHS
def test_runtime_resumes_where_it_knows_the_state_and_snapshots(scan):
    """A request may start at a known position (a capped prefix-cache hit) or anywhere up to
    its write start; the scan copies out the states at the asked positions and at the last
    KV block boundary it passes, and hands them back with the final state."""
    from server.engine.model import EXTRA_ARGS_KEY, decode_state, encode_state

    rt = _runtime(scan=scan)
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(3)
    x, s0 = torch.randn(23, d, generator=g), torch.randn(rt.state_shape, generator=g)
    ws, bs = 3, 8
    ref = [_reference_state(rt, x[:p], s0, ws) for p in range(24)]
    extra = {"state": encode_state(s0), "write_start": ws, "key": "A",
             "known": {"16": encode_state(ref[16])}, "snap_at": [5, 11]}
    reqs = {"a": SimpleNamespace(sampling_params=SimpleNamespace(
        extra_args={EXTRA_ARGS_KEY: extra}))}
    rt.plan_step(["a"], [7], [16], reqs, block_size=bs)  # a hit capped to known 16
    rt.begin_forward(7)
    rt.end_forward()
    assert rt.requests["a"].pos == 23
    # Started over, in chunks: from 2 (<= write start, the initial state), then on.
    for start, n in ((2, 7), (9, 14)):
        _step_at(rt, reqs, "a", x[start:start + n], start, bs)
    rm = rt.requests["a"]
    assert rel_err(rm.state, ref[23]) < 1e-5
    assert sorted(rm.snapshots) == [5, 11]
    for p in (5, 11):
        assert rel_err(rm.snapshots[p], ref[p]) < 1e-5
    assert rm.block[0] == 16 and rel_err(rm.block[1], ref[16]) < 1e-5
    rt.on_request_removed("a")
    got = rt.take_states(["A"])["A"]
    assert rel_err(decode_state(got["state"], rt.state_shape), ref[23]) < 1e-5
    assert set(got["snapshots"]) == {"5", "11"} and got["block"][0] == 16
    assert rel_err(decode_state(got["block"][1], rt.state_shape), ref[16]) < 1e-5


def test_scan_paths_agree_on_a_served_schedule():
    """Both scan paths on one random schedule of a served batch: five requests on a pool of
    four rows (states move out and back in), chunked prefill of random lengths interleaved
    with one-token steps, snapshots asked at a step's first position, at its last and inside
    it, KV block boundaries passed, padded steps. Per step their Δq and Δo agree (float32,
    1e-5 relative); every final state, snapshot and block state matches the reference."""
    rts = {scan: _runtime(heads=4, seed=21, scan=scan, max_requests=2)
           for scan in ("kernel", "torch")}
    rt = rts["kernel"]
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(22)
    reqs, xs, s0s, wss, chunks = {}, {}, {}, {}, {}
    for i in range(5):
        rid, n = f"r{i}", int(torch.randint(18, 40, (1,), generator=g))
        xs[rid], s0s[rid] = torch.randn(n, d, generator=g), torch.randn(rt.state_shape,
                                                                        generator=g)
        wss[rid] = int(torch.randint(0, 6, (1,), generator=g))
        cuts, p = [], 0
        while p < n:
            k = min(n - p, int(torch.randint(1, 9, (1,), generator=g)))
            cuts.append((p, k))
            p += k
        chunks[rid] = cuts
        bounds = [a for a, _ in cuts[1:]]
        inner = [a + 1 for a, k in cuts if k > 2]
        snap_at = sorted({bounds[len(bounds) // 2], *inner[:1]})
        reqs[rid] = _request(s0s[rid], wss[rid], rid.upper(), snap_at=snap_at)
    steps = 0
    while any(chunks.values()):
        live = [r for r in chunks if chunks[r]]
        pick = torch.randperm(len(live), generator=g)[:3].tolist()
        batch = [(live[j], *chunks[live[j]].pop(0)) for j in pick]
        pad = int(torch.randint(0, 3, (1,), generator=g))
        x = torch.cat([*(xs[r][a:a + k] for r, a, k in batch), torch.randn(pad, d, generator=g)])
        got = {}
        for scan, rt_ in rts.items():
            rt_.plan_step([r for r, _, _ in batch], [k for _, _, k in batch],
                          [a for _, a, _ in batch], reqs, block_size=8)
            rt_.begin_forward(x.shape[0])
            try:
                got[scan] = [_corrections(rt_, layer, x) for layer in rt_.layer_ids]
            finally:
                rt_.end_forward()
        for (dq_k, do_k), (dq_t, do_t) in zip(got["kernel"], got["torch"], strict=True):
            assert rel_err(dq_t, dq_k) < 1e-5 and rel_err(do_t, do_k) < 1e-5
            if pad:
                assert not dq_t[-pad:].any() and not do_t[-pad:].any()
        steps += 1
    for scan, rt_ in rts.items():
        assert rt_.moved_out > 0, scan
        for rid, rm in rt_.requests.items():
            x, s0, ws = xs[rid], s0s[rid], wss[rid]
            assert rel_err(rm.state, _reference_state(rt_, x, s0, ws)) < 1e-5
            assert sorted(rm.snapshots) == list(rm.snap_at)
            for p, snap in rm.snapshots.items():
                assert rel_err(snap, _reference_state(rt_, x[:p], s0, ws)) < 1e-5, (scan, p)
            blk, snap = rm.block
            assert blk == len(x) // 8 * 8
            assert rel_err(snap, _reference_state(rt_, x[:blk], s0, ws)) < 1e-5
    small = _runtime(heads=4, seed=21, max_requests=1)  # two rows for a step of three
    with pytest.raises(RuntimeError, match="pool of 2 rows"):
        small.plan_step(["r0", "r1", "r2"], [1, 1, 1], [0, 0, 0], reqs)
        small.begin_forward(3)


# --- SSW in the worker runtime --------------------------------------------------------------------

def _ssw_reference(rt, x, s0, write_start, ingests):
    """Per layer (the same x for every layer, as `_step` feeds), the reads and the final state
    of an SSW stream as the HF runtime computes it: each ingest one `scan_messages` forward
    from the state before it (its messages clipped to the write start), every other token from
    the write start on a token write."""
    T = x.shape[0]
    cuts = sorted({0, T, *(p for g in ingests for p in (g.start, g.end))})
    out = []
    for slot, layer in enumerate(rt.layer_ids):
        mem = rt.module.layer(layer)
        state, reads = s0[slot].unsqueeze(0), []
        for a, b in zip(cuts, cuts[1:], strict=False):
            xs = x[a:b].unsqueeze(0)
            g = next((g for g in ingests if g.start == a), None)
            if g is None:
                mask = (torch.arange(a, b) >= write_start).unsqueeze(0)
                r, state = mem.scan_tokens(mem.project(xs), state, mask)
            else:
                mids = torch.full((1, b - a), -1)
                for j, (ma, mb) in enumerate(g.messages):
                    if mb > max(ma, write_start):
                        mids[0, max(ma, write_start) - a:mb - a] = j
                r, state = mem.scan_messages(xs, mem.project_q(xs), state, mids)
            reads.append(r[0])
        out.append((torch.cat(reads), state[0]))
    return out


SSW_INGESTS = [(0, 9, [(2, 6), (6, 9)]), (14, 22, [(15, 19), (19, 21)]), (26, 29, [(26, 28)])]


@pytest.mark.parametrize("chunks", [[34], [5] * 7, [9, 5, 8, 4, 8], [1] * 34],
                         ids=["one-step", "chunks-of-5", "at-ingest-ends", "token-by-token"])
@pytest.mark.parametrize("write_start", [0, 3])
@SCAN_PATHS
def test_ssw_runtime_matches_the_message_writes(chunks, write_start, scan):
    """An SSW request whose prompt holds three ingests with token writes between them (an
    epoch's stream: earlier turns' messages and generated tokens, then this turn's) and five
    decode tokens, stepped whole, in chunks that split ingests, and token by token, beside a
    second request in its own steps: the reads (through Δq, Δo) and the final state equal the
    HF runtime's SSW math, float32 within 1e-5 relative."""
    from server.engine.model import Ingest, memory_corrections

    rt = _runtime(heads=4, seed=11, granularity="message_mean", scan=scan)
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(12)
    x, s0 = torch.randn(34, d, generator=g), torch.randn(rt.state_shape, generator=g)
    ingests = [Ingest(a, b, tuple(m)) for a, b, m in SSW_INGESTS]
    other_x, other_s0 = torch.randn(6, d, generator=g), torch.randn(rt.state_shape, generator=g)
    other = [Ingest(0, 4, ((1, 4),))]
    reqs = {"a": _request(s0, write_start, "A", ingests=[i.to_json() for i in ingests]),
            "b": _request(other_s0, 0, "B", ingests=[i.to_json() for i in other])}
    got = {rid: {i: [] for i in rt.layer_ids} for rid in reqs}
    at, b_at = 0, 0
    for n in chunks:
        batch = [("a", x[at:at + n], at)]
        if b_at < 6:
            m = 4 if b_at == 0 else 1
            batch.append(("b", other_x[b_at:b_at + m], b_at))
        rt.plan_step([r for r, _, _ in batch], [len(t) for _, t, _ in batch],
                     [p for _, _, p in batch], reqs)
        xb = torch.cat([t for _, t, _ in batch])
        rt.begin_forward(xb.shape[0])
        try:
            for layer in rt.layer_ids:
                dq, do = memory_corrections(rt.test_layers[layer], xb)
                o = 0
                for rid, t, _ in batch:
                    got[rid][layer].append((dq[o:o + len(t)], do[o:o + len(t)]))
                    o += len(t)
        finally:
            rt.end_forward()
        at += n
        b_at += len(batch[1][1]) if len(batch) > 1 else 0
    for rid, xs, init, ws, ing in (("a", x, s0, write_start, ingests),
                                   ("b", other_x[:b_at], other_s0, 0, other)):
        ref = _ssw_reference(rt, xs, init, ws, ing)
        for slot, layer in enumerate(rt.layer_ids):
            mem = rt.module.layer(layer)
            reads, final = ref[slot]
            dq = torch.cat([a for a, _ in got[rid][layer]])
            do = torch.cat([b for _, b in got[rid][layer]])
            assert rel_err(dq, mem.delta_q(reads)) < 1e-5
            assert rel_err(do, mem.delta_o(reads)) < 1e-5
            assert rel_err(rt.requests[rid].state[slot], final) < 1e-5


@SCAN_PATHS
def test_ssw_runtime_snapshots_only_where_a_resume_is_exact(scan):
    """The last KV block boundary a step passes is snapshotted only at a safe point (inside an
    ingest's messages a resume would lack their partial sums); a request resumed at such a
    known state ends where the whole stream does; a known state or an asked snapshot inside
    the messages, ingests out of order, or an SSW request without ingests are refused."""
    from server.engine.model import Ingest, encode_state

    rt = _runtime(seed=13, granularity="message_mean", scan=scan)
    d = rt.module.cfg.hidden_size
    g = torch.Generator().manual_seed(14)
    x, s0 = torch.randn(34, d, generator=g), torch.randn(rt.state_shape, generator=g)
    ingests = [Ingest(a, b, tuple(m)) for a, b, m in SSW_INGESTS]
    doc = [i.to_json() for i in ingests]
    ref = {p: torch.stack([s for _, s in _ssw_reference(rt, x[:p], s0, 0,
                                                        [i for i in ingests if i.end <= p])])
           for p in (24, 34)}
    reqs = {"a": _request(s0, 0, "A", ingests=doc)}
    _step_at(rt, reqs, "a", x[:17], 0, 8)  # passes 8 (in messages of ingest 0) and 16 (of 1)
    assert rt.requests["a"].block is None
    _step_at(rt, reqs, "a", x[17:25], 17, 8)  # passes 24: a token write, safe
    blk, state = rt.requests["a"].block
    assert blk == 24 and rel_err(state, ref[24]) < 1e-5
    reqs["c"] = _request(s0, 0, "C", ingests=doc, known={"24": encode_state(state)})
    _step_at(rt, reqs, "c", x[24:34], 24, 8)  # a capped cache hit resumes at 24
    _step_at(rt, reqs, "a", x[25:34], 25, 8)
    assert rel_err(rt.requests["c"].state, ref[34]) < 1e-5
    assert rel_err(rt.requests["a"].state, ref[34]) < 1e-5
    for bad in ({"known": {"16": encode_state(state)}}, {"snap_at": [5]},
                {"ingests": [doc[1], doc[0]]}, {"ingests": [[0, 9, [[2, 12]]]]},
                {"ingests": None}):
        reqs["d"] = _request(s0, 0, "D", **{"ingests": doc, **bad})
        with pytest.raises(ValueError, match="ingest"):
            rt.plan_step(["d"], [3], [0], reqs)
    rt_tsw = _runtime()
    with pytest.raises(ValueError, match="per token"):
        rt_tsw.plan_step(["d"], [3], [0], {"d": _request(s0, 0, "D", ingests=doc)})


def _step_at(rt, reqs, rid, x, start, block_size):
    rt.plan_step([rid], [x.shape[0]], [start], reqs, block_size=block_size)
    rt.begin_forward(x.shape[0])
    try:
        for layer in rt.layer_ids:
            _corrections(rt, layer, x)
    finally:
        rt.end_forward()


@dataclass
class _Blocks:
    blocks: tuple


@pytest.mark.parametrize("hit,known,write_start,want", [
    (0, [0], 0, 0),
    (512, [0], 0, 0),  # nothing known: recompute all
    (512, [0, 384, 450], 0, 384),  # the longest known block boundary
    (384, [0, 384, 450], 0, 384),
    (256, [0, 384], 0, 0),  # the hit stops short of the known point
    (512, [0], 300, 256),  # up to the write start the state is the initial one
    (512, [0, 128], 1000, 512),
])
def test_prefix_cache_hits_are_capped_to_known_states(hit, known, write_start, want):
    from server.engine.plugin import cap_cache_hit

    bs = 128
    blocks = _Blocks((list(range(hit // bs)), list(range(100, 100 + hit // bs))))
    capped, keep = cap_cache_hit(blocks, hit, known, write_start)
    assert keep == want
    assert [len(g) for g in capped.blocks] == [want // bs] * 2
    assert capped.blocks[0] == list(range(want // bs))


def test_cache_salt_separates_tenants_states_and_write_starts():
    from server.engine.facade import state_salt

    base = state_salt("tenant-a", "sha256:ad", 0, "c3RhdGU=")
    assert base == state_salt("tenant-a", "sha256:ad", 0, "c3RhdGU=")
    others = [state_salt("tenant-b", "sha256:ad", 0, "c3RhdGU="),
              state_salt("tenant-a", "sha256:other", 0, "c3RhdGU="),
              state_salt("tenant-a", "sha256:ad", 1, "c3RhdGU="),
              state_salt("tenant-a", "sha256:ad", 0, None)]
    assert len({base, *others}) == 5


def test_cuda_compilation_splits_the_graph_at_the_scan(monkeypatch):
    """On CUDA the δ-mem engine splits vLLM's piecewise CUDA graphs at its scan op as at
    attention, and keeps vLLM's full graphs for one-token-a-request batches (the op's torch
    path is capturable) except for SSW adapters; the settings are ones vLLM accepts. On the
    CPU it keeps vLLM's defaults and turns off vLLM's AOT cache (it never loads there)."""
    from vllm.config import CompilationConfig
    from vllm.platforms import current_platform

    from server.engine.facade import _compilation_settings

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    assert _compilation_settings(memory=True) == {}
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    assert _compilation_settings(memory=False) == {}
    for ssw, mode in ((False, "FULL_AND_PIECEWISE"), (True, "PIECEWISE")):
        cfg = _compilation_settings(memory=True, writes_messages=ssw)
        assert "deltamem::scan" in cfg["splitting_ops"]
        assert set(CompilationConfig._attention_ops) <= set(cfg["splitting_ops"])
        cc = CompilationConfig(**cfg)
        assert "deltamem::scan" in cc.splitting_ops and cc.cudagraph_mode.name == mode
