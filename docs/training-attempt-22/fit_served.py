"""Attempt 22: attempt 20's addressing fit on inputs collected the way the server serves.

`diagnose.py` replayed the evaluation in the HF runtime: live, the copy heads' read points at
the asked value in only 1-8 of 32 outside-window questions a layer, where the fit measured
0.35-0.50 on held-out chats. The fit's inputs were not the served ones:

- history: one forward over the whole conversation; served, each LoCoMo session is one turn
  whose prompt is the system prompt, the last W = 256 tokens of the transcript (read, not
  written) and the new messages (written), so x at a written token has a different context;
- read pass: the system prompt, 0 or at most 6 history messages and the question, on a state
  that the read pass itself did not write; served, the question follows the 256-token window
  and is written before the answer is read.

Here `fit_address.collect` is replaced by a collector that runs every chat through
server.sessions.plan_turn / finish_turn (the server's own turn planning, W = 256, the
evaluator's system prompt) in the HF runtime, and keeps x of the tokens each turn writes and
of each question turn's written tokens (the question, the generation prompt, the answer).
Everything else (values, read-out, loss, fit, install) is attempt 20's. A one-off.

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21 \
        .venv/bin/python docs/training-attempt-22/fit_served.py IN OUT --cache /tmp/att22 [fit_address flags]

IN is the shipped adapter (attempt 20): fit_address silences its copy heads while collecting
(attempt 12's heads on, as attempt 20 collected) and replaces them at the end.

The runs of the record (README.md): --chats 240 --held 32 --steps 1000 --save-gain 0.07
--cache /tmp/att22 (fit_served.log; ~31 min collecting, 6.5 fitting); the same with
--near-weight 0.1 (fit_far.log) and with --answer-tokens 3 (fit_tok3.log; the cached inputs
get their values' token counts once, from the regenerated conversations); and
--from-fit OUT.fit.pt --save-gain 0.2 for the louder three-token adapter.
"""

import copy
import random
import sys
import time

import fit_address as FA
import torch
import torch.nn.functional as F

from deltamem import data as D
from deltamem import evaluate as E
from memory_store import SessionRecord, StateIdentity
from server.sessions import ChatFormat, finish_turn, plan_turn

WINDOW = 256


def locomo_sample(conv) -> dict:
    """The LoCoMo layout of a generated conversation (as data.locomo_conversation)."""
    doc = {"speaker_a": conv.speaker_a, "speaker_b": conv.speaker_b}
    for t in conv.turns:
        doc.setdefault(f"session_{t.session}", []).append(
            {"speaker": t.speaker, "dia_id": "", "text": t.text})
    for s, date in enumerate(conv.session_dates, start=1):
        doc.setdefault(f"session_{s}", [])
        doc[f"session_{s}_date_time"] = date
    return {"conversation": doc}


