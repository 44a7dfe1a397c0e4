"""The trainer and its data: real backbone, real gradients, a few steps only."""

from __future__ import annotations

import argparse
import datetime
import json
import re

import pytest

from deltamem import data as D


def test_splits_use_disjoint_pools():
    tr, he = D.pools("train"), D.pools("heldout")
    assert not set(tr.names) & set(he.names)
    assert not set(tr.chatter) & set(he.chatter)
    assert not set(tr.reactions) & set(he.reactions)
    for slot in D.SLOTS:
        assert tr.values[slot] and he.values[slot], slot
        assert not set(tr.values[slot]) & set(he.values[slot]), slot
        assert not set(tr.state[slot]) & set(he.state[slot]), slot
        assert not set(tr.question[slot]) & set(he.question[slot]), slot
        assert not set(tr.update[slot]) & set(he.update[slot]), slot
    # Episodes only draw from their own split's pools.
    for i in range(60):
        ep = D.make_episode("heldout", 3, i, i % len(D.STAGES))
        assert ep.answer in he.values[ep.slot]
        assert ep.answer not in tr.values[ep.slot]
        assert any(ep.answer in m["content"] for m in ep.history)
        assert ep.answer not in ep.question


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = [D.make_episode("train", 5, i, 2) for i in range(20)]
    b = [D.make_episode("train", 5, i, 2) for i in range(20)]
    c = [D.make_episode("train", 6, i, 2) for i in range(20)]
    assert a == b
    assert a != c
    p1 = D.write_locomo_json(tmp_path / "a.json", 3, seed=11)
    p2 = D.write_locomo_json(tmp_path / "b.json", 3, seed=11)
    assert p1.read_text() == p2.read_text()


def test_updates_override_and_locomo_layout(tmp_path):
    # An updated fact's answer is the latest value, stated after the earlier one.
    seen_update = False
    for i in range(200):
        ep = D.make_episode("train", 1, i, 2)
        if ep.category == D.CATEGORY_UPDATED:
            seen_update = True
            text = "\n".join(m["content"] for m in ep.history)
            assert ep.answer in text
    assert seen_update
    data = json.loads(D.write_locomo_json(tmp_path / "h.json", 4).read_text())
    assert len(data) == 4
    cats = set()
    for sample in data:
        conv = sample["conversation"]
        assert {"speaker_a", "speaker_b", "session_1", "session_1_date_time"} <= set(conv)
        turns = {t["dia_id"]: t for k, v in conv.items()
                 if k.startswith("session_") and isinstance(v, list) for t in v}
        for t in turns.values():
            assert t["speaker"] in (conv["speaker_a"], conv["speaker_b"])
        for qa in sample["qa"]:
            cats.add(qa["category"])
            ev = qa["evidence"]
            assert ev and all(e in turns for e in ev)
            assert qa["answer"] in turns[ev[0]]["text"]
        msgs = D.locomo_messages(sample)
        assert msgs[0]["role"] == "system"
        assert len(msgs) > len(turns)  # one message per turn plus session headers
    assert D.CATEGORY_SINGLE in cats


# --- real-style conversations (deltamem.dialogues) -------------------------------------------


def _dialogue_lists() -> dict[str, list[str]]:
    """Every pool and template list the dialogue generator splits."""
    from deltamem import dialogues as G

    lists = {k: v for k, v in vars(G).items() if k != "MONTHS" and isinstance(v, list)
             and v and all(isinstance(x, str) for x in v)}
    lists |= {f"REACT[{k}]": v for k, v in G.REACT.items()}
    return lists | {"RACES": list(G.RACES), "SMALL_TALK": [t for t, _ in G.SMALL_TALK]}


def _words(text: str) -> set[str]:
    return {w.strip(".,!?;:'\"").lower() for w in text.split()} - {""}


def test_dialogue_splits_share_no_name_place_event_or_template():
    from deltamem import dialogues as G

    lists = _dialogue_lists()
    assert len(lists) > 60  # the scan found the generator's lists
    train = {x for v in lists.values() for x in v[0::2]}
    held = {x for v in lists.values() for x in v[1::2]}
    assert not train & held
    # every list gives each split at least one item, and drawing stays in the split
    assert all(len(v) >= 2 for v in lists.values())
    texts = {}
    for split in G.SPLITS:
        samples = [G.locomo_dialogue(split, 7, i) for i in range(25)]
        texts[split] = "\n".join(t["text"] for s in samples for k, v in s["conversation"].items()
                                 if isinstance(v, list) for t in v)
        speakers = {s["conversation"][k] for s in samples for k in ("speaker_a", "speaker_b")}
        other = G.SPLITS[1 - G.SPLITS.index(split)]
        assert not speakers & set(G._half(G.WOMEN, other) + G._half(G.MEN, other))
    for name in ("CITIES", "PET_NAMES", "EVENTS", "HOBBIES"):
        for x in G._half(lists[name], "heldout"):
            assert x not in texts["train"], (name, x)


