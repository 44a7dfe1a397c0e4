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
from diagnose import replay_history
from transformers import DynamicCache

from deltamem import data as D
from deltamem import evaluate as E
from server.sessions import plan_turn


def main():
    tok, rt, fmt, ident = X.runtime("deltamem/adapters/smollm2-135m-instruct")
    words = D.copy_word_lists(list(tok.get_vocab()))
    xs = {}
    for li in X.LAYERS:
        rt.adapter.module.layer(li).w_beta.register_forward_hook(
            lambda m, i, o, li=li: xs.__setitem__(li, i[0].detach()[0]))
    pool, questions = FA.chat_source("heldout")
    conv = FA.fit_conversation(random.Random("att28:heldout:0"), pool, words, "heldout", 0)
    turns = E.session_turns({"conversation": D.locomo_layout(conv)[0]})
    slots = {li: rt.adapter.config.layers.index(li) for li in X.LAYERS}
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
        n = len(plan.prompt) - 1
        cache = DynamicCache()
        _, state, _ = rt.forward(torch.tensor([plan.prompt[:n]]), plan.initial_state[None],
                                 mask[:, :n], past_key_values=cache)
        q = {"kv": [(lay.keys.half(), lay.values.half()) for lay in cache.layers],
             "state": state[0], "n": n, "tail": ids[n:],
             "px": {li: xs[li][plan.write_start:n].half() for li in X.LAYERS}}
        chat = {"hx": {li: x.half() for li, x in hx.items()}}
        states, _ = X.copy_states(rt, chat, q)
        for li, s in zip(X.LAYERS, states, strict=True):
            ref = state[0, slots[li], X.H0:X.H1]
            print(f"layer {li}: copy state relative error {float((s - ref).norm() / ref.norm()):.2e}")
        _, ok, _, _ = X.tail_loss(rt, chat, q, slots, False)
        # the tail's logits themselves, as tail_loss computes them
        full = q["state"].clone()
        for li, s in zip(X.LAYERS, states, strict=True):
            full[slots[li], X.H0:X.H1] = s
        cache = DynamicCache()
        for i, (k, v) in enumerate(q["kv"]):
            cache.update(k.float(), v.float(), i)
        tail = torch.tensor([q["tail"]])
        tail_logits, _, _ = rt.forward(tail, full[None], torch.ones_like(tail, dtype=torch.bool),
                                       past_key_values=cache)
        ref = full_logits[0, n:]
        print(f"tail logits: max |Δ| {float((tail_logits[0] - ref).abs().max()):.4f} "
              f"(largest logit {float(ref.abs().max()):.1f}); same argmax "
              f"{bool((tail_logits[0].argmax(-1) == ref.argmax(-1)).all())}; answer exact {ok}")


if __name__ == "__main__":
    main()
