"""Attempt 24: the copy state split in two, each half with keys and a gate of its own.

Attempt 23's oracles put the limit of outside-window recall in the copy state: one 64 × 8
state a layer has 7 key dimensions, and a conversation writes 10-24 value tokens, so no query
can read most of them back (the best read of the shipped state answers 11 of 32, seed 1234).
Here the eight copy heads of layers 16-23 become two groups of four. Each group has its own
keys, queries and gate, and holds the values of half the fact kinds (D.SLOTS sorted, dealt
round-robin), each value on its 32 strongest directions. A question's kind says which group
answers it; the other group's query rests (reads nothing). The adapter format, the scan and
the engine are unchanged: heads are already independent there.

Per group, on attempt 22's served inputs (fit_served.collect_served, cached by
`fit_gates.py --collect-block`), attempt 23's loss: at each of the first three answer tokens,
the group's read must point at the asked value's token against every written token of the
conversation, and the gate's direction is learned from a probe for the group's value tokens.
Off its own questions' answers, a group's query rests. The values and read-out are the top-32
directions of OV_L x at value tokens (attempt 19's basis, cut to what four heads hold).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21:docs/training-attempt-22:docs/training-attempt-23:docs/training-attempt-24 \
        .venv/bin/python docs/training-attempt-24/fit_groups.py fit IN --group G --out FIT [--steps N]
    ... fit_groups.py install IN OUT --fits FIT0 FIT1 --gain 0.07

IN is the shipped adapter (attempt 20); its attempt-12 heads are kept, its copy heads replaced.
A one-off (not project code).
"""

import argparse
import glob
import random
import time

import fit_address as FA
import fit_gates as FG
import fit_served as FS
import program_memory as P
import torch
import torch.nn.functional as F
from oracle_copy import ov_matrix
from program_copy import BASE_HEADS, COPY_HEADS, copy_runtime

from deltamem import data as D
from deltamem.adapter import Adapter, load_adapter, save_adapter
from deltamem.layer import DeltaMem, DeltaMemConfig

R = 8
GROUPS = 2
HEADS = COPY_HEADS // GROUPS  # a group's heads
K = HEADS * R  # a group's value directions
SLOTS = sorted(D.SLOTS)


def configure(rank: int, groups: int, heads: int):
    """The copy layout: state rank, groups, each group's heads (--rank 16 --groups 1
    --heads 2: section 5 of the README, one copy state of 15 key dimensions a layer)."""
    global R, GROUPS, HEADS, K
    R, GROUPS, HEADS, K = rank, groups, heads, heads * rank
    FA.R = rank


def widen_rank(args):
    """The source adapter at rank 16 with 6 heads (its parameter count): its first BASE_HEADS
    heads zero-padded (the same function: the padded key and query dimensions are tanh(0) = 0,
    the padded value rows stay 0, α doubled keeps α/r), the rest zero until install."""
    src = load_adapter(args.src)
    old = src.config
    cfg = DeltaMemConfig.from_dict({**old.to_dict(), "rank": 2 * old.rank,
                                    "alpha": 2 * old.alpha, "num_state_heads": args.heads})
    mod = DeltaMem(cfg)
    r0, r1 = old.rank, cfg.rank
    with torch.no_grad():
        for p in mod.parameters():
            p.zero_()
        for li in cfg.layers:
            new, o = mod.layer(li), src.module.layer(li)
            for h in range(BASE_HEADS):
                a, b = slice(h * r1, h * r1 + r0), slice(h * r0, (h + 1) * r0)
                for name in ("w_q", "w_k", "w_v", "w_beta"):
                    getattr(new, name).weight[a] = getattr(o, name).weight[b]
                new.w_beta.bias[a] = o.w_beta.bias[b]
                new.b_q.weight[:, a] = o.b_q.weight[:, b]
                new.b_o.weight[:, a] = o.b_o.weight[:, b]
    save_adapter(Adapter(mod, src.backbone, {**src.meta, "widened_rank_from": src.fingerprint()}),
                 args.dst, dtype=torch.float16)
    print("saved", args.dst, cfg.rank, cfg.num_state_heads)