def test_dialogue_questions_are_grounded_in_their_evidence():
    from deltamem import dialogues as G

    cats, n = set(), 0
    for i in range(40):
        sample = G.locomo_dialogue("heldout", 3, i)
        conv = sample["conversation"]
        turns = {t["dia_id"]: (s, t) for s in range(1, 20) for t in conv.get(f"session_{s}", [])}
        # sessions are dated in order and speakers alternate with the two people
        stamps = [conv[f"session_{s}_date_time"] for s in range(1, 20)
                  if f"session_{s}" in conv]
        assert len(stamps) >= 3
        for dia_id, (_, t) in turns.items():
            assert t["speaker"] in (conv["speaker_a"], conv["speaker_b"]), dia_id
        for q in sample["qa"]:
            n += 1
            cats.add(q["category"])
            assert q["evidence"] and all(e in turns for e in q["evidence"]), q
            texts = [turns[e][1]["text"] for e in q["evidence"]]
            if q["category"] == G.ADVERSARIAL:
                # asked about the person who did not say it; no answer to learn
                assert "answer" not in q and q["adversarial_answer"]
                assert turns[q["evidence"][0]][1]["speaker"] not in q["question"]
            elif q["category"] == G.TEMPORAL:
                # the date is the evidence session's date moved by the turn's "when"
                session, t = turns[q["evidence"][0]]
                low = t["text"].lower()
                when = [w for w in G.WHEN if re.search(rf"\b{w}\b", low)]
                assert len(when) == 1, t["text"]
                date = datetime.datetime.strptime(conv[f"session_{session}_date_time"],
                                                  "%I:%M %p on %d %B, %Y").date()
                assert q["answer"] == G.WHEN[when[0]](date)
            elif q["category"] != G.OPEN_DOMAIN:
                # every word of the answer is said in the evidence turns
                said = set().union(*(_words(x) for x in texts))
                assert _words(q["answer"]) - {"a", "an", "her", "his"} <= said, (q, texts)
    assert cats == {1, 2, 3, 4, 5} and n > 400


def test_dialogues_export_and_load_for_both_protocols(tmp_path, tokenizer):
    from deltamem import dialogues as G
    from deltamem import evaluate

    path = G.write_locomo_json(tmp_path / "d.json", 3, seed=5)
    assert path.read_text() == G.write_locomo_json(tmp_path / "e.json", 3, seed=5).read_text()
    assert path.read_text() != G.write_locomo_json(tmp_path / "f.json", 3, seed=6).read_text()
    data = evaluate.load_conversations(path, 0, 0)
    assert data == evaluate.load_conversations(None, 3, 5, "dialogues")
    for sample in data:
        turns = evaluate.session_turns(sample)
        assert len(turns) >= 3 and turns[0][0][0]["content"].startswith("[Session 1, ")
        for q in sample["qa"]:
            if q["category"] != G.ADVERSARIAL:
                assert evaluate.evidence_distance(tokenizer, turns, q["evidence"]) > 0
        counters = evaluate.token_counters(tokenizer)
        for i, q in enumerate(evaluate.ref_evaluated(sample, evaluate.REF_CATEGORIES)):
            p = evaluate.ref_prompt(sample, q, i, counters, 8192, 50)
            assert not p["truncated"] and conv_line(sample) in p["messages"][1]["content"]


def conv_line(sample: dict) -> str:
    t = sample["conversation"]["session_1"][0]
    return f'{t["speaker"]} said, "{t["text"]}"'


def test_dialogue_training_episodes():
    from deltamem import dialogues as G

    eps = [G.make_episode("train", 1, i) for i in range(30)]
    assert eps == [G.make_episode("train", 1, i) for i in range(30)]
    for ep in eps:
        assert ep.history[0]["content"] == D.SYSTEM_PROMPT
        assert ep.category != G.ADVERSARIAL and ep.answer
        assert ep.dialogue[0]["content"].startswith("[Session 1, ")


