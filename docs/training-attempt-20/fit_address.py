"""Attempt 20: the copy heads' addressing and gates fitted through the delta rule itself.

Attempt 19's copy heads say a value of the conversation, mostly the wrong one. Their keys and
queries were ridge probes of the fact's slot, fitted token by token, and their gate wrote at
β 0.12. The state update decays a row by (1 - β) at every write, so with ~15 value tokens
after it an early fact keeps 0.88^15 ≈ 15% of its weight against the latest fact's 100%:
the read is dominated by recent facts, whatever the address. Here the write side is fitted
on the quantity that matters, the read at the answer after the whole conversation has been
written by the real update rule:

- per layer 16-23, cache the δ-mem input x over LoCoMo-like train-split conversations (the
  evaluator's difficulty, two speakers, updates, same-kind facts of the other speaker) and
  over each fact's question read pass;
- values and read-out as attempt 19 (the copy of OV_L x on 64 directions), kept fixed;
- W_k (7 dims, the 8th is the queries' rest), W_q (8 dims) and the gate's scale and offset
  learned by Adam on a contrastive loss: the read S q̂ at the position that starts the
  answer must point at the stored value of the asked fact (its current value) rather than at
  any other value of the conversation; off the answer, q̂ rests on the 8th dimension;
- the scan is deltamem.scan's chunked path (the same recurrence the engine runs), so decay,
  overwrites and interference are all in the loss.

Retrieval accuracy (which candidate value the read points at) is measured on held-out-split
conversations (disjoint names, places, templates). A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20 \
        .venv/bin/python docs/training-attempt-20/fit_address.py IN OUT [--chats N] ...

The runs of the record (IN = attempt 12's adapter, the repository's until this attempt:
`git show cadb589:deltamem/adapters/smollm2-135m-instruct/FILE`): --chats 240 --held 32 --steps 1000
--gains 0.25 0.5 1.0 (fit_att20a.log, saved OUT.fit.pt); the shipped adapter from that fit:
--from-fit OUT.fit.pt --gains --save-gain 0.07; the same with --save-gain 0.1, 0.15 and 0.25
for the other live runs; --first-only --steps 800 --gains --save-gain 0.1 (fit_att20b.log; its 0.15
adapter by --from-fit), not kept. Inputs are cached under --cache (~2.6 GB for 240 + 32 chats).

Attempt 21 added, all off by default (the runs above are unchanged): --more-templates (train
chats with docs/training-attempt-21/templates.py's extra statements, updates and questions),
--device (collect and fit on a GPU), --collect-block (one block of 80 chats, so that processes
collect side by side), --minutes (a time budget for the whole run) and --fit-only.
"""

import argparse
import random
import time

import program_memory as P
import torch
import torch.nn.functional as F
from oracle_copy import ov_matrix
from program_copy import COPY_HEADS, copy_columns, copy_runtime
from shared_scan import shared_scan

from deltamem import data as D
from deltamem.adapter import save_adapter

ALL_COPY_LAYERS = list(range(16, 24))
R = 8


def chat_source(split: str, more_templates: bool = False):
    """(pool, questions(slot)) of a split's fit chats. more_templates (train split): attempt
    21's extra statements, updates and questions."""
    if split == "train" and more_templates:
        import templates as T
        return T.train_pool(), T.train_questions
    pool = D.pools(split)
    if split == "train":
        return pool, lambda s: pool.question[s] + P.EXTRA_QUESTIONS[s]
    return pool, lambda s: pool.question[s]


def fit_conversation(rng, pool, words, split: str, c: int):
    """Chat c of a fit: the evaluator's difficulty; even train chats have random-word values."""
    copy = split == "train" and c % 2 == 0
    return D.generate_conversation(rng, pool, D.HELDOUT_LOCOMO, words if copy else None,
                                   1.0 if copy else 0.0, 0.5)


def candidates(tok, ids, conv):
    """(value-token mask, each value's first position, its token count, {(fact index, value):
    its index}) of a chat's token ids, over every value its facts took (old values of updates
    too)."""
    val = torch.zeros(len(ids), dtype=torch.bool)
    cand, lens, cand_of = [], [], {}
    for fi, fact in enumerate(conv.facts):
        for v in [*fact.history, fact.value]:
            spans = P.value_spans(tok, ids, [v])
            for a, b in spans:
                val[a:b] = True
            if spans:
                cand_of[(fi, v)] = len(cand)
                cand.append(spans[0][0])
                lens.append(spans[0][1] - spans[0][0])
    return val, cand, lens, cand_of