def group_of(slot: str) -> int:
    return SLOTS.index(slot) % GROUPS


def kind_group(kinds):
    """The group of each kind index (-1 stays -1): kinds are dealt round-robin."""
    return torch.where(kinds >= 0, kinds % GROUPS, -1)


def add_kinds(chats, tok, words, split: str, start: int, more_templates: bool = False):
    """Each candidate's fact kind and each written token's (index in SLOTS, -1: not a value),
    from the chats regenerated with the collector's seeds (and templates)."""
    pool, _ = FA.chat_source(split, more_templates)
    for ci, chat in zip(range(start, start + len(chats)), chats, strict=True):
        conv = FA.fit_conversation(random.Random(f"att20:{split}:{ci}"), pool, words, split, ci)
        ids = chat["ids"].tolist()
        _, cand, _, cand_of = FA.candidates(tok, ids, conv)
        assert cand == chat["cand"].tolist(), "regenerated chat differs from the cached one"
        ck = torch.empty(len(cand), dtype=torch.long)
        hk = torch.full((len(ids),), -1)
        for (fi, v), k in cand_of.items():
            kind = SLOTS.index(conv.facts[fi].slot)
            ck[k] = kind
            for a, b in P.value_spans(tok, ids, [v]):
                hk[a:b] = kind
        chat["cand_kind"], chat["hkind"] = ck, hk
    return chats


def load_chats(cache: str, tok, words, more_templates: bool = False):
    """The cached served inputs: (train chats in order, held-out chats). more_templates: the
    train chats were collected with attempt 21's templates (--more-templates)."""
    def block(split):
        out = []
        for path in sorted(glob.glob(f"{cache}_*_{split}_*.pt"),
                           key=lambda p: int(p.rsplit("_", 2)[-2])):
            start = int(path.rsplit("_", 2)[-2])
            out += add_kinds(torch.load(path), tok, words, split, start,
                             more_templates and split == "train")
        return out
    return block("train"), block("heldout")


class BatchG(FG.BatchIds):
    """fit_gates.BatchIds with each read's fact kind and group, and each written token's
    (-1: not a value)."""

    def __init__(self, chats, li, first_only: bool = False):
        super().__init__(chats, li, first_only)
        ck = FA.pad_stack([c["cand_kind"] + 1 for c in chats]) - 1
        self.tkind = ck[self.chat, self.target]
        self.hkind = FA.pad_stack([c["hkind"] + 1 for c in chats]) - 1
        self.tgroup, self.hgroup = kind_group(self.tkind), kind_group(self.hkind)


def group_losses(addr, wv, b: BatchG, tau: float, g: int, own_key: float = 0.0):
    """fit_gates.losses_all on group g's questions; every other position's query rests
    (other groups' answers included). Also the other questions' read size (the leak).

    own_key > 0 adds that weight of the own-key loss: the asked token's value must come back
    through the key it was written with, from the state the whole history wrote (the write
    side's own test; the oracles' own-key read)."""
    k, qh, v, state = FA.write(addr, wv, b)
    reads, qr = FA.read(addr, wv, b, state)
    own = b.tgroup == g
    ar = torch.arange(len(b.target), device=reads.device)
    m = reads[ar, b.ans]
    tpos = b.cand_q[ar, b.target]
    logits = FG.token_logits(m, v, b, tpos, tau)
    ce = F.cross_entropy(logits[own], tpos[own])
    if own_key:
        mk = torch.einsum("qkr,qr->qk", state[b.chat], k[b.chat, tpos])
        logits_k = FG.token_logits(mk, v, b, tpos, tau)
        ce = ce + own_key * F.cross_entropy(logits_k[own], tpos[own])
        if not torch.is_grad_enabled():
            back = (logits_k.argmax(1) == tpos).float()[own].mean()
            print(f"    own-key read comes back: {float(back):.3f}", flush=True)
    acc = (logits.argmax(1) == tpos).float()
    rest = FA.rest_loss(qh, qr, b, b.ans_mask & own[:, None])
    size = m.norm(dim=1) / v[b.chat, tpos].norm(dim=1)
    return ce, rest, acc, own, size