def test_copy_words_leave_heldout_values_unseen(tokenizer):
    words = D.copy_word_lists(list(tokenizer.get_vocab()))
    assert len(words["cap"]) > 1000 and len(words["low"]) > 1000
    he = D.pools("heldout")
    held = set(he.names) | {w for vals in he.values.values() for v in vals for w in v.split()}
    assert not held & (set(words["cap"]) | set(words["low"]))
    # With p_copy = 1 every open-class value is a copy word of the slot's case; other slots
    # and the held-out split keep their pools.
    n_copy = 0
    for i in range(80):
        ep = D.make_episode("train", 0, i, 1, words, 1.0)
        if ep.slot in D.COPY_CASE and ep.slot != "event":  # events need p_multi
            assert ep.answer in words[D.COPY_CASE[ep.slot]], (ep.slot, ep.answer)
            n_copy += 1
        else:
            assert ep.answer in D.pools("train").values[ep.slot]
    assert n_copy > 20
    assert D.make_episode("heldout", 0, 1, 1) == D.make_episode("heldout", 0, 1, 1, words, 0.0)
    # p_multi = 1: copy values are pseudo-words of several tokens (events: "a <w> <w>"), and
    # still never a held-out value.
    held_values = {v for vals in he.values.values() for v in vals}
    n_tokens = []
    for i in range(120):
        ep = D.make_episode("train", 1, i, 1, words, 1.0, p_multi=1.0)
        if ep.slot not in D.COPY_CASE:
            continue
        assert ep.answer not in held_values
        if ep.slot == "event":
            a, w1, w2 = ep.answer.split()
            assert a == "a" and w2 in words["low"]
        else:
            assert any(ep.answer.startswith(w) and ep.answer != w
                       for w in words[D.COPY_CASE[ep.slot]]), ep.answer
        n_tokens.append(len(tokenizer.encode(" " + ep.answer, add_special_tokens=False)))
    assert len(n_tokens) > 30 and sum(n > 1 for n in n_tokens) / len(n_tokens) > 0.9


def test_read_pass_window_is_context_not_written(tokenizer):
    from deltamem.episodes import Encoder, make_batch

    enc = Encoder(tokenizer)
    ep = D.make_episode("train", 0, 7, 2)
    hist = ep.dialogue
    msgs = D.read_messages(ep, context=2)
    assert msgs[1:3] == hist[-2:] and msgs[-2]["content"] == ep.question
    assert D.read_messages(ep, context=0)[1]["content"] == ep.question
    assert D.read_messages(ep, context=10**6)[1:-2] == hist
    b0 = make_batch(enc, [ep], [True], [0])
    b2 = make_batch(enc, [ep], [True], [2])
    window = len(enc.ids([ep.history[0], *hist[-2:]])) - len(enc.ids(ep.history[:1]))
    assert b2["r_ids"].shape[1] == b0["r_ids"].shape[1] + window
    # The same tokens are written (question and answer): the window is only read.
    assert int(b2["r_mask"].sum()) == int(b0["r_mask"].sum()) > 0
    assert not b2["r_mask"][0, :b2["r_ids"].shape[1] - int(b2["r_mask"].sum())].any()
    assert (b2["labels"] != -100).sum() == (b0["labels"] != -100).sum()


def test_outside_window_read_pass_leaves_the_fact_out():
    # --outside-window: the read pass re-sends everything after the asked fact, nothing before.
    seen_far = 0
    for i in range(40):
        ep = D.make_episode("train", 3, i, 5)
        hist = ep.dialogue
        n = D.messages_after_fact(ep)
        window = D.read_messages(ep, context=n)[1:-2]
        assert window == hist[len(hist) - n:]
        assert not any(ep.answer in m["content"] for m in window)
        assert ep.answer in hist[len(hist) - n - 1]["content"]  # the fact is just before it
        seen_far += n >= 5
    assert seen_far >= 20  # most asked facts have five or more messages after them (31 of 40)


@pytest.fixture(scope="module")
def runtime(model_dir):
    import torch
    from transformers import AutoTokenizer

    from deltamem.episodes import Encoder
    from deltamem.hf_runtime import DeltaMemHF

    # One thread: the suite shares two cores, and oversubscribed threads crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The tiny config: δ-mem on the last 4 layers only, so backward stays shallow.
    rt = DeltaMemHF.from_pretrained(model_dir, seed=0, target_layers=[26, 27, 28, 29])
    yield rt, Encoder(AutoTokenizer.from_pretrained(model_dir))
    torch.set_num_threads(threads)


