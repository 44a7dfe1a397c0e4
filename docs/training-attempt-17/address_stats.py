"""Does a head's query where the answer starts point at the asked fact's keys? For held-out
stage-5 chats (10-20 chatter turns), each fact is asked in turn. The query is taken at the
last token of [system, question, generation prompt], the position whose read starts the
answer. For each head and layer, we count how often the asked fact's value tokens have the
highest mean k̂·q̂ among the chat's facts. Chance is 1 / facts. A one-off (not project code).

    PYTHONPATH=. .venv/bin/python docs/training-attempt-17/address_stats.py ADAPTER
"""

import dataclasses
import random
import sys

import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem.adapter import load_adapter
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder


def main(path: str, chats: int = 16) -> None:
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    diff = dataclasses.replace(D.STAGES[5], n_chatter=(10, 20))
    ad = load_adapter(path)
    rt = DeltaMemHF.from_pretrained(md, adapter=ad, dtype=torch.bfloat16)
    H = ad.config.num_state_heads
    layers = list(rt.adapter.module.layers.values())
    xs: list[torch.Tensor] = []
    for layer in layers:
        layer.w_beta.register_forward_hook(lambda m, i, o: xs.append(i[0].detach()))
    pool = D.pools("heldout")
    hits = torch.zeros(len(layers), H)
    n, chance = 0, 0.0

    def inputs(ids):
        xs.clear()
        with torch.no_grad():
            rt.forward(torch.tensor([ids]), None, torch.ones(1, len(ids), dtype=torch.bool))
        return list(xs)

    for c in range(chats):
        rng = random.Random(f"address:{c}")
        conv = D.generate_conversation(rng, pool, diff)
        ids = enc.ids(D.conversation_messages(conv))
        spans = []
        for fact in conv.facts:
            vi = tok(" " + fact.value, add_special_tokens=False).input_ids
            pos = [j for j in range(len(ids) - len(vi) + 1) if ids[j:j + len(vi)] == vi]
            spans.append((pos[-1], pos[-1] + len(vi)) if pos else None)
        found = sum(s is not None for s in spans)
        if found < 2:
            continue
        keys = [layer.project(x[0]).k for layer, x in zip(layers, inputs(ids), strict=True)]
        for fi, fact in enumerate(conv.facts):
            if spans[fi] is None:
                continue
            q_ids = enc.ids([{"role": "system", "content": D.SYSTEM_PROMPT},
                             {"role": "user", "content": D.question_for(fact, pool, rng)}],
                            generation_prompt=True)
            for li, (layer, x) in enumerate(zip(layers, inputs(q_ids), strict=True)):
                q = layer.project(x[0][-1:]).q[0]  # (H, r)
                scores = torch.stack([
                    torch.full((H,), -9.0) if s is None
                    else (keys[li][s[0]:s[1]] * q).sum(-1).mean(0) for s in spans])
                hits[li] += (scores.argmax(0) == fi).float()
            n += 1
            chance += 1 / found
    print(f"{path}: {n} questions, chance {chance / n:.2f}")
    print("layer " + " ".join(f"head {h}" for h in range(H)))
    for li in range(0, len(layers), 3):
        print(f"{li:5d} " + " ".join(f"{hits[li, h] / n:6.2f}" for h in range(H)))
    print("mean  " + " ".join(f"{hits[:, h].mean() / n:6.2f}" for h in range(H)))


if __name__ == "__main__":
    main(sys.argv[1])