def fit(args):
    tok, _, words, _, rt = copy_runtime(args.src)
    train, held = load_chats(args.cache, tok, words, args.more_templates)
    train = train[:args.chats]
    init = torch.load(args.init)["layers"] if args.init else {}
    print(f"group {args.group} ({[s for s in SLOTS if group_of(s) == args.group]}): "
          f"{len(train)} train chats, {len(held)} held out", flush=True)
    mc = rt.model.config
    result = {}
    for li in args.layers:
        t0 = time.time()
        batches = [BatchG(train[i:i + args.batch], li) for i in range(0, len(train), args.batch)]
        bh = BatchG(held, li)
        if li in init:  # attempt 26: from a closed-form fit (role_keys.py), its values too
            f0 = init[li]
            wk, wq, wb, bb, wv, basis = (f0["wk"], f0["wq"], f0["wb"], torch.tensor(f0["bb"]),
                                         f0["wv"], f0["basis"])
        else:
            x = torch.cat([b.hx[b.hmask] for b in batches]).double()
            val = torch.cat([b.val[b.hmask] for b in batches])
            hg = torch.cat([b.hgroup[b.hmask] for b in batches])
            ov = ov_matrix(rt.model.model.layers[li].self_attn, mc.num_attention_heads,
                           mc.num_key_value_heads).double()
            # the same basis for both groups (all values), so their read-outs add up
            basis = torch.linalg.svd(x[val] @ ov.T, full_matrices=False)[2][:K]
            wv = (basis @ ov).float()
            wb, bb, _ = P.fit_gate(x, hg == args.group)
            del x
            gen = torch.Generator().manual_seed(100 * li + args.group)
            wk = torch.randn(R, wv.shape[1], generator=gen) * args.init_std
            wq = torch.randn(R, wv.shape[1], generator=gen) * args.init_std
        d = wv.shape[1]
        cls = FA.Addressing if args.fixed_gate else FG.GateAddressing
        addr = cls(wk, wq, wb.detach().float(), float(bb.detach()), torch.eye(d))
        if args.fixed_gate:  # the gate as it is (the probe's: β 0.12 on its values, ~0
            # elsewhere; or --init's)
            addr.gate_scale.requires_grad_(False)
            addr.gate_shift.requires_grad_(False)
        opt = torch.optim.Adam([p for p in addr.parameters() if p.requires_grad], lr=args.lr)
        for step in range(args.steps):
            ce, rest, acc, own, _ = group_losses(addr, wv, batches[step % len(batches)],
                                                 args.tau, args.group, args.own_key)
            loss = ce + args.rest * rest
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = step == args.steps - 1
            if step % 100 == 0 or last:
                with torch.no_grad():
                    _, rest_h, acc_h, own_h, size_h = group_losses(addr, wv, bh, args.tau,
                                                                   args.group, args.own_key)
                far = own_h & ((bh.hmask.sum(1)[bh.chat]
                                - bh.cand_q[torch.arange(len(bh.target)), bh.target])
                               > FS.WINDOW) & bh.first
                print(f"layer {li} step {step}: ce {float(ce):.3f} rest {float(rest):.3f} "
                      f"train acc {float(acc[own].mean()):.3f} | held acc "
                      f"{float(acc_h[own_h].mean()):.3f} far first {float(acc_h[far].mean()):.3f}"
                      f" rest {float(rest_h):.3f} |m|/|v| own {float(size_h[own_h].mean()):.3f}"
                      f" other {float(size_h[~own_h].mean()):.3f} gate "
                      f"x{float(addr.gate_scale.exp()):.2f}{float(addr.gate_shift):+.2f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        result[li] = {**FA.write_side(addr), "wv": wv, "basis": basis.float(),
                      "rel": float(size_h[own_h].mean()),
                      "held_acc": float(acc_h[own_h].mean())}
        torch.save({"group": args.group, "layers": result}, args.out)