def test_time_budget_drives_the_schedule_and_the_curriculum():
    from deltamem.train_config import lr_at, parse_curriculum, run_progress, scheduled_stage

    # Whichever of steps and time is further along sets the progress.
    assert run_progress(10, 100, 30.0, 60.0) == 0.5
    assert run_progress(50, 100, 1.0, 60.0) == 0.5
    assert run_progress(50, 100, 1e9, None) == 0.5
    assert run_progress(10, 100, 120.0, 60.0) == 1.0
    peak, floor = 1e-3, 0.05
    assert lr_at(0, 10**6, peak, 0.1, floor, progress=0.05) == pytest.approx(peak / 2)
    assert lr_at(0, 10**6, peak, 0.1, floor, progress=0.1) == pytest.approx(peak)
    assert lr_at(0, 10**6, peak, 0.1, floor, progress=1.0) == pytest.approx(floor * peak)
    decay = [lr_at(0, 10**6, peak, 0.1, floor, progress=p / 10) for p in range(1, 11)]
    assert decay == sorted(decay, reverse=True)
    # By steps, as before a time budget existed.
    assert lr_at(4, 100, peak, 0.1, floor) == pytest.approx(peak / 2)
    cur = parse_curriculum("0:0,0.5:1,0.9:2")
    assert [scheduled_stage(cur, p) for p in (0.0, 0.6, 0.95)] == [0, 1, 2]


def test_a_few_steps_lower_the_loss(runtime):
    import torch

    from deltamem.episodes import BetaProbe, episode_loss, make_batch

    rt, enc = runtime
    eps = [D.make_episode("train", 0, i, 0) for i in range(2)]
    batch = make_batch(enc, eps)
    # Pads never write; the read pass writes nothing unless asked.
    assert not batch["r_mask"].any()
    assert batch["h_mask"].sum() == batch["n_hist_tokens"]
    params = list(rt.adapter.module.parameters())
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    probe = BetaProbe(rt.adapter.module)
    first, m0 = episode_loss(rt, batch, probe)
    assert 0 < m0["mean_beta"] < 1 and m0["beta_reg"] > 0
    for _ in range(5):
        loss, _ = episode_loss(rt, batch, probe)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    # Gradients reach the write-side projections only through the state.
    assert rt.adapter.module.layers["26"].w_k.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in rt.model.parameters())
    probe.remove()
    with torch.no_grad():
        after, _ = episode_loss(rt, batch, None)
    first = float(first.detach())
    assert float(after) < first - 0.5, (first, float(after))
    # The one-pass exact match of state_gain (periodic evaluations) is evaluate's; batch 2
    # over 3 episodes leaves a lone last episode, which has no other state to compare with.
    from deltamem.episodes import evaluate, state_gain

    eps3 = [*eps, D.make_episode("train", 0, 2, 0)]
    g = state_gain(rt, enc, eps3, batch=2)
    assert g["n"] == 3 and g["exact"] == evaluate(rt, enc, {0: eps3}, batch=2)["0"]


def test_general_kl_is_zero_without_corrections_and_pulls_back(runtime, zero_readout):
    """The KL general-ability loss against its definition: zero when δ-mem changes nothing
    (zero read-out), positive and differentiable when it does; CE stays the greedy answer's."""
    import torch

    from deltamem.episodes import general_loss

    rt, enc = runtime
    rows = [([1, 42, 314, 2718, 28, 99, 1000, 7], 5), ([1, 5000, 12, 77, 80], 2)]
    with zero_readout(rt) as mod:
        with torch.no_grad():
            assert float(general_loss(rt, rows, enc.pad_id, "kl")) == pytest.approx(0, abs=1e-6)
            for layer in mod.layers.values():
                layer.b_o.weight.normal_(std=5.0)  # a large correction moves the answers
        kl = general_loss(rt, rows, enc.pad_id, "kl")
        assert float(kl.detach()) > 1e-3
        kl.backward()
        assert mod.layers["29"].b_o.weight.grad.abs().sum() > 0
        ce = float(general_loss(rt, rows, enc.pad_id, "ce").detach())
        assert ce > 0 and ce != pytest.approx(float(kl.detach()))