def collect(rt, tok, enc, words, split: str, start: int, n: int, seed: str,
            more_templates: bool = False):
    """Per chat: x (layers 16-23, float16, on the CPU) over the history and each question's
    read pass, value-token mask, candidate values (first-token positions), and per question
    the candidate it asks for. more_templates (train split): attempt 21's extra statements,
    updates and questions."""
    layers = list(rt.adapter.module.layers.values())
    inp = P.Inputs(layers)
    dev = rt.device
    pool, questions = chat_source(split, more_templates)
    chats = []
    t0 = time.time()
    for c in range(start, start + n):
        rng = random.Random(f"{seed}:{split}:{c}")
        conv = fit_conversation(rng, pool, words, split, c)
        hist = D.conversation_messages(conv)
        ids = enc.ids(hist)
        val, cand, _, cand_of = candidates(tok, ids, conv)
        inp.xs.clear()
        with torch.no_grad():
            _, state, _ = rt.forward(torch.tensor([ids], device=dev), None,
                                     torch.ones(1, len(ids), dtype=torch.bool, device=dev))
        hx = {li: inp.xs[li].half().cpu() for li in ALL_COPY_LAYERS}  # (T, d) each
        reads = []
        for fi, fact in enumerate(conv.facts):
            if (fi, fact.value) not in cand_of:
                continue
            question = rng.choice(questions(fact.slot)).format(p=fact.person)
            ep = D.Episode(hist, question, fact.value, fact.category, fact.slot)
            context = rng.choice([0, min(D.messages_after_fact(ep), 6)])
            r_ids, _, a_start = enc.read(ep, context)
            inp.xs.clear()
            with torch.no_grad():
                rt.forward(torch.tensor([r_ids], device=dev), state,
                           torch.zeros(1, len(r_ids), dtype=torch.bool, device=dev))
            rx = {li: inp.xs[li].half().cpu() for li in ALL_COPY_LAYERS}
            reads.append({"x": rx, "a_start": a_start, "target": cand_of[(fi, fact.value)],
                          "category": fact.category})
        chats.append({"x": hx, "val": val, "cand": torch.tensor(cand), "reads": reads})
        if (c - start) % 20 == 19:
            print(f"  {split}: {c - start + 1} chats, {time.time() - t0:.0f} s", flush=True)
    inp.remove()
    return chats


