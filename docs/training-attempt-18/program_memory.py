"""Attempt 18: a fifth state head whose addressing, gates, values and read-out are fitted in
closed form (linear probes and ridge regressions), not learned by gradient.

Attempt 17 showed that the heads hold the facts' values but that no query points at the asked
fact (16-22% against 19% by chance). Here the slow head is programmed:

- keys: at a fact's value tokens, k̂ = the code of the fact's slot (pet, city, ...; 10 codes
  of low coherence in R^8); queries: at the positions that start and continue the answer,
  q̂ = the code of the asked slot. Ridge regressions on the layer's δ-mem input x onto
  atanh(code), which tanh + L2 normalisation turn back into the code.
- gates: a logistic probe for value tokens (as attempt 17), β = BETA_POS on them, BETA_NEG
  elsewhere, every row alike, so that the state along a slot's key is a decayed bag of the
  value's tokens.
- values and read-out, in the last READ_LAYERS layers only: v̂ = the token's own unembedding
  direction (final-norm weight ⊙ embedding) projected on 8 principal directions of word
  tokens, a different 8 per layer; B_o maps them back, times a gain. The read at the answer
  then adds the stored value's tokens to the residual stream, which raises their logits.

A one-off (not project code), kept as the record of how attempt 18 was made.

    PYTHONPATH=. .venv/bin/python docs/training-attempt-18/program_memory.py IN OUT \
        [--gains G ...] [--paraphrases] [--basis pca|class] [--save-gain G]

The first run (program_run.log) was the defaults with --gains 1 3 10 30 100; attempt 19's
start was --paraphrases --basis class --gains --save-gain 1 (no evaluation).
"""

import argparse
import dataclasses
import json
import random
import time

import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem.adapter import load_adapter, save_adapter, widen_state_heads
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder, make_batch

BETA_POS = 0.12
BETA_NEG = 1e-4
READ_LAYERS = 16
FIT_CHATS = 120
EVAL_EPISODES = 96
RIDGE = 1e-2  # relative to the mean eigenvalue of XᵀX
DIFF = dataclasses.replace(D.STAGES[5], n_chatter=(10, 20))
# More ways to ask, for the query fit only (training side; none is a held-out template): with
# the split's two templates a slot, the query regression learns the templates' words.
EXTRA_QUESTIONS = {
    "pet": ["What did {p} name the pet?", "Tell me the name of {p}'s pet.",
            "{p}'s pet goes by what name?", "What do they call {p}'s dog?"],
    "city": ["What city does {p} call home?", "Where is {p} based?",
             "Name the city where {p} lives.", "Which town is {p} living in now?"],
    "job": ["What is {p}'s occupation?", "What kind of work does {p} do?",
            "What is {p}'s line of work?", "How does {p} earn a living?"],
    "food": ["What does {p} like to eat most?", "Which dish is {p}'s favourite?",
             "What is {p}'s favourite meal?", "What food does {p} enjoy the most?"],
    "hobby": ["What does {p} do for fun?", "What pastime does {p} have?",
              "Which hobby does {p} enjoy?", "How does {p} spend free time?"],
    "instrument": ["What instrument is {p} learning to play?",
                   "Which instrument does {p} practise?", "What does {p} play, musically?",
                   "Name the instrument {p} is learning."],
    "trip": ["Which country is {p} travelling to?", "Where is {p} going on the trip?",
             "What is {p}'s travel destination?", "Which country will {p} visit next?"],
    "birthday": ["When does {p} celebrate a birthday?", "What is {p}'s date of birth?",
                 "On which day is {p}'s birthday?", "What day was {p} born on?"],
    "sibling": ["Who is the sister of {p}?", "What is the name of {p}'s sibling?",
                "What is {p}'s sister named?", "Tell me the name of {p}'s sister."],
    "event": ["What event did {p} attend?", "What did {p} go to last weekend?",
              "Which event did {p} go to?", "What was the event {p} went to?"],
}


