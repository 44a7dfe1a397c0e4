"""Attempt 18, step 4: could any read-out of the slow head make the model say the answer?
An oracle skips the memory: at the position that starts the answer, each of the last K
layers' attention output gets c times the answer's first token's unembedding direction
u_y = (final-norm weight ⊙ embedding)_y, either whole ("full") or projected on 8 directions
per layer, which is all one state head's read (8 numbers) can carry: "pca", principal
directions of word tokens, as program_memory.py's first run; "random", a random orthonormal
basis; "class", program_memory.value_basis, the principal directions of the train split's
value tokens centred within each slot. "classM": the first M of those at each of the K layers
alike, to count how many dimensions naming a token takes. Held-out
stage-5 episodes, window up to 6 messages after the fact; attempt 12's heads stay on.
A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18 .venv/bin/python \
        docs/training-attempt-18/oracle_readout.py MODE K C...
"""

import sys

import program_memory as P
import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem.adapter import load_adapter
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder


def main(mode: str, k: int, cs: list[float], n: int = 48) -> None:
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    words = D.copy_word_lists(list(tok.get_vocab()))
    rt = DeltaMemHF.from_pretrained(
        md, adapter=load_adapter("deltamem/adapters/smollm2-135m-instruct"))
    u = P.unembedding(rt, torch.float32)
    if mode.startswith("class"):
        basis = P.value_basis(tok, u)
    elif mode == "random":
        basis = torch.linalg.qr(torch.randn(u.shape[1], u.shape[1],
                                            generator=torch.Generator().manual_seed(0)))[0].T
    else:
        basis = P.word_basis(tok, u, words)
    n_layers = len(rt.model.model.layers)
    cur: dict = {}

    def hook(j):
        # "classM": every layer the same M directions, to count the dimensions naming takes.
        b = basis[:int(mode[5:])] if mode[5:] else basis[8 * j:8 * (j + 1)]

        def add(_mod, _inp, out):
            if not cur:
                return out
            out = out.clone()
            out[0, -1] += cur["c"] * (cur["u"] if mode == "full" else b.T @ (b @ cur["u"]))
            return out
        return add

    for j, li in enumerate(range(n_layers - k, n_layers)):
        rt.model.model.layers[li].self_attn.o_proj.register_forward_hook(hook(j))
    cases = []
    for i in range(n):
        ep = D.make_episode("heldout", 77, i, P.DIFF)
        ids = enc.history(ep)
        with torch.no_grad():
            _, st, _ = rt.forward(torch.tensor([ids]), None,
                                  torch.ones(1, len(ids), dtype=torch.bool))
        r_ids, _, a = enc.read(ep, min(D.messages_after_fact(ep), 6))
        cases.append((st, r_ids[:a], r_ids[a]))
    for c in [0.0, *cs]:
        hit = 0
        for st, prompt, y in cases:
            cur.clear()
            if c:
                cur.update(c=c, u=u[y])
            with torch.no_grad():
                logits, _, _ = rt.forward(torch.tensor([prompt]), st,
                                          torch.zeros(1, len(prompt), dtype=torch.bool))
            hit += int(logits[0, -1].argmax() == y)
        print(f"{mode} K={k} c={c}: first answer token {hit}/{n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3:]])