def collect_served(rt, tok, enc, words, split: str, start: int, n: int, seed: str,
                   more_templates: bool = False):
    """fit_address.collect's output (per chat: x of layers 16-23 over the written history,
    value mask, candidates; per question: x of its written tokens, answer start, target,
    category), from the served turn flow."""
    fmt = ChatFormat(tok)
    c = rt.adapter.config
    ident = StateIdentity("b", "a", len(c.layers), c.num_state_heads, c.rank)
    xs = {}

    def keep(li):  # x of the last forward, as w_beta reads it
        def hook(mod, inp, out):
            xs[li] = inp[0].detach()[0]
        return hook

    hooks = [rt.adapter.module.layer(li).w_beta.register_forward_hook(keep(li))
             for li in FA.ALL_COPY_LAYERS]
    eos = [fmt.im_end]
    pool, questions = FA.chat_source(split, more_templates)
    chats = []
    t0 = time.time()
    for ci in range(start, start + n):
        rng = random.Random(f"{seed}:{split}:{ci}")
        conv = FA.fit_conversation(rng, pool, words, split, ci)
        rec = SessionRecord("s", "t", ident)
        hx = {li: [] for li in FA.ALL_COPY_LAYERS}
        for i, (msgs, _) in enumerate(E.session_turns(locomo_sample(conv))):
            if i == 0:
                msgs = [{"role": "system", "content": D.SYSTEM_PROMPT}, *msgs]
            plan = plan_turn(fmt, rec, msgs, WINDOW, 8192, 1)
            res = rt.run(plan.prompt, plan.initial_state, plan.write_start, 1, eos)
            for li in FA.ALL_COPY_LAYERS:
                hx[li].append(xs[li][plan.write_start:].half().cpu())
            rec = finish_turn(plan, res.tokens, fmt.decode(res.tokens), res.final_state,
                              res.finish_reason, ident)
        ids = rec.transcript[:rec.tokens_absorbed]
        hx = {li: torch.cat(v) for li, v in hx.items()}
        assert len(hx[16]) == len(ids)
        val, cand, cand_of = FA.candidates(tok, ids, conv)
        reads = []
        for fi, fact in enumerate(conv.facts):
            if (fi, fact.value) not in cand_of:
                continue
            question = rng.choice(questions(fact.slot)).format(p=fact.person)
            plan = plan_turn(fmt, copy.deepcopy(rec), [{"role": "user", "content": question}],
                             WINDOW, 8192, 16)
            answer = tok(D.ANSWER_PREFIX + fact.value, add_special_tokens=False).input_ids
            r_ids = plan.prompt + answer + [fmt.im_end]
            with torch.no_grad():
                dev = rt.device
                mask = torch.arange(len(r_ids), device=dev)[None] >= plan.write_start
                st = plan.initial_state[None].to(dev)
                rt.forward(torch.tensor([r_ids], device=dev), st, mask)
            rx = {li: xs[li][plan.write_start:].half().cpu() for li in FA.ALL_COPY_LAYERS}
            reads.append({"x": rx, "a_start": len(plan.prompt) - plan.write_start,
                          "target": cand_of[(fi, fact.value)], "category": fact.category})
        chats.append({"x": hx, "val": val, "cand": torch.tensor(cand), "reads": reads})
        if (ci - start) % 20 == 19:
            print(f"  {split}: {ci - start + 1} chats, {time.time() - t0:.0f} s", flush=True)
    for h in hooks:
        h.remove()
    return chats


NEAR_WEIGHT = 1.0  # --near-weight: the weight of questions whose value the prompt re-sends


ANSWER_TOKENS = 1  # --answer-tokens


def value_lengths(tok, words, split: str, start: int, n: int, seed: str, chats) -> None:
    """Add to each cached chat the token count of each candidate value (`cand_len`), from
    the same conversations regenerated (same seeds; the model is not needed). A chat whose
    candidate count does not match keeps first tokens only."""
    pool, _ = FA.chat_source(split)
    for ci, chat in zip(range(start, start + n), chats, strict=True):
        conv = FA.fit_conversation(random.Random(f"{seed}:{split}:{ci}"), pool, words, split, ci)
        lens = [len(tok(" " + v, add_special_tokens=False).input_ids)
                for f in conv.facts for v in [*f.history, f.value]]
        chat["cand_len"] = torch.tensor(lens if len(lens) == len(chat["cand"])
                                        else [1] * len(chat["cand"]))


class BatchJ(FA.Batch):
    """fit_address.Batch with one read per answer token (up to ANSWER_TOKENS): the read at
    the position that predicts the answer's j-th token must point at the asked value's j-th
    token, against the other values' j-th tokens. With first tokens only, "a kite festival"
    is asked to copy " a", which every event starts with, and a date its month."""

    def __init__(self, chats, li, first_only: bool = False):
        exp = []
        for c in chats:
            reads = []
            for r in c["reads"]:
                n = int(c["cand_len"][r["target"]]) if "cand_len" in c else 1
                for j in range(min(n, ANSWER_TOKENS)):
                    reads.append({**r, "a_start": r["a_start"] + j, "j": j})
            exp.append({**c, "reads": reads})
        super().__init__(exp, li, first_only)
        js = torch.tensor([r["j"] for c in exp for r in c["reads"]])
        lens = FA.pad_stack([c.get("cand_len", torch.ones(len(c["cand"]), dtype=torch.long))
                             for c in exp])
        cq = self.cand[self.chat]  # (Q, K)
        ok = (cq >= 0) & (js[:, None] < lens[self.chat])
        self.cand_q = torch.where(ok, cq + js[:, None], -1)
        self.first = js == 0