def test_keep_term_holds_in_window_answers_to_the_backbone(runtime, zero_readout):
    """The keep term against its definition: rows whose window shows the evidence are scored
    by KL(backbone || δ-mem) on the answer's positions, the others by cross-entropy to the
    reference answer; zero KL when δ-mem changes nothing; without keep rows, the old loss."""
    import torch

    from deltamem import dialogues as G
    from deltamem.episodes import episode_loss, keep_rows, make_batch

    rt, enc = runtime
    eps = [D.make_episode("train", 2, i, 1) for i in range(2)]
    eps.append(G.make_episode("train", 2, 0, shape="short"))
    after = [D.messages_after_fact(eps[0]), D.messages_after_fact(eps[1]),
             len(eps[2].dialogue) - min(eps[2].evidence)]
    contexts = [after[0] + 1, after[1], after[2]]  # shown, not shown, shown
    assert keep_rows(eps, contexts) == [True, False, True]
    assert keep_rows(eps, [0, 0, 0]) == [False] * 3  # state only: nothing to keep
    batch = make_batch(enc, eps, [True] * 3, contexts)
    with zero_readout(rt) as mod, torch.no_grad():
        plain, m0 = episode_loss(rt, batch)
        batch["keep"] = [False] * 3
        same, _ = episode_loss(rt, batch, keep_weight=1.0)
        assert float(same) == pytest.approx(float(plain))
        batch["keep"] = [True] * 3
        kept, m = episode_loss(rt, batch, keep_weight=1.0)
        assert m["ce"] == 0 and float(kept) == pytest.approx(m["beta_reg"], abs=1e-6)
        for layer in mod.layers.values():
            layer.b_o.weight.normal_(std=5.0)
        batch["keep"] = keep_rows(eps, contexts)
        mixed, m = episode_loss(rt, batch, keep_weight=2.0)
        assert m["keep_kl"] > 1e-3 and m["ce"] > 0
        # by hand: per-token sums over the rows of each kind, over all answer tokens
        _, state, _ = rt.forward(batch["h_ids"], None, batch["h_mask"])
        logits, _, _ = rt.forward(batch["r_ids"], state, batch["r_mask"])
        ref, _, _ = rt.forward(batch["r_ids"], None, batch["r_mask"], memory=False)
        sel = batch["labels"] != -100
        rows = torch.tensor(batch["keep"]).unsqueeze(1)
        lp, lq = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
        kl = (lq.exp() * (lq - lp)).sum(-1)[sel & rows].sum() / sel.sum()
        ce = torch.nn.functional.cross_entropy(logits[sel & ~rows].float(),
                                               batch["labels"][sel & ~rows], reduction="sum")
        assert m["keep_kl"] == pytest.approx(2.0 * float(kl), rel=1e-4)
        assert m["ce"] == pytest.approx(float(ce / sel.sum()), rel=1e-4)


def test_stream_read_pass_is_a_served_session_with_its_kv_kept(runtime):
    """The stream read pass against its definition, built from the runtime's own pieces:
    the history written with its K/V cached; the cache cut to the system prompt and the
    window; the question and the answer fed on the history's final state at their stream
    positions, written. Float32, 1e-4."""
    import torch
    from transformers import DynamicCache

    from deltamem import dialogues as G
    from deltamem.episodes import episode_loss, make_stream_batch

    rt, enc = runtime
    eps = [D.make_episode("train", 4, 0, 3), G.make_episode("train", 4, 1, shape="short")]
    contexts = [2, 5]
    batch = make_stream_batch(enc, eps, contexts)
    sel = batch["labels"] != -100
    with torch.no_grad():
        stream, _, _ = rt.forward(batch["s_ids"], None, batch["s_mask"],
                                  attention_mask=batch["s_attn"])
        for b, (ep, c) in enumerate(zip(eps, contexts, strict=True)):
            hist = enc.ids(ep.history)
            sys_len = len(enc.ids(ep.history[:1]))
            win = len(enc.ids(ep.history[:len(ep.history) - c]))
            row = batch["s_ids"][b, :int(batch["s_mask"][b].sum())]
            cache = DynamicCache()
            _, state, _ = rt.forward(row[None, :len(hist)], None, past_key_values=cache)
            keep = torch.cat([torch.arange(sys_len), torch.arange(win, len(hist))])
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
            tail = row[None, len(hist):]
            logits, _, _ = rt.forward(
                tail, state, past_key_values=cache,
                position_ids=torch.arange(len(hist), len(row))[None])
            want = logits[0][sel[b, len(hist):len(row)]]
            got = stream[b][sel[b]]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        loss, m = episode_loss(rt, batch)
        assert m["B"] == 2 and m["ce"] > 0 and len(m["exact_rows"]) == 2
    # writes on every real token of the stream: history, question and answer
    rows = [enc.ids([*ep.history, {"role": "user", "content": ep.question}],
                    generation_prompt=True) + enc.answer(ep) for ep in eps]
    assert batch["s_mask"].sum(1).tolist() == [len(r) for r in rows]


