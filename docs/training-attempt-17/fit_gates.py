"""Attempt 17's start: the slow (last) state head's write gates fitted as a linear probe.

In every layer, a logistic regression on the layer's δ-mem input x (what w_beta reads) tells
the tokens of a stated fact's value from the rest (train split, stage 5 with 10-20 chatter
turns, random-word values as in training). Each of the slow head's 8 gate rows gets that
probe, scaled so that β ≈ 0.001 at the negatives' median logit and 0.05-0.5 (one value per
row) at the positives': the head writes the values and keeps them. Everything else is the
input adapter's. A one-off (not project code), kept as the record of how attempt 17 began.

    PYTHONPATH=. .venv/bin/python docs/training-attempt-17/fit_gates.py IN_ADAPTER OUT_ADAPTER
"""

import dataclasses
import random
import sys

import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem.adapter import load_adapter, save_adapter
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder

# β on a value token, one per row of the slow head. The delta rule decays a whole row at
# every write, so rows with a gentle β keep many facts weakly, rows with a strong one the
# last few clearly.
BETA_POS = [0.05, 0.08, 0.12, 0.18, 0.25, 0.33, 0.42, 0.5]
BETA_NEG = 0.001


def main(src: str, dst: str, episodes: int = 96) -> None:
    torch.manual_seed(0)
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    words = D.copy_word_lists(list(tok.get_vocab()))
    diff = dataclasses.replace(D.STAGES[5], n_chatter=(10, 20))
    ad = load_adapter(src)
    rt = DeltaMemHF.from_pretrained(md, adapter=ad, dtype=torch.bfloat16)
    layers = list(rt.adapter.module.layers.values())
    H, r = ad.config.num_state_heads, ad.config.rank
    xs: list[torch.Tensor] = []
    hooks = [layer.w_beta.register_forward_hook(
        lambda m, i, o: xs.append(i[0].detach().float())) for layer in layers]
    X: list[list[torch.Tensor]] = [[] for _ in layers]
    Y = []
    for e in range(episodes):
        conv = D.generate_conversation(random.Random(f"fit-gates:{e}"), D.pools("train"),
                                       diff, words, 1.0, 0.5)
        ids = enc.ids(D.conversation_messages(conv))
        label = torch.zeros(len(ids), dtype=torch.bool)
        for fact in conv.facts:
            for value in [fact.value, *fact.history]:
                vi = tok(" " + value, add_special_tokens=False).input_ids
                for j in range(len(ids) - len(vi) + 1):
                    if ids[j:j + len(vi)] == vi:
                        label[j:j + len(vi)] = True
        keep = label | (torch.rand(len(ids)) < 0.15)  # all positives, 15% of the rest
        xs.clear()
        with torch.no_grad():
            rt.forward(torch.tensor([ids]), None, torch.ones(1, len(ids), dtype=torch.bool))
        for li, x in enumerate(xs):
            X[li].append(x[0][keep])
        Y.append(label[keep])
    for h in hooks:
        h.remove()
    y = torch.cat(Y).float()
    print(f"{len(y)} tokens, {int(y.sum())} positives")
    perm = torch.randperm(len(y))
    train, test = perm[:int(0.8 * len(y))], perm[int(0.8 * len(y)):]
    lo_t = torch.logit(torch.tensor(BETA_NEG))
    for li, layer in enumerate(layers):
        x = torch.cat(X[li])
        mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
        z = (x - mu) / sd
        w = torch.zeros(z.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure(z=z, w=w, b=b, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                z[train] @ w + b, y[train]) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            logit = z @ w + b
            acc = ((logit[test] > 0).float() == y[test]).float().mean()
            pos_m, neg_m = logit[y.bool()].median(), logit[~y.bool()].median()
            for j, bp in enumerate(BETA_POS):
                hi_t = torch.logit(torch.tensor(bp))
                s = (hi_t - lo_t) / (pos_m - neg_m).clamp_min(1e-3)
                c = hi_t - s * pos_m
                row = (H - 1) * r + j
                layer.w_beta.weight[row] = (s * w / sd).to(layer.w_beta.weight.dtype)
                layer.w_beta.bias[row] = (c + s * (b - (w * mu / sd).sum())).to(
                    layer.w_beta.bias.dtype)
        if li % 5 == 0:
            print(f"layer {li}: held-out accuracy {acc:.3f}, "
                  f"median logit positives {pos_m:.2f}, negatives {neg_m:.2f}")
    save_adapter(rt.adapter, dst, {"gates_fitted": "slow head's w_beta: a linear probe for "
                                                   "fact values (docs/training-attempt-17)"})
    print("saved", dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