def pad_stack(seqs):
    T = max(len(s) for s in seqs)
    out = seqs[0].new_zeros((len(seqs), T, *seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


class Batch:
    """One layer's inputs of a set of chats, padded: history (B, T, d) with its length mask,
    reads (Q, Tr, d) with their chat index and answer position, candidate positions."""

    def __init__(self, chats, li, first_only: bool = False):
        self.hx = pad_stack([c["x"][li].float() for c in chats])
        self.hmask = pad_stack([torch.ones(len(c["val"]), dtype=torch.bool) for c in chats])
        self.val = pad_stack([c["val"] for c in chats])
        reads = [(ci, r) for ci, c in enumerate(chats) for r in c["reads"]]
        self.rx = pad_stack([r["x"][li].float() for _, r in reads])
        self.rmask = pad_stack([torch.ones(len(r["x"][li]), dtype=torch.bool) for _, r in reads])
        self.chat = torch.tensor([ci for ci, _ in reads])
        self.ans = torch.tensor([r["a_start"] - 1 for _, r in reads])
        # Where queries may read: the generation prompt and the answer, or (--first-only)
        # only the position that predicts the answer's first token.
        self.ans_mask = torch.zeros(self.rmask.shape, dtype=torch.bool)
        for i, (_, r) in enumerate(reads):
            lo, hi = ((r["a_start"] - 1, r["a_start"]) if first_only
                      else (r["a_start"] - 4, len(r["x"][li]) - 1))
            self.ans_mask[i, lo:hi] = True
        self.target = torch.tensor([r["target"] for _, r in reads])
        self.category = torch.tensor([r["category"] for _, r in reads])
        # candidates: (B, Kmax) positions, -1 padded
        self.cand = pad_stack([c["cand"] + 1 for c in chats]) - 1

    def to(self, device):
        for k, v in vars(self).items():
            setattr(self, k, v.to(device))
        return self


class Addressing(torch.nn.Module):
    """Keys and queries read x through a fixed projection U (d, D): the top-D principal
    directions of x (fewer weights to overfit the train split's templates), or identity."""

    def __init__(self, wk, wq, wb, bb, proj):
        super().__init__()
        self.proj = proj
        self.wk = torch.nn.Parameter(wk[:R - 1].clone())
        self.wq = torch.nn.Parameter(wq.clone())
        self.wb = wb
        self.bb = bb
        self.gate_scale = torch.nn.Parameter(torch.zeros(()))  # log
        self.gate_shift = torch.nn.Parameter(torch.zeros(()))

    def full(self, w):
        return w @ self.proj.T  # (., d)

    def keys(self, x):
        k = torch.tanh(x @ self.full(self.wk).T)
        return F.normalize(torch.cat([k, k.new_zeros(*k.shape[:-1], 1)], -1), dim=-1)

    def queries(self, x):
        return F.normalize(torch.tanh(x @ self.full(self.wq).T), dim=-1)

    def gate(self):
        """The gate's direction (fixed: the value-token probe)."""
        return self.wb

    def beta(self, x):
        return torch.sigmoid(self.gate_scale.exp() * (x @ self.gate() + self.bb)
                             + self.gate_shift)


def write(addr, wv, b: Batch):
    """The history written: its keys, queries, values (B, T, 64) and final states (B, 64, R)."""
    k, q = addr.keys(b.hx), addr.queries(b.hx)
    beta = addr.beta(b.hx) * b.hmask
    v = b.hx @ wv.T  # (B, T, 64)
    s0 = b.hx.new_zeros(len(b.hx), v.shape[-1], R)
    _, state = shared_scan(q, k, v, beta, s0)
    return k, q, v, state


def read(addr, wv, b: Batch, state):
    """Reads at every read-pass position (Q, Tr, 64) on the history's states, and the
    read pass's queries."""
    kr, qr = addr.keys(b.rx), addr.queries(b.rx)
    br = addr.beta(b.rx) * b.rmask
    reads, _ = shared_scan(qr, kr, b.rx @ wv.T, br, state[b.chat])
    return reads, qr


def run(addr, wv, b: Batch):
    """Reads at every read-pass position (Q, Tr, 64) and the history's queries."""
    _, q, v, state = write(addr, wv, b)
    reads, qr = read(addr, wv, b, state)
    return reads, q, qr, v


def losses(addr, wv, b: Batch, tau: float):
    reads, qh, qr, v = run(addr, wv, b)
    Q = len(b.target)
    ar = torch.arange(Q, device=reads.device)
    m = reads[ar, b.ans]  # (Q, 64): the read that predicts the first token
    cv = v[b.chat[:, None], b.cand[b.chat].clamp_min(0)]  # (Q, K, 64)
    ok = b.cand[b.chat] >= 0
    logits = (F.cosine_similarity(m[:, None], cv, dim=-1) / tau).masked_fill(~ok, -1e9)
    ce = F.cross_entropy(logits, b.target)
    acc = (logits.argmax(1) == b.target).float()
    rel = (m.norm(dim=1) / cv[ar, b.target].norm(dim=1)).mean()
    return ce, rest_loss(qh, qr, b), acc, rel


def rest_loss(qh, qr, b: Batch, ans_mask=None):
    """Off the answer, queries rest on the 8th dimension (no key has it): no read. On the
    answer, they leave it. ans_mask: where queries read (default the batch's answers)."""
    ans = b.ans_mask if ans_mask is None else ans_mask
    rest_r = (1 - qr[..., -1] ** 2)[~ans & b.rmask].mean()
    rest_h = (1 - qh[..., -1] ** 2)[b.hmask].mean()
    on = (qr[..., -1] ** 2)[ans].mean()
    return rest_r + rest_h + on


def write_side(addr) -> dict:
    """A fitted Addressing as plain weights: keys, queries, the gate's weight and bias."""
    return {"wk": addr.full(addr.wk).detach().cpu(), "wq": addr.full(addr.wq).detach().cpu(),
            "wb": (addr.gate_scale.exp() * addr.gate()).detach().cpu(),
            "bb": float(addr.gate_scale.exp() * addr.bb + addr.gate_shift)}


def fit(train, held, rt, args, save=None):
    """save(result) after each layer, so that a run stopped by its time limit keeps the
    layers it finished."""
    mc = rt.model.config
    blocks = rt.model.model.layers
    dev = torch.device(args.device)
    result = {}
    layers = args.layers or ALL_COPY_LAYERS
    for n_done, li in enumerate(layers):
        t0 = time.time()
        groups = [Batch(train[i:i + args.batch], li, args.first_only)
                  for i in range(0, len(train), args.batch)]
        bh = Batch(held, li, args.first_only)
        # The fixed parts (values, the gate's direction) from the first 240 // batch batches,
        # on the CPU: all 240 chats of attempt 20's fit (batch 16), 224 of attempt 21's (32).
        stat = groups[:max(1, 240 // args.batch)]
        x = torch.cat([b.hx[b.hmask] for b in stat]).double()
        val = torch.cat([b.val[b.hmask] for b in stat])
        ov = ov_matrix(blocks[li].self_attn, mc.num_attention_heads,
                       mc.num_key_value_heads).double().cpu()
        basis = torch.linalg.svd(x[val] @ ov.T, full_matrices=False)[2][:COPY_HEADS * R]
        wv = (basis @ ov).float()
        wb, bb, _ = P.fit_gate(x, val)
        # Start: keys and queries from small random weights (no slot probe): the contrastive
        # loss alone says what an address is.
        if args.pca:
            xa = torch.cat([x, *[b.rx[b.rmask].double() for b in stat]])
            proj = torch.linalg.svd(xa[torch.randperm(len(xa))[:20000]],
                                    full_matrices=False)[2][:args.pca].T.float()
        else:
            proj = torch.eye(x.shape[1])
        g = torch.Generator().manual_seed(li)
        scale = args.init_std * (x.shape[1] / proj.shape[1]) ** 0.5
        wk = torch.randn(R, proj.shape[1], generator=g) * scale
        wq = torch.randn(R, proj.shape[1], generator=g) * scale
        addr = Addressing(wk, wq, wb.detach().float(), float(bb), proj).to(dev)
        addr.wb, addr.proj, wv = addr.wb.to(dev), addr.proj.to(dev), wv.to(dev)
        groups = [b.to(dev) for b in groups]
        bh = bh.to(dev)
        opt = torch.optim.Adam(addr.parameters(), lr=args.lr)
        # --minutes: the layers left share what is left of the budget.
        deadline = (args.t_start + 60 * args.minutes - t0) / (len(layers) - n_done) + t0 \
            if args.minutes else float("inf")
        for step in range(args.steps):
            last = step == args.steps - 1 or time.time() > deadline
            ce, rest, acc, rel = losses(addr, wv, groups[step % len(groups)], args.tau)
            loss = ce + args.rest * rest + args.l2 * (addr.wk.square().sum()
                                                      + addr.wq.square().sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or last:
                with torch.no_grad():
                    _, rest_h, acc_h, rel_h = losses(addr, wv, bh, args.tau)
                by_cat = {int(c): round(float(acc_h[bh.category == c].mean()), 3)
                          for c in bh.category.unique()}
                print(f"layer {li} step {step}: ce {float(ce):.3f} rest {float(rest):.3f} "
                      f"train acc {float(acc.mean()):.3f} | held acc {float(acc_h.mean()):.3f}"
                      f" {by_cat} rest {float(rest_h):.3f} |m|/|v| {float(rel_h):.4f} "
                      f"gate x{float(addr.gate_scale.exp()):.2f}"
                      f"{float(addr.gate_shift):+.2f} ({time.time() - t0:.0f} s)",
                      flush=True)
            if last:
                break
        result[li] = {**write_side(addr), "wv": wv.cpu(), "basis": basis.float(),
                      "held_acc": float(acc_h.mean()), "rel": float(rel_h), "steps": step + 1}
        if save:
            save(result)
    return result


def install_heads(layer, f: dict, cols: slice, heads: int, rank: int, gain: float,
                  scale: float):
    """One fitted layer f (fit's result) into `heads` heads of rank `rank` at rows / columns
    `cols`, sharing its keys, queries and gate; read-out at `gain` of a full copy."""
    wk = torch.cat([f["wk"][:rank - 1], torch.zeros(1, f["wk"].shape[1])])
    layer.w_k.weight[cols] = wk.repeat(heads, 1)
    layer.w_q.weight[cols] = f["wq"].repeat(heads, 1)
    layer.w_beta.weight[cols] = f["wb"].expand(rank, -1).repeat(heads, 1)
    layer.w_beta.bias[cols] = f["bb"]
    layer.w_v.weight[cols] = f["wv"]
    # The read is ~|m|/|v| of the value; the gain is relative to a full copy.
    layer.b_o.weight[:, cols] = gain * f["basis"].T / scale / max(f["rel"], 1e-3)


def install(rt, result, gain):
    c = copy_columns(R)
    scale = rt.adapter.config.scale
    with torch.no_grad():
        for li, layer in rt.adapter.module.layers.items():
            layer.b_o.weight[:, c] = 0
            layer.b_q.weight[:, c] = 0
            if int(li) in result:
                install_heads(layer, result[int(li)], c, COPY_HEADS, R, gain, scale)


def fit_flags(ap):
    """The optimiser's flags, shared with attempt 24's fit_groups."""
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="train chats a step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--rest", type=float, default=1.0)
    ap.add_argument("--init-std", type=float, default=0.01)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--chats", type=int, default=80)
    ap.add_argument("--held", type=int, default=24)
    fit_flags(ap)
    ap.add_argument("--l2", type=float, default=0.0)
    ap.add_argument("--pca", type=int, default=0, help="keys and queries on the top-D "
                    "principal directions of x (0: all of x)")
    ap.add_argument("--gains", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--layers", type=int, nargs="*", default=None)
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--first-only", action="store_true",
                    help="queries rest everywhere but where the answer's first token is "
                         "predicted")
    ap.add_argument("--save-gain", type=float, default=None,
                    help="the gain saved, with no sweep (default: the best of the sweep)")
    ap.add_argument("--from-fit", default=None, help="a saved fit (DST.fit.pt): only the "
                    "gain sweep and the adapter")
    ap.add_argument("--cache", default="/tmp/att20L8", help="prefix of the cached inputs")
    ap.add_argument("--more-templates", action="store_true",
                    help="attempt 21: train chats with docs/training-attempt-21/templates.py's "
                         "extra statements, updates and questions")
    ap.add_argument("--device", default="cpu", help="where the inputs are collected and the "
                    "fit runs (the gain sweep and the adapter need --device cpu)")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="stop each layer's fit early so that the fit ends within this many "
                         "minutes of the start (0: no limit)")
    ap.add_argument("--fit-only", action="store_true", help="save DST.fit.pt and stop")
    ap.add_argument("--collect-block", type=int, default=None,
                    help="only cache train block B (chats 80B to 80B+79; B = -1: the held-out "
                         "chats), so that several processes collect side by side")
    ap.add_argument("--block-size", type=int, default=80,
                    help="train chats a --collect-block caches (attempt 26: smaller blocks "
                         "for many processes on a GPU)")
    args = ap.parse_args(argv)
    args.t_start = time.time()
    tok, enc, words, source, rt = copy_runtime(args.src, args.device)
    install(rt, {}, 0.0)
    def cached(split, start, n):
        # Inputs depend on the source adapter's heads (on), not the copy heads (silent), and
        # on the train split's templates.
        more = "_more" if args.more_templates and split == "train" else ""
        path = f"{args.cache}_{source.fingerprint()[7:]}{more}_{split}_{start}_{n}.pt"
        try:
            return torch.load(path)
        except FileNotFoundError:
            chats = collect(rt, tok, enc, words, split, start, n, "att20", args.more_templates)
            torch.save(chats, path)
            return chats

    if args.collect_block is not None:
        if args.collect_block < 0:
            cached("heldout", 0, args.held)
        else:
            start = args.block_size * args.collect_block
            cached("train", start, min(args.block_size, args.chats - start))
        return
    if args.from_fit:
        result = torch.load(args.from_fit)
    else:
        # Blocks of 80 train chats, so that a larger run reuses the smaller one's.
        train = [c for s in range(0, args.chats, 80)
                 for c in cached("train", s, min(80, args.chats - s))]
        held = cached("heldout", 0, args.held)
        if args.collect_only:
            return
        nq = sum(len(c["reads"]) for c in held)
        print(f"{len(train)} train chats, {len(held)} held-out chats ({nq} questions)",
              flush=True)
        result = fit(train, held, rt, args,
                     save=lambda res: torch.save(res, args.dst + ".fit.pt"))
    if args.fit_only:
        return
    # The sweep only chooses the gain: with --save-gain given it would be evaluation thrown away.
    gain = args.save_gain if args.save_gain is not None else \
        P.best_gain(rt, enc, lambda g: install(rt, result, g), args.gains, args.episodes)
    install(rt, result, gain)
    save_adapter(rt.adapter, args.dst, {"programmed": "copy heads, addressing fitted through "
                                                      "the delta rule (docs/training-attempt-20)"},
                 dtype=torch.float16)
    print("saved", args.dst, "gain", gain)


if __name__ == "__main__":
    main()
