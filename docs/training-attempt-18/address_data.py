"""Attempt 18, step 2: the δ-mem inputs x that the addressing fit and its held-out check need,
saved once (the slow head is silent here, so x does not depend on its write side).

Train: program_memory.collect with the extra question paraphrases. Held-out: 64 stage-5
episodes (10-20 chatter turns), for each fact of the chat x at its value's last statement, and
x at the last 4 prompt positions of the read pass (window: up to 6 messages after the fact).
A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18 .venv/bin/python \
        docs/training-attempt-18/address_data.py OUT.pt
"""

import random
import sys

import program_memory as P
import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem.adapter import load_adapter, widen_state_heads
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder


def main(out: str) -> None:
    torch.manual_seed(0)
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    words = D.copy_word_lists(list(tok.get_vocab()))
    ad = widen_state_heads(load_adapter("deltamem/adapters/smollm2-135m-instruct"), 5)
    rt = DeltaMemHF.from_pretrained(md, adapter=ad)
    layers = list(rt.adapter.module.layers.values())
    train = P.collect(rt, tok, enc, layers, words, paraphrases=True)
    inp = P.Inputs(layers)
    pool = D.pools("heldout")
    held = []
    for i in range(64):
        # make_episode's own stream, replayed to get the chat's facts.
        rng = random.Random(f"deltamem-episode:heldout:77:{i}")
        conv = D.generate_conversation(rng, pool, P.DIFF, None, 0.0, 0.0)
        fact = rng.choice(conv.facts)
        ep = D.make_episode("heldout", 77, i, P.DIFF)
        assert ep.answer == fact.value, "make_episode's stream changed: the replay is stale"
        ids = enc.history(ep)
        inp.xs.clear()
        with torch.no_grad():
            _, st, _ = rt.forward(torch.tensor([ids]), None,
                                  torch.ones(1, len(ids), dtype=torch.bool))
        hx = [x.clone() for x in inp.xs]
        spans = []
        for f in conv.facts:
            sp = P.value_spans(tok, ids, [f.value])
            spans.append(sp[-1] if sp else None)
        r_ids, _, a = enc.read(ep, min(D.messages_after_fact(ep), 6))
        inp.xs.clear()
        with torch.no_grad():
            rt.forward(torch.tensor([r_ids]), st, torch.zeros(1, len(r_ids), dtype=torch.bool))
        held.append({"spans": [None if s is None else [x[s[0]:s[1]] for x in hx]
                               for s in spans],
                     "read": [x[a - 4:a].clone() for x in inp.xs],
                     "asked": conv.facts.index(fact), "slots": [f.slot for f in conv.facts]})
    torch.save({"train": train, "held": held}, out)
    print("saved", out)


if __name__ == "__main__":
    main(sys.argv[1])
