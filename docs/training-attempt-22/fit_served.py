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
"""

import copy
import random
import time

import fit_address as FA
import program_memory as P
import torch

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
    if split == "train" and more_templates:
        import templates as T
        pool, questions = T.train_pool(), T.train_questions
    else:
        pool = D.pools(split)
        questions = (lambda s: pool.question[s] + P.EXTRA_QUESTIONS[s]) if split == "train" \
            else (lambda s: pool.question[s])
    chats = []
    t0 = time.time()
    for ci in range(start, start + n):
        rng = random.Random(f"{seed}:{split}:{ci}")
        use_words = split == "train" and ci % 2 == 0
        conv = D.generate_conversation(rng, pool, D.HELDOUT_LOCOMO, words if use_words else None,
                                       1.0 if use_words else 0.0, 0.5)
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
        val = torch.zeros(len(ids), dtype=torch.bool)
        cand, cand_of = [], {}
        for fi, fact in enumerate(conv.facts):
            for v in [*fact.history, fact.value]:
                spans = P.value_spans(tok, ids, [v])
                for a, b in spans:
                    val[a:b] = True
                if spans:
                    cand_of[(fi, v)] = len(cand)
                    cand.append(spans[0][0])
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


if __name__ == "__main__":
    FA.collect = collect_served
    FA.main()
