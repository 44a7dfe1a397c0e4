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

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21:docs/training-attempt-22 \
        .venv/bin/python docs/training-attempt-22/fit_served.py IN OUT --cache /tmp/att22 [fit_address flags]

IN is the shipped adapter (attempt 20): fit_address silences its copy heads while collecting
(attempt 12's heads on, as attempt 20 collected) and replaces them at the end.

The runs of the record (README.md): --chats 240 --held 32 --steps 1000 --save-gain 0.07
--cache /tmp/att22 (fit_served.log; ~31 min collecting, 6.5 fitting); the same with
--near-weight 0.1 (fit_far.log) and with --answer-tokens 3 (fit_tok3.log; its cached inputs got
their values' token counts afterwards, from the conversations regenerated with the same seeds:
the collector now stores them); and
--from-fit OUT.fit.pt --save-gain 0.2 for the louder three-token adapter.
"""

import copy
import random
import sys
import time

import fit_address as FA
import torch
import torch.nn.functional as F
from diagnose import replay_history

from deltamem import data as D
from deltamem import evaluate as E
from memory_store import StateIdentity
from server.sessions import ChatFormat, plan_turn

WINDOW = 256
NEAR_WEIGHT = 1.0  # --near-weight: the weight of questions whose value the prompt re-sends
ANSWER_TOKENS = 1  # --answer-tokens: reads a question, one per answer token


def collect_served(rt, tok, enc, words, split: str, start: int, n: int, seed: str,
                   more_templates: bool = False):
    """fit_address.collect's output (per chat: x of layers 16-23 over the written history,
    value mask, candidates and their token counts; per question: x of its written tokens,
    answer start, target, category), from the served turn flow."""
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
    pool, questions = FA.chat_source(split, more_templates)
    dev = rt.device
    chats = []
    t0 = time.time()
    for ci in range(start, start + n):
        rng = random.Random(f"{seed}:{split}:{ci}")
        conv = FA.fit_conversation(rng, pool, words, split, ci)
        turns = E.session_turns({"conversation": D.locomo_layout(conv)[0]})
        rec, hx = replay_history(rt, fmt, ident, turns, WINDOW, xs, FA.ALL_COPY_LAYERS)
        hx = {li: x.half().cpu() for li, x in hx.items()}
        ids = rec.transcript[:rec.tokens_absorbed]
        val, cand, lens, cand_of = FA.candidates(tok, ids, conv)
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
                mask = torch.arange(len(r_ids), device=dev)[None] >= plan.write_start
                rt.forward(torch.tensor([r_ids], device=dev), plan.initial_state[None].to(dev),
                           mask)
            rx = {li: xs[li][plan.write_start:].half().cpu() for li in FA.ALL_COPY_LAYERS}
            reads.append({"x": rx, "a_start": len(plan.prompt) - plan.write_start,
                          "target": cand_of[(fi, fact.value)], "category": fact.category})
        chats.append({"x": hx, "val": val, "cand": torch.tensor(cand),
                      "cand_len": torch.tensor(lens), "reads": reads,
                      "ids": torch.tensor(ids)})  # attempt 23: token ids of the written history
        if (ci - start) % 20 == 19:
            print(f"  {split}: {ci - start + 1} chats, {time.time() - t0:.0f} s", flush=True)
    for h in hooks:
        h.remove()
    return chats


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
                for j in range(min(int(c["cand_len"][r["target"]]), ANSWER_TOKENS)):
                    reads.append({**r, "a_start": r["a_start"] + j, "j": j})
            exp.append({**c, "reads": reads})
        super().__init__(exp, li, first_only)
        js = torch.tensor([r["j"] for c in exp for r in c["reads"]])
        lens = FA.pad_stack([c["cand_len"] for c in exp])
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
    rel = (m.norm(dim=1) / cv[ar, b.target].norm(dim=1)).mean()
    return ce, FA.rest_loss(qh, qr, b), acc, rel


def flag(name, default):
    if name not in sys.argv:
        return default
    i = sys.argv.index(name)
    value = float(sys.argv[i + 1])
    del sys.argv[i:i + 2]
    return value


if __name__ == "__main__":
    NEAR_WEIGHT = flag("--near-weight", NEAR_WEIGHT)
    ANSWER_TOKENS = int(flag("--answer-tokens", ANSWER_TOKENS))
    # With the defaults, BatchJ and losses_tokens are fit_address's reads and loss.
    FA.collect, FA.Batch, FA.losses = collect_served, BatchJ, losses_tokens
    FA.main()