def slot_codes(n: int, r: int, seed: int = 0) -> torch.Tensor:
    """n unit vectors in R^r with small pairwise |cos| (a few hundred Adam steps)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, r, generator=g, requires_grad=True)
    opt = torch.optim.Adam([c], lr=0.05)
    for _ in range(500):
        u = torch.nn.functional.normalize(c, dim=-1)
        gram = u @ u.T - torch.eye(n)
        loss = (gram ** 8).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    u = torch.nn.functional.normalize(c.detach(), dim=-1)
    return u


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = RIDGE) -> torch.Tensor:
    """W (out, in) minimising |x Wᵀ - y|² + λ' |W|², x (n, in) float64."""
    xtx = x.T @ x
    reg = lam * xtx.diagonal().mean()
    w = torch.linalg.solve(xtx + reg * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return w.T


def unembedding(rt, dtype) -> torch.Tensor:
    """u (vocab, d): the logit of token y is u_y · h / rms(h), u = final-norm weight ⊙ E."""
    m = rt.model.model
    return m.embed_tokens.weight.detach().to(dtype) * m.norm.weight.detach().to(dtype)


def word_basis(tok, u: torch.Tensor, words) -> torch.Tensor:
    """Principal directions (rows) of u over the copy words (single-token words)."""
    ids = [i for i in tok.convert_tokens_to_ids(["Ġ" + w for w in words["cap"] + words["low"]])
           if i is not None]
    return torch.linalg.svd(u[ids] - u[ids].mean(0), full_matrices=False)[2]


def value_basis(tok, u: torch.Tensor) -> torch.Tensor:
    """Principal directions (rows) of the unembedding directions u of the train split's value
    tokens (every token of every value, with a leading space as stated), centred within each
    slot: what tells one city from another, not cities from dates. Held-out values are other
    words of the same kinds."""
    pool = D.pools("train")
    rows = []
    for vals in pool.values.values():
        ids = sorted({i for v in vals for i in tok(" " + v, add_special_tokens=False).input_ids})
        rows.append(u[ids] - u[ids].mean(0))
    return torch.linalg.svd(torch.cat(rows).double(), full_matrices=False)[2].to(u.dtype)


def value_spans(tok, ids, values):
    spans = []
    for v in values:
        vi = tok(" " + v, add_special_tokens=False).input_ids
        spans += [(j, j + len(vi)) for j in range(len(ids) - len(vi) + 1)
                  if ids[j:j + len(vi)] == vi]
    return spans


class Inputs:
    """Collects each wrapped layer's δ-mem input x (what w_beta reads) during a forward."""

    def __init__(self, layers):
        self.xs: list[torch.Tensor] = []
        self.hooks = [m.w_beta.register_forward_hook(
            lambda mod, i, o: self.xs.append(i[0].detach()[0].float())) for m in layers]

    def remove(self):
        for h in self.hooks:
            h.remove()


def fit_chat(rt, tok, enc, inp, pool, words, seed: str, copy: bool):
    """A train-split chat for a fit and its history pass: (rng, conversation, messages, ids,
    each token's slot label (-1: not a fact's value), final state); `inp` then holds each
    layer's x. copy: open-class values are random words, as in training; else pool values."""
    slots = list(D.SLOTS)
    rng = random.Random(seed)
    conv = D.generate_conversation(rng, pool, DIFF, words if copy else None,
                                   1.0 if copy else 0.0, 0.5)
    hist = D.conversation_messages(conv)
    ids = enc.ids(hist)
    label = torch.full((len(ids),), -1)
    for fact in conv.facts:
        for a, b in value_spans(tok, ids, [fact.value, *fact.history]):
            label[a:b] = slots.index(fact.slot)
    inp.xs.clear()
    with torch.no_grad():
        _, state, _ = rt.forward(torch.tensor([ids]), None,
                                 torch.ones(1, len(ids), dtype=torch.bool))
    return rng, conv, hist, ids, label, state


def collect(rt, tok, enc, layers, words, paraphrases: bool = False):
    """Per layer: x at value tokens (slot label), at other tokens (sampled), and at the read
    positions of questions (asked slot); plus the token ids of the value/other samples.
    paraphrases: ask with EXTRA_QUESTIONS too (address_data.py; program_run.log is without)."""
    slots = list(D.SLOTS)
    L = len(layers)
    hist_x = [[] for _ in range(L)]
    hist_slot, hist_id = [], []
    read_x = [[] for _ in range(L)]
    read_slot = []
    inp = Inputs(layers)
    pool = D.pools("train")
    t0 = time.time()
    for c in range(FIT_CHATS):
        rng, conv, hist, ids, label, state = fit_chat(rt, tok, enc, inp, pool, words,
                                                      f"program-memory:{c}", c % 2 == 0)
        keep = (label >= 0) | (torch.rand(len(ids)) < 0.12)
        for li, x in enumerate(inp.xs):
            hist_x[li].append(x[keep])
        hist_slot.append(label[keep])
        hist_id.append(torch.tensor(ids)[keep])
        for fact in conv.facts:
            extra = EXTRA_QUESTIONS[fact.slot] if paraphrases else []
            question = rng.choice(pool.question[fact.slot] + extra).format(p=fact.person)
            ep = D.Episode(hist, question, fact.value, fact.category, fact.slot)
            context = rng.choice([0, min(D.messages_after_fact(ep), 6)])
            r_ids, _, a_start = enc.read(ep, context)
            lo, hi = a_start - 4, len(r_ids) - 1  # the generation prompt and the answer
            inp.xs.clear()
            with torch.no_grad():
                rt.forward(torch.tensor([r_ids]), state, torch.zeros(1, len(r_ids),
                                                                     dtype=torch.bool))
            for li, x in enumerate(inp.xs):
                read_x[li].append(x[lo:hi])
            read_slot.append(torch.full((hi - lo,), slots.index(fact.slot)))
        if c % 20 == 19:
            print(f"  {c + 1} chats, {time.time() - t0:.0f} s", flush=True)
    inp.remove()
    return ([torch.cat(x).double() for x in hist_x], torch.cat(hist_slot),
            torch.cat(hist_id), [torch.cat(x).double() for x in read_x], torch.cat(read_slot))


def fit_gate(x, y):
    """Logistic probe (value token or not) on standardised x -> (w, b) on raw x."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-3)
    z = ((x - mu) / sd).float()
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    yf = y.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, yf) \
            + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logit = z @ w + b
        pos_m, neg_m = logit[y].median(), logit[~y].quantile(0.99)
        lo_t, hi_t = torch.logit(torch.tensor(BETA_NEG)), torch.logit(torch.tensor(BETA_POS))
        s = (hi_t - lo_t) / (pos_m - neg_m).clamp_min(1e-3)
        c = hi_t - s * pos_m
        acc = ((logit > 0) == y).float().mean()
    return (s * w / sd.float()), c + s * (b - (w * mu.float() / sd.float()).sum()), float(acc)


def program(ad, rt, tok, enc, words, paraphrases=False, basis_kind="pca"):
    cfg = ad.config
    H, r = cfg.num_state_heads, cfg.rank
    rows = slice((H - 1) * r, H * r)
    layers = list(rt.adapter.module.layers.values())
    L = len(layers)
    codes = slot_codes(len(D.SLOTS), r).double()
    print("slot codes: max |cos|", float((codes @ codes.T - torch.eye(len(codes))).abs().max()))
    print(f"collecting inputs over {FIT_CHATS} training chats")
    hx, hslot, hid, rx, rslot = collect(rt, tok, enc, layers, words, paraphrases)
    print(f"{len(hslot)} history tokens ({int((hslot >= 0).sum())} value tokens), "
          f"{len(rslot)} read positions")
    target = torch.atanh(0.9 * codes / codes.abs().max(1, keepdim=True).values)
    u = unembedding(rt, torch.float64)
    vt = value_basis(tok, u) if basis_kind == "class" else word_basis(tok, u, words)
    val = hslot >= 0
    perm = torch.randperm(len(rslot), generator=torch.Generator().manual_seed(1))
    tr, te = perm[:int(0.8 * len(perm))], perm[int(0.8 * len(perm)):]
    stats = []
    with torch.no_grad():
        for li, layer in enumerate(layers):
            x, xr = hx[li], rx[li]
            wk = ridge(x[val], target[hslot[val]])
            wq = ridge(xr[tr], target[rslot[tr]])
            # How often the fitted query's nearest code is the asked slot (held-out positions),
            # and the key's nearest code the value's slot.
            q_acc = float(((torch.tanh(xr[te] @ wq.T) @ codes.T).argmax(1) == rslot[te])
                          .float().mean())
            k_acc = float(((torch.tanh(x[val] @ wk.T) @ codes.T).argmax(1) == hslot[val])
                          .float().mean())
            wb, bb, g_acc = fit_gate(x, val)
            layer.w_k.weight[rows] = wk.float()
            layer.w_q.weight[rows] = wq.float()
            layer.w_beta.weight[rows] = wb.unsqueeze(0).expand(r, -1)
            layer.w_beta.bias[rows] = bb
            j = li - (L - READ_LAYERS)
            if j >= 0:
                basis = vt[r * j:r * (j + 1)]  # (r, d)
                wv = ridge(x, u[hid] @ basis.T)
                pred = x @ wv.T
                y = u[hid] @ basis.T
                r2 = 1 - float(((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
                layer.w_v.weight[rows] = wv.float()
                layer.b_o.weight[:, rows] = basis.T.float()
            else:
                r2 = float("nan")
                layer.b_o.weight[:, rows] = 0
            layer.b_q.weight[:, rows] = 0
            stats.append({"layer": li, "query_slot_acc": q_acc, "key_slot_acc": k_acc,
                          "gate_acc": g_acc, "value_r2": r2})
            print(f"layer {li:2d}: query→slot {q_acc:.3f}  key→slot {k_acc:.3f}  "
                  f"gate {g_acc:.3f}  value R² {r2:.3f}", flush=True)
    return stats


def set_gain(rt, gain: float, H: int, r: int):
    """Scale the slow head's read-out to `gain` times the unit basis it was set to."""
    rows = slice((H - 1) * r, H * r)
    for layer in rt.adapter.module.layers.values():
        w = layer.b_o.weight[:, rows]
        n = w.norm(dim=0, keepdim=True)
        with torch.no_grad():
            layer.b_o.weight[:, rows] = torch.where(n > 0, w / n.clamp_min(1e-12) * gain, w)


def evaluate(rt, enc, n: int = EVAL_EPISODES):
    """Held-out stage-5 episodes with the asked fact outside the read pass's window (at most
    6 messages, the ones after the fact): teacher-forced exact match and first-token accuracy,
    by the state only."""
    eps = [D.make_episode("heldout", 77, i, DIFF) for i in range(n)]
    ctx = [min(D.messages_after_fact(ep), 6) for ep in eps]
    exact, first = [], []
    with torch.no_grad():
        for i in range(0, n, 8):
            b = make_batch(enc, eps[i:i + 8], contexts=ctx[i:i + 8])
            _, state, _ = rt.forward(b["h_ids"], None, b["h_mask"])
            logits, _, _ = rt.forward(b["r_ids"], state, b["r_mask"])
            labels = b["labels"]
            sel = labels != -100
            hit = logits.argmax(-1) == labels
            exact += (hit | ~sel).all(1).float().tolist()
            first += hit[sel & (sel.cumsum(1) == 1)].float().tolist()
    return {"exact": sum(exact) / n, "first_token": sum(first) / n, "n": n}


def best_gain(rt, enc, set_gain, gains, episodes: int, t0: float | None = None) -> float:
    """Evaluate (see `evaluate`) with the read-out silent (gain 0) and at each gain, set by
    `set_gain(gain)`; the best gain by exact match, then first-token accuracy, then the larger
    gain. Used by attempts 19 and 20."""
    best = (-1.0, -1.0, 0.0)
    for gain in [0.0, *gains]:
        set_gain(gain)
        res = evaluate(rt, enc, episodes)
        took = f"  ({time.time() - t0:.0f} s)" if t0 is not None else ""
        print(f"gain {gain}: {res}{took}", flush=True)
        if (res["exact"], res["first_token"], gain) > best:
            best = (res["exact"], res["first_token"], gain)
    return best[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--gains", type=float, nargs="*", default=[1.0, 3.0, 10.0])
    ap.add_argument("--paraphrases", action="store_true")
    ap.add_argument("--basis", choices=("pca", "class"), default="pca")
    ap.add_argument("--save-gain", type=float, default=None,
                    help="the read-out gain saved (default: the best evaluated one)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    words = D.copy_word_lists(list(tok.get_vocab()))
    ad = load_adapter(args.src)
    if ad.config.num_state_heads == 4:
        ad = widen_state_heads(ad, 5)
    rt = DeltaMemHF.from_pretrained(md, adapter=ad)
    H, r = ad.config.num_state_heads, ad.config.rank
    report = {"beta_pos": BETA_POS, "beta_neg": BETA_NEG, "read_layers": READ_LAYERS,
              "fit_chats": FIT_CHATS, "paraphrases": args.paraphrases, "basis": args.basis}
    t0 = time.time()
    if args.gains:
        set_gain(rt, 0.0, H, r)
        report["before"] = evaluate(rt, enc)
        print("before (slow head silent):", report["before"], f"{time.time() - t0:.0f} s",
              flush=True)
    report["layers"] = program(ad, rt, tok, enc, words, args.paraphrases, args.basis)
    best = (-1.0, -1.0, 0.0)
    report["gains"] = {}
    for gain in args.gains:
        set_gain(rt, gain, H, r)
        res = evaluate(rt, enc)
        report["gains"][str(gain)] = res
        print(f"gain {gain}: {res}", flush=True)
        if (res["exact"], res["first_token"]) > best[:2]:
            best = (res["exact"], res["first_token"], gain)
    if args.gains and (report["before"]["exact"], report["before"]["first_token"]) >= best[:2]:
        best = (0, 0, 0.0)
    gain = args.save_gain if args.save_gain is not None else best[2]
    print("saved gain", gain)
    set_gain(rt, gain, H, r)
    report["chosen_gain"] = gain
    save_adapter(rt.adapter, args.dst, {"programmed": "slow head fitted in closed form "
                                                      "(docs/training-attempt-18)"})
    with open(f"{args.dst}/program_report.json", "w") as f:
        json.dump(report, f, indent=1)
    print("saved", args.dst)


if __name__ == "__main__":
    main()
