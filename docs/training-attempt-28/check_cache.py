"""Attempt 28: does e2e_copy.py's cached tail give the full forward's answer logits?

One held-out chat's first question with the shipped adapter: the served prompt and answer in
one forward from the session's state, against the prompt minus its last token run once (KV
kept in float16, as the cache keeps it) and the tail run on that KV with the copy heads' state
recomputed from cached x (e2e_copy.copy_states). A one-off.

    PYTHONPATH=<e2e_copy.py's>:docs/training-attempt-28 .venv/bin/python docs/training-attempt-28/check_cache.py
"""

import copy
import random

import e2e_copy as X
import fit_address as FA
import torch
from diagnose import keep_inputs, replay_history, replay_runtime

from deltamem import data as D
from deltamem import evaluate as E
from server.sessions import plan_turn


def main():
    tok, rt, fmt, ident = replay_runtime("deltamem/adapters/smollm2-135m-instruct")
    words = D.copy_word_lists(list(tok.get_vocab()))
    xs = keep_inputs(rt, X.LAYERS)
    pool, questions = FA.chat_source("heldout")
    conv = FA.fit_conversation(random.Random("att28:heldout:0"), pool, words, "heldout", 0)
    turns = E.session_turns({"conversation": D.locomo_layout(conv)[0]})
    slots = X.copy_slots(rt)
    with torch.no_grad():
        rec, hx = replay_history(rt, fmt, ident, turns, X.WINDOW, xs, X.LAYERS)
        fact = conv.facts[0]
        question = questions(fact.slot)[0].format(p=fact.person)
        plan = plan_turn(fmt, copy.deepcopy(rec), [{"role": "user", "content": question}],
                         X.WINDOW, 8192, 16)
        answer = tok(D.ANSWER_PREFIX + fact.value, add_special_tokens=False).input_ids
        ids = plan.prompt + answer + [fmt.im_end]
        mask = (torch.arange(len(ids)) >= plan.write_start)[None]
        full_logits, _, _ = rt.forward(torch.tensor([ids]), plan.initial_state[None], mask)
        q = X.cache_question(rt, fmt, plan, answer, xs)
        chat = {"hx": {li: x.half() for li, x in hx.items()}}
        states, _ = X.copy_states(rt, chat, q)
        for li, s in zip(X.LAYERS, states, strict=True):
            ref = q["state"][slots[li], X.H0:X.H1]
            print(f"layer {li}: copy state relative error {float((s - ref).norm() / ref.norm()):.2e}")
        _, ok, _, _ = X.tail_loss(rt, chat, q, slots, False)
        tail_logits, _ = X.tail_logits(rt, chat, q, slots)
        ref = full_logits[0, q["n"]:]
        print(f"tail logits: max |Δ| {float((tail_logits - ref).abs().max()):.4f} "
              f"(largest logit {float(ref.abs().max()):.1f}); same argmax "
              f"{bool((tail_logits.argmax(-1) == ref.argmax(-1)).all())}; answer exact {ok}")


if __name__ == "__main__":
    main()