def install(args):
    install_fits(args.src, args.dst, [torch.load(p) for p in args.fits], args.gain,
                 "copy heads in two groups of fact kinds, addressing fitted through the delta "
                 "rule (docs/training-attempt-24)")


def install_fits(src: str, dst: str, fits: list[dict], gain: float, note: str):
    """The source adapter with its copy heads replaced by the groups' fits (fit's output),
    read-out at `gain` of a full copy; `note` goes in the adapter's meta."""
    adapter = load_adapter(src)  # as it is: copy_runtime would widen it to 12 heads
    scale = adapter.config.scale
    with torch.no_grad():
        for layer in adapter.module.layers.values():  # the old copy heads go
            for name in ("w_q", "w_k", "w_v", "w_beta"):
                getattr(layer, name).weight[BASE_HEADS * R:] = 0
            layer.w_beta.bias[BASE_HEADS * R:] = 0
            layer.b_o.weight[:, BASE_HEADS * R:] = 0
            layer.b_q.weight[:, BASE_HEADS * R:] = 0
        for fitted in fits:
            g = fitted["group"]
            cols = slice((BASE_HEADS + g * HEADS) * R, (BASE_HEADS + (g + 1) * HEADS) * R)
            for li, f in fitted["layers"].items():
                FA.install_heads(adapter.module.layer(li), f, cols, HEADS, R, gain, scale)
    save_adapter(adapter, dst, {"programmed": note}, dtype=torch.float16)
    print("saved", dst, "gain", gain)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("src")
    f.add_argument("--group", type=int, required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--cache", default="/tmp/att24")
    f.add_argument("--layers", type=int, nargs="*", default=FA.ALL_COPY_LAYERS)
    f.add_argument("--chats", type=int, default=240)
    FA.fit_flags(f)
    f.set_defaults(steps=1000)
    f.add_argument("--answer-tokens", type=int, default=3)
    f.add_argument("--own-key", type=float, default=0.0, help="weight of the own-key loss: "
                   "each asked value read back through its own key from the history's state")
    f.add_argument("--init", default=None, help="start each layer from a saved closed-form "
                   "fit (attempt 26's role_keys.py DST.fit.pt): keys, queries, gate, values")
    f.add_argument("--more-templates", action="store_true", help="the cached train chats "
                   "were collected with attempt 21's templates")
    f.add_argument("--fixed-gate", action="store_true", help="keep the probe's gate (its "
                   "direction, scale and offset); learn keys and queries only")
    i = sub.add_parser("install")
    for sp in (f, i):
        sp.add_argument("--rank", type=int, default=R, help="state rank of the copy heads")
        sp.add_argument("--groups", type=int, default=GROUPS)
        sp.add_argument("--heads", type=int, default=HEADS, help="a group's heads")
    w = sub.add_parser("widen-rank")
    w.add_argument("src")
    w.add_argument("dst")
    w.add_argument("--heads", type=int, default=6, help="all heads of the result (6: the "
                   "source's parameter count at twice its rank)")
    i.add_argument("src")
    i.add_argument("dst")
    i.add_argument("--fits", nargs="+", required=True)
    i.add_argument("--gain", type=float, default=0.07)
    args = ap.parse_args()
    if args.cmd == "widen-rank":
        return widen_rank(args)
    configure(args.rank, args.groups, args.heads)
    if args.cmd == "fit":
        FS.ANSWER_TOKENS = args.answer_tokens
        fit(args)
    else:
        install(args)


if __name__ == "__main__":
    main()