@pytest.mark.model  # the run finds the default model itself
def test_cli_tiny_run_checkpoints_and_resume(tmp_path, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    from safetensors.torch import load_file

    from deltamem import layer as layer_math
    from deltamem.adapter import load_adapter
    from deltamem.train import configure_parser, run

    # Every scan of a training run asks for the chunked backend, its no-grad evaluations too
    # (the compiled CPU kernel slows torch down once it has run; see deltamem/train.py).
    backends = []

    def recording_scan(*args, backend="auto", **kw):
        backends.append(backend)
        return scan_fn(*args, backend=backend, **kw)

    scan_fn = layer_math.delta_rule_scan
    monkeypatch.setattr(layer_math, "delta_rule_scan", recording_scan)

    def parse(*extra):
        p = argparse.ArgumentParser()
        configure_parser(p)
        return p.parse_args(["--tiny", "--no-progress", "--threads", "1",
                             "--out-dir", str(tmp_path), *extra])

    assert run(parse("--steps", "2")) == 0
    assert backends and set(backends) == {"chunked"}
    st = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert st["step"] == 2
    # A step the killed run took after its checkpoint is taken again, and recorded once.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "ce": 9.9}) + "\n")
    assert run(parse("--steps", "3", "--resume")) == 0
    st = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert st["step"] == 3
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all("state_margin" in r for r in evals)
    # Step 3 is in stage 1: its loss includes a general-ability episode.
    last_step = [r for r in rows if r["kind"] == "train"][-1]
    assert last_step["stage"] == 1 and last_step["general_ce"] > 0
    out = tmp_path / "adapter"
    for name in ("adapter.safetensors", "adapter_config.json", "TRAINING_CARD.md", "loss.png"):
        assert (out / name).is_file(), name
    ad = load_adapter(out)
    assert ad.meta["trained"] and ad.meta["system_prompt"] == D.SYSTEM_PROMPT
    assert all(str(t.dtype) == "torch.float32"
               for t in load_file(str(out / "adapter.safetensors")).values())
    card = (out / "TRAINING_CARD.md").read_text()
    assert "state-only exact match" in card and "TSW (rank 8, Q/O, 4 of 30 layers)" in card
    # A spent time budget ends the run before its steps, and it still writes its adapter;
    # a bf16 backbone trains too, and the run's curriculum overrides stay its own. It starts
    # from the adapter above, widened to four state heads.
    budget = tmp_path / "budget"
    p = argparse.ArgumentParser()
    configure_parser(p)
    curriculum = list(D.STAGES)
    common = ["--tiny", "--no-progress", "--threads", "1", "--steps", "4"]
    assert run(p.parse_args([*common, "--max-minutes", "1e-6", "--dtype", "bfloat16",
                             "--probe-values", "0", "--facts", "1,2", "--chatter", "2,3",
                             "--sessions", "2", "--init-adapter", str(out),
                             "--state-heads", "4", "--beta-bias-init", "-5",
                             "--general-loss", "kl", "--out-dir", str(budget)])) == 0
    assert D.STAGES == curriculum
    rows = [json.loads(x) for x in (budget / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "train"]) < 4
    card = (budget / "adapter" / "TRAINING_CARD.md").read_text()
    assert "backbone bfloat16" in card
    # The overrides reach the episodes' stages; the probe (stage 0) keeps its own chatter.
    assert "| 0 | 1–2 | 0–0 | 0.0 | 0.0 | 1 |" in card and "| 1 | 1–2 | 2–3 | 0.0 | 0.0 | 2 |" in card
    assert "MSW (4 state heads" in card and "KL(backbone" in card
    wide = load_adapter(budget / "adapter")
    assert wide.config.num_state_heads == 4
    assert wide.meta["widened_from"]["fingerprint"] == ad.fingerprint()
    # --beta-bias-init made the added heads slow (a step or so of training moves them little)
    # and left the trained head's gates alone.
    for i, layer in wide.module.layers.items():
        bias, old_bias = layer.w_beta.bias, ad.module.layers[i].w_beta.bias
        assert (bias[8:] + 5).abs().max() < 0.1 and (bias[:8] - old_bias).abs().max() < 0.1
    assert "the heads a widening adds): -5.0" in card
    for bad in (["--chatter", "5"], ["--facts", "0,1"], ["--facts", "3,2"], ["--sessions", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    # Fewer heads than the adapter has is refused with a message, not a traceback.
    assert run(p.parse_args([*common, "--init-adapter", str(budget / "adapter"),
                             "--state-heads", "1", "--out-dir", str(tmp_path / "narrow")])) == 2
    # So is a gate bias for heads that nobody adds.
    assert run(p.parse_args([*common, "--init-adapter", str(out), "--beta-bias-init", "-5",
                             "--out-dir", str(tmp_path / "no-new-heads")])) == 2
    torch.set_num_threads(threads)


def test_general_prompts_are_varied_and_leave_heldout_values_unseen():
    from deltamem.evaluate import GENERAL_SET

    p = D.general_prompts(300)
    assert p[:len(D.GENERAL_TRAIN)] == D.GENERAL_TRAIN and len(p) == len(D.GENERAL_TRAIN) + 300
    assert len(set(p)) == len(p) and p == D.general_prompts(300)
    held = {v for vals in D.pools("heldout").values.values() for v in vals}
    made = p[len(D.GENERAL_TRAIN):]  # (GENERAL_TRAIN itself names Canada and Egypt)
    assert not any(v in q.rstrip("?.").split() for q in made for v in held if " " not in v)
    # The trainer drops the evaluator's questions; the generator alone may form a few.
    assert len(set(p) & {q for q, _ in GENERAL_SET}) < 5


def test_batched_general_targets_match_one_prompt_greedy(runtime, tmp_path):
    """The batched (left-padded) targets against the reference: rt.run, one prompt at a time,
    memory off. Float32, short answers: no near-tie, so every token must agree."""
    from deltamem.episodes import general_targets

    rt, enc = runtime
    tok = enc.tok
    qs = ["What is 2 plus 3?", "Name a colour.", "What is the capital of France?",
          "What is the opposite of hot? Answer with one word."]
    cache = tmp_path / "targets.json"
    rows = general_targets(rt, tok, qs, cache, max_new=8, batch=3)  # a full and a partial batch
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for q, (ids, start) in zip(qs, rows, strict=True):
        prompt = ids[:start]
        ref = rt.run(prompt, None, 0, 8, (end,), memory=False).tokens
        assert ids[start:] == ref, q
    assert set(json.loads(cache.read_text())) == set(qs)
    # A second call reads the cache: the same rows without decoding (the runtime is not used).
    assert general_targets(None, tok, qs, cache, max_new=8) == rows


# --- the config, its flags and the recipes ----------------------------------------------------


def _train_parser():
    from deltamem.train import configure_parser

    p = argparse.ArgumentParser(prog="deltamem train")
    configure_parser(p)
    return p


def test_help_lists_every_field_with_its_help_and_default():
    import dataclasses

    from deltamem.train_config import TrainConfig

    def squeeze(text) -> str:  # argparse wraps lines, at spaces and after hyphens
        return "".join(str(text).split())

    text = squeeze(_train_parser().format_help())
    assert "--recipe" in text
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert squeeze(f.metadata["help"]) in text, flag
        if not isinstance(f.default, bool):  # switches have no default to show
            shown = f.metadata["default_text"] if f.default is None else f.default
            assert shown is not None, f"{flag}: a None default needs words for --help"
            assert squeeze(f"{f.metadata['help']} (default: {shown})") in text, flag
    # The defaults the command line gives are the dataclass's.
    assert TrainConfig.from_args(_train_parser().parse_args([])) == TrainConfig()


def test_every_recipe_loads_into_a_train_config():
    from pathlib import Path

    from deltamem.train_config import TrainConfig

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))
    assert {r.name for r in recipes} >= {"smollm2-shipped-base.toml", "smollm2-probe.toml"}
    for recipe in recipes:
        cfg = TrainConfig.from_recipe(recipe)
        assert cfg.as_flags(), recipe  # a recipe that sets nothing is a mistake
        # Its flags give the same config: the recipe says nothing the flags cannot.
        assert TrainConfig.from_args(_train_parser().parse_args(cfg.as_flags())) == cfg


def test_shipped_base_recipe_is_the_recorded_command():
    import re
    import shlex
    from pathlib import Path

    from deltamem.train_config import TrainConfig

    root = Path(__file__).parents[1]
    card = (root / "deltamem/adapters/smollm2-135m-instruct/TRAINING_CARD.md").read_text()
    base = card[card.index("# Base: attempt 12"):]
    command = re.search(r"\(deltamem train (.*?)\)\.", base).group(1)
    recorded = TrainConfig.from_args(_train_parser().parse_args(shlex.split(command)))
    recipe = TrainConfig.from_recipe(root / "recipes/smollm2-shipped-base.toml")
    assert recipe == recorded
    assert recipe.device == "cuda" and recipe.max_minutes == 7 and recipe.general_loss == "kl"


def test_recipe_values_land_in_the_config_and_flags_override_them(tmp_path):
    from pathlib import Path

    from deltamem.train_config import ConfigError, TrainConfig

    recipe = tmp_path / "r.toml"
    recipe.write_text('steps = 7\nlr = 1\nfacts = [1, 2]\nchatter = "3,4"\n'
                      'out_dir = "somewhere"\nno_progress = true\nbatch = 3\n')
    p = _train_parser()
    cfg = TrainConfig.from_args(p.parse_args(["--recipe", str(recipe)]))
    assert (cfg.steps, cfg.lr, cfg.facts, cfg.chatter) == (7, 1.0, (1, 2), (3, 4))
    assert cfg.out_dir == Path("somewhere") and cfg.no_progress and cfg.batch == 3
    assert cfg.seed == 0  # not in the recipe: the default
    # A flag given on the command line wins, even one that repeats the default value.
    cfg = TrainConfig.from_args(p.parse_args(["--recipe", str(recipe), "--steps", "9",
                                              "--batch", "4", "--facts", "2,2"]))
    assert (cfg.steps, cfg.batch, cfg.facts, cfg.lr) == (9, 4, (2, 2), 1.0)
    # An unknown key is an error that names it; so is a value of the wrong type.
    recipe.write_text("steps = 7\nstepz = 8\n")
    with pytest.raises(ConfigError, match="'stepz'"):
        TrainConfig.from_recipe(recipe)
    recipe.write_text("max-minutes = 7\n")
    with pytest.raises(ConfigError, match="did you mean max_minutes"):
        TrainConfig.from_recipe(recipe)
    recipe.write_text('steps = "many"\n')
    with pytest.raises(ConfigError, match="--steps"):
        TrainConfig.from_recipe(recipe)


def test_config_refuses_what_no_run_can_use(tmp_path):
    from deltamem.train import run
    from deltamem.train_config import ConfigError, TrainConfig

    for bad, match in (({"p_copy": 1.5}, "--p-copy"), ({"steps": 0}, "--steps"),
                       ({"facts": (3, 2)}, "--facts"), ({"chatter": "x"}, "--chatter"),
                       ({"sessions": 11}, "--sessions"), ({"dtype": "float16"}, "--dtype"),
                       ({"curriculum": "0:a"}, "--curriculum"), ({"layers": "last:x"}, "--layers"),
                       ({"init_adapter": "a", "beta_bias_init": -5.0}, "--beta-bias-init")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad)
    # The command line reports it and exits 2, before any model loads.
    p = _train_parser()
    assert run(p.parse_args(["--p-multi", "2", "--out-dir", str(tmp_path)])) == 2
    assert run(p.parse_args(["--recipe", str(tmp_path / "missing.toml")])) == 2
    # --tiny makes a new config; --finalize resumes.
    cfg = TrainConfig(tiny=True, finalize=True)
    tiny = cfg.with_tiny_limits()
    assert (tiny.steps, tiny.layers, tiny.max_stage) == (4, "last:4", 1) and cfg.steps == 1000
    assert cfg.continues_run and not TrainConfig().continues_run


def test_training_asks_for_the_chunked_scan_and_the_default_is_auto(runtime):
    import inspect

    from deltamem.hf_runtime import DeltaMemHF
    from deltamem.layer import DeltaMemLayer
    from deltamem.scan import delta_rule_scan
    from deltamem.train import TRAIN_SCAN_BACKEND

    assert TRAIN_SCAN_BACKEND == "chunked"
    rt, _ = runtime  # built without a backend: the default
    assert rt.scan_backend == "auto"
    for fn in (delta_rule_scan, DeltaMemHF.from_pretrained, DeltaMemHF.__init__):
        name = "backend" if fn is delta_rule_scan else "scan_backend"
        assert inspect.signature(fn).parameters[name].default == "auto", fn
    for fn in (DeltaMemLayer.scan_tokens, DeltaMemLayer.scan_messages):
        assert inspect.signature(fn).parameters["backend"].default == "auto", fn
    with pytest.raises(ValueError, match="unknown scan backend"):
        rt.scan_backend = "fast"
    assert rt.scan_backend == "auto"