def losses_tokens(addr, wv, b, tau):
    """fit_address.losses over per-token reads (BatchJ), with the questions whose value lies
    within the last WINDOW written tokens (the served prompt re-sends them) weighted by
    NEAR_WEIGHT: the state is what answers the others. Without grad (the held-out check) it
    also prints the far questions' accuracy."""
    reads, qh, qr, v = FA.run(addr, wv, b)
    Q = len(b.target)
    ar = torch.arange(Q, device=reads.device)
    m = reads[ar, b.ans]
    cq = b.cand_q
    cv = v[b.chat[:, None], cq.clamp_min(0)]
    ok = cq >= 0
    logits = (F.cosine_similarity(m[:, None], cv, dim=-1) / tau).masked_fill(~ok, -1e9)
    far = (b.hmask.sum(1)[b.chat] - cq[ar, b.target]) > WINDOW
    w = torch.where(far, 1.0, NEAR_WEIGHT)
    ce = (F.cross_entropy(logits, b.target, reduction="none") * w).sum() / w.sum()
    acc = (logits.argmax(1) == b.target).float()
    if not torch.is_grad_enabled():
        f0, f1 = far & b.first, far & ~b.first
        later = (f", later tokens {int(f1.sum())} acc {float(acc[f1].mean()):.3f}"
                 if f1.any() else "")
        print(f"    far: first tokens {int(f0.sum())} acc {float(acc[f0].mean()):.3f}{later}",
              flush=True)
    rest_r = (1 - qr[..., -1] ** 2)[~b.ans_mask & b.rmask].mean()
    rest_h = (1 - qh[..., -1] ** 2)[b.hmask].mean()
    on = (qr[..., -1] ** 2)[b.ans_mask].mean()
    rel = (m.norm(dim=1) / cv[ar, b.target].norm(dim=1)).mean()
    return ce, rest_r + rest_h + on, acc, rel


def flag(name, default):
    if name not in sys.argv:
        return default
    i = sys.argv.index(name)
    value = float(sys.argv[i + 1])
    del sys.argv[i:i + 2]
    return value


if __name__ == "__main__":
    FA.collect = collect_served
    NEAR_WEIGHT = flag("--near-weight", 1.0)
    ANSWER_TOKENS = int(flag("--answer-tokens", 0))
    if NEAR_WEIGHT != 1.0 and not ANSWER_TOKENS:
        ANSWER_TOKENS = 1  # the same reads as fit_address, with the weighted loss
    if ANSWER_TOKENS and "--more-templates" in sys.argv:
        # value_lengths regenerates the conversations from the split's own pool
        raise SystemExit("--answer-tokens / --near-weight do not support --more-templates")
    if ANSWER_TOKENS:
        # Cached inputs without value lengths get them here, once (the cache is rewritten).
        import glob
        import re

        from transformers import AutoTokenizer

        from deltamem.model_fetch import resolve_model
        tok = AutoTokenizer.from_pretrained(resolve_model(None))
        words = D.copy_word_lists(list(tok.get_vocab()))
        cache = sys.argv[sys.argv.index("--cache") + 1]
        for path in sorted(glob.glob(f"{cache}_*_*_*_*.pt")):
            split, start, n = re.search(r"_(train|heldout)_(\d+)_(\d+)\.pt$", path).groups()
            chats = torch.load(path)
            if "cand_len" not in chats[0]:
                value_lengths(tok, words, split, int(start), int(n), "att20", chats)
                torch.save(chats, path)
                print("value lengths added to", path, flush=True)
        _collect = collect_served

        def collect_with_lengths(rt, tok, enc, words, split, start, n, seed, more=False):
            chats = _collect(rt, tok, enc, words, split, start, n, seed, more)
            value_lengths(tok, words, split, start, n, seed, chats)
            return chats

        FA.collect = collect_with_lengths
        FA.Batch = BatchJ
        FA.losses = losses_tokens
    FA.main()
