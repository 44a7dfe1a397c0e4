"""Attempt 19, step 1: can a read that the backbone's own later layers decode name the answer?
Attempt 18's oracle pushed the answer's unembedding direction onto the late layers' output and
found 8 numbers a layer too few. Here the oracle imitates a copying attention head instead: at
the position that starts the answer, layer L's attention output gets c · P Pᵀ OV_L(x_y), where
x_y is layer L's attention input at the fact's value's first token in the history pass and
OV_L(x) = o_proj(every query head's value of x) is what layer L's attention would write if all
its heads attended to that token alone. P is the layer's top-R principal directions of OV_L(x)
over the train split's value tokens ("full": no projection), so R numbers a layer: R = 8 is
what one state head's read carries, and B_o W_v can express exactly P Pᵀ OV_L. Held-out stage-5
episodes, read window up to 6 messages after the fact; attempt 12's heads stay on.
A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18 .venv/bin/python \
        docs/training-attempt-19/oracle_copy.py [N]
"""

import sys
import time

import program_memory as P
import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem import scan
from deltamem.adapter import load_adapter
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder

LAYER_SETS = {"4-11": range(4, 12), "8-15": range(8, 16), "12-19": range(12, 20),
              "16-23": range(16, 24), "4-23": range(4, 24)}
RANKS = ("full", 64, 16, 8)
CS = (0.5, 1.0, 2.0, 4.0)


def ov_matrix(attn, n_heads: int, n_kv: int) -> torch.Tensor:
    """(d, d) map x -> o_proj(concat over query heads of their kv head's value of x)."""
    wv = attn.v_proj.weight.detach().float()  # (n_kv*hd, d)
    hd = wv.shape[0] // n_kv
    rep = torch.cat([wv[(h // (n_heads // n_kv)) * hd:(h // (n_heads // n_kv) + 1) * hd]
                     for h in range(n_heads)])  # (n_heads*hd, d)
    wo = getattr(attn.o_proj, "base", attn.o_proj).weight.detach().float()  # (d, n_heads*hd)
    return wo @ rep


def history_x(rt, enc, layers, ep):
    inp = P.Inputs(layers)
    ids = enc.history(ep)
    with torch.no_grad():
        _, st, _ = rt.forward(torch.tensor([ids]), None,
                              torch.ones(1, len(ids), dtype=torch.bool))
    inp.remove()
    return ids, st, inp.xs


def main(n: int = 48) -> None:
    scan.USE_CPU_KERNEL = False  # numba slows later torch work (attempt 18)
    torch.manual_seed(0)
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    rt = DeltaMemHF.from_pretrained(
        md, adapter=load_adapter("deltamem/adapters/smollm2-135m-instruct"))
    cfg = rt.model.config
    blocks = rt.model.model.layers
    layers = list(rt.adapter.module.layers.values())
    ov = [ov_matrix(b.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads)
          for b in blocks]
    t0 = time.time()
    # Bases: principal directions of OV_L(x) at the train split's value tokens.
    vals = [[] for _ in blocks]
    for i in range(40):
        ep = D.make_episode("train", 5, i, P.DIFF)
        ids, _, xs = history_x(rt, enc, layers, ep)
        spans = P.value_spans(tok, ids, [ep.answer])
        pos = sorted({j for a, b in spans for j in range(a, b)})
        for li, x in enumerate(xs):
            vals[li].append(x[pos] @ ov[li].T)
    basis = []
    for v in vals:
        v = torch.cat(v).double()
        # Uncentred: B_o W_v is linear with no bias, so the mean is part of what it carries.
        basis.append(torch.linalg.svd(v, full_matrices=False)[2].float())
    print(f"bases from {len(torch.cat(vals[0]))} value tokens, {time.time() - t0:.0f} s",
          flush=True)
    cases = []
    for i in range(n):
        ep = D.make_episode("heldout", 77, i, P.DIFF)
        ids, st, xs = history_x(rt, enc, layers, ep)
        spans = P.value_spans(tok, ids, [ep.answer])
        a0 = spans[-1][0]  # the current value's last mention, its first token
        r_ids, _, a = enc.read(ep, min(D.messages_after_fact(ep), 6))
        cases.append((st, r_ids[:a], r_ids[a], [xs[li][a0] @ ov[li].T
                                                for li in range(len(blocks))]))
    cur: dict = {}

    def hook(li):
        def add(_mod, _inp, out):
            if li not in cur:
                return out
            out = out.clone()
            out[0, -1] += cur[li].to(out.dtype)
            return out
        return add

    for li, b in enumerate(blocks):
        b.self_attn.o_proj.register_forward_hook(hook(li))

    def run(push) -> int:
        hit = 0
        for st, prompt, y, o in cases:
            cur.clear()
            cur.update(push(o))
            with torch.no_grad():
                logits, _, _ = rt.forward(torch.tensor([prompt]), st,
                                          torch.zeros(1, len(prompt), dtype=torch.bool))
            hit += int(logits[0, -1].argmax() == y)
        cur.clear()
        return hit

    print(f"no oracle: first answer token {run(lambda o: {})}/{n}", flush=True)
    for name, ls in LAYER_SETS.items():
        for rank in RANKS:
            res = []
            for c in CS:
                def push(o, ls=ls, rank=rank, c=c):
                    if rank == "full":
                        return {li: c * o[li] for li in ls}
                    return {li: c * basis[li][:rank].T @ (basis[li][:rank] @ o[li])
                            for li in ls}
                res.append(f"c={c}: {run(push)}")
            print(f"layers {name} rank {rank}: " + ", ".join(res) + f"  (/{n}, "
                  f"{time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
