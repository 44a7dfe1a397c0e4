"""Attempt 25: the copy state's keys as fixed codes of each value token's role.

Attempt 24 found the write side to be what fails: a value does not come back through the key
it was written with. The rule is S <- (1 - β) S + β (v - S k) kᵀ, so every write decays the
whole state by (1 - β) and overlapping keys erase each other. This attempt's oracles
(`oracle_served.py --ideal-slots`, README.md) show what the keys must tell apart: with one
key dimension per role (the fact's kind and the token's place in the value, and its person)
and β 0.2 on the group's value tokens, a state of 32 value directions answers most
outside-window questions; keyed by kind alone it answers 3 of 32. Here each of attempt 24's
two groups of four copy heads (32 value directions each, the same basis) holds five kinds,
and its keys are fitted in closed form, nothing by gradient:

- keys: ridge regression of x onto tanh⁻¹ of a fixed random code (7 dimensions) of the
  token's role in the group, (kind, place) with places 0, 1 and 2+; the other tokens onto
  a trash code;
- queries: ridge regression onto the asked role's code at the position that predicts the
  answer's token at that place (fit_served.BatchJ's read positions), onto the rest
  dimension (7, where no key points) everywhere else;
- gates: attempt 18's probe for the group's value tokens, β = --beta at its median, the
  read pass's own tokens (the answer included) counted as other tokens;
- values and read-out: the top 32 directions of OV_L x at value tokens, as attempt 24.

The person is not in the role: telling two speakers' same-kind facts apart needs the name,
which a fixed linear code of x cannot hold for unseen names (README.md, what this says).
On attempt 22's served inputs (cached by `fit_gates.py --collect-block`, as attempt 24).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21:docs/training-attempt-22:docs/training-attempt-23:docs/training-attempt-24:docs/training-attempt-25 \
        .venv/bin/python docs/training-attempt-25/slot_codes.py IN OUT --beta 0.2 --gain 0.5

IN is the shipped adapter (attempt 20): its attempt-12 heads are kept, its copy heads replaced.
A one-off (not project code).
"""

import argparse
import functools
import time

import fit_address as FA
import fit_gates as FG
import fit_groups as FGR
import fit_served as FS
import program_memory as P
import torch
import torch.nn.functional as F
from oracle_copy import ov_matrix
from program_copy import copy_runtime

from deltamem import data as D

R = 8
GROUPS = 2
SLOTS = sorted(D.SLOTS)
REST = 7  # the queries' rest dimension (no key has it)
PLACES = 3  # token places with a code of their own; later tokens share the last
HOT = 1.5  # the size of a code's tanh⁻¹ target (tanh 1.5 = 0.91)
HOT_REST = 3.0  # the rest's: off the answer a query must read nothing (tanh 3 = 0.995)


def mine(g: int) -> list[str]:
    return [s for s in SLOTS if SLOTS.index(s) % GROUPS == g]


def split_layer(li: int) -> bool:
    """--split: odd layers hold the values' first tokens, even layers their later ones."""
    return li % 2 == 1


@functools.cache
def code_table(g: int, seed: int = 0):
    """Group g's key codes (5 kinds × PLACES + 1 trash, R - 1): unit vectors in the key
    dimensions spread as evenly as they go (16 in 7 cannot be orthogonal: random ones, then
    their largest overlaps pushed down), the trash code last (other tokens)."""
    n = len(mine(g)) * PLACES + 1
    if n <= R - 1:  # --split: one code per kind, orthogonal
        return torch.eye(R - 1, dtype=torch.float64)[:n]
    c = torch.randn(n, R - 1, generator=torch.Generator().manual_seed(seed + g),
                    dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([c], lr=0.01)
    off = ~torch.eye(n, dtype=torch.bool)
    for _ in range(2000):
        u = F.normalize(c, dim=1)
        loss = ((u @ u.T)[off] ** 8).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.normalize(c.detach(), dim=1)


def role_index(slot: int, place: int, g: int) -> int:
    """Row of code_table(g) for a token of kind `slot` (index in SLOTS, -1: none) at `place`
    in its value; the last row (trash) for other tokens and the other group's kinds."""
    m = mine(g)
    if slot < 0 or SLOTS[slot] not in m:
        return len(m) * PLACES
    return m.index(SLOTS[slot]) * PLACES + min(place, PLACES - 1)


def places(kinds):
    """Each token's place in its value (its run of tokens of one kind), -1 elsewhere."""
    out = torch.full_like(kinds, -1)
    for t in range(len(kinds)):
        if kinds[t] >= 0:
            out[t] = out[t - 1] + 1 if t and kinds[t - 1] == kinds[t] else 0
    return out


PCA = 0  # --pca: keys and queries on x's top principal directions only (0: all of x)


def ridge(x, t, lam: float):
    """W (k, d) minimising |x Wᵀ - t|² + lam · mean(diag xᵀx) · |W|², on x's top PCA
    directions (uncentred) when PCA is set."""
    u = torch.linalg.svd(x, full_matrices=False)[2][:PCA].T if PCA else None
    z = x @ u if PCA else x
    ztz = z.T @ z
    reg = lam * ztz.diagonal().mean()
    w = torch.linalg.solve(ztz + reg * torch.eye(len(ztz), dtype=x.dtype), z.T @ t).T
    return w @ u.T if PCA else w


def key_targets(kinds, place, g: int):
    """tanh⁻¹ targets (N, R - 1) of the keys: the code of each token's role in group g."""
    table = code_table(g)
    idx = torch.tensor([role_index(s, p, g) for s, p in zip(kinds.tolist(), place.tolist(),
                                                            strict=True)])
    return HOT * table[idx], idx


def query_targets(kinds, place, g: int):
    """tanh⁻¹ targets (N, R) of the queries: the asked role's code where the group's own
    question reads the answer's token at `place`, the rest dimension everywhere else."""
    table = code_table(g)
    t = torch.zeros(len(kinds), R, dtype=torch.float64)
    own = torch.tensor([s >= 0 and SLOTS[s] in mine(g) for s in kinds.tolist()],
                       dtype=torch.bool)
    for i in torch.nonzero(own).flatten().tolist():
        t[i, :R - 1] = HOT * table[role_index(int(kinds[i]), int(place[i]), g)]
    t[~own, REST] = HOT_REST
    return t, own


class Layer:
    """One layer's training rows: x at history tokens with their kind (-1: not a value) and
    place in the value, and at read-pass tokens with the asked kind and the place of the
    answer token they predict (-1: where queries rest). hc and rc: each row's chat.

    read_frac < 1 (attempt 26): of the read pass's rows, those where a query reads and that
    share of the others (a question's read pass holds ~300 tokens, nearly all rest targets),
    so that hundreds of chats fit in memory; at 1 nothing is drawn, as attempt 25 ran."""

    def __init__(self, chats, li, other_frac: float, seed: int, split: bool = False,
                 read_frac: float = 1.0):
        gen = torch.Generator().manual_seed(seed)
        first = split_layer(li)

        def kept(kind, place):
            """--split: the kinds of the tokens this layer holds (first or later), -1 else."""
            return torch.where((place == 0) == first, kind, -1) if split else kind

        hx, hs, hp, hc, rx, rs, rp, rc = [], [], [], [], [], [], [], []
        for ci, c in enumerate(chats):
            s = c["hkind"]  # the kind of each written token
            p = places(s)
            keep = (s >= 0) | (torch.rand(len(s), generator=gen) < other_frac)
            hx.append(c["x"][li][keep].double())
            hs.append(kept(s, p)[keep])
            hp.append(p[keep])
            hc.append(torch.full((int(keep.sum()),), ci))
            for r in c["reads"]:
                n_r = len(r["x"][li])
                kind, place = torch.full((n_r,), -1), torch.full((n_r,), -1)
                n = int(c["cand_len"][r["target"]])
                # the position before the answer's token j predicts it (fit_served.BatchJ)
                lo = r["a_start"] - 1
                kind[lo:lo + n] = int(c["cand_kind"][r["target"]])
                place[lo:lo + n] = torch.arange(n)
                keep = torch.ones(n_r, dtype=torch.bool) if read_frac >= 1 else (
                    (place >= 0) | (torch.rand(n_r, generator=gen) < read_frac))
                rx.append(r["x"][li][keep].double())
                rs.append(kept(kind, place)[keep])
                rp.append(place[keep])
                rc.append(torch.full((int(keep.sum()),), ci))
        self.hx, self.hs, self.hp, self.hc = (torch.cat(t) for t in (hx, hs, hp, hc))
        self.rx, self.rs, self.rp, self.rc = (torch.cat(t) for t in (rx, rs, rp, rc))


def fit_layer(train: Layer, held: Layer, g: int, lam: float):
    """Keys (7, d) and queries (8, d) of group g, with their held-out role accuracy (how
    often a key, a query, is nearest its own role's code among the group's codes) and the
    median rest² of the held-out queries on the answer and off it."""
    table = code_table(g)
    tk, _ = key_targets(train.hs, train.hp, g)
    wk = ridge(train.hx, tk, lam)
    qx = torch.cat([train.hx, train.rx])
    tq, _ = query_targets(torch.cat([train.hs.new_full(train.hs.shape, -1), train.rs]),
                          torch.cat([train.hp, train.rp]), g)
    wq = ridge(qx, tq, lam)
    _, idx = key_targets(held.hs, held.hp, g)
    own_h = idx < len(table) - 1
    k = F.normalize(torch.tanh(held.hx[own_h] @ wk.T), dim=1)
    k_acc = float(((k @ table.T).argmax(1) == idx[own_h]).float().mean())
    tq_h, own_r = query_targets(held.rs, held.rp, g)
    q = F.normalize(torch.tanh(held.rx[own_r] @ wq.T), dim=1)[:, :R - 1]
    q_acc = float(((q @ table.T).argmax(1) == (tq_h[own_r, :R - 1] @ table.T).argmax(1))
                  .float().mean())
    rest = F.normalize(torch.tanh(held.rx.float() @ wq.float().T), dim=1)[:, REST].pow(2)
    return (wk.float(), wq.float(), k_acc, q_acc,
            (float(rest[own_r].median()), float(rest[~own_r].median())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--cache", default="/tmp/att24")
    ap.add_argument("--chats", type=int, default=240)
    ap.add_argument("--beta", type=float, default=0.2, help="the gate at the median value "
                    "token of the group")
    ap.add_argument("--gain", type=float, default=0.5, help="read-out relative to a full copy")
    ap.add_argument("--lam", type=float, default=1e-3, help="ridge penalty (relative)")
    ap.add_argument("--other-frac", type=float, default=0.1,
                    help="share of the non-value history tokens in the key and query fits")
    ap.add_argument("--layers", type=int, nargs="*", default=FA.ALL_COPY_LAYERS)
    ap.add_argument("--split", action="store_true", help="odd layers hold the values' first "
                    "tokens, even layers their later tokens, each keyed by kind alone (one "
                    "orthogonal code per kind)")
    ap.add_argument("--pca", type=int, default=0, help="keys and queries on x's top D "
                    "principal directions (0: all of x)")
    args = ap.parse_args()
    global PLACES, PCA
    PCA = args.pca
    if args.split:
        PLACES = 1
    P.BETA_POS = args.beta
    FGR.configure(R, GROUPS, 4)
    tok, _, words, _, rt = copy_runtime(args.src)
    train, held = FGR.load_chats(args.cache, tok, words)
    train = train[:args.chats]
    print(f"{len(train)} train chats, {len(held)} held out", flush=True)
    mc = rt.model.config
    fits = [{"group": g, "layers": {}} for g in range(GROUPS)]
    for li in args.layers:
        t0 = time.time()
        tr = Layer(train, li, args.other_frac, li, args.split)
        he = Layer(held, li, args.other_frac, 1000 + li, args.split)
        xv = tr.hx[tr.hs >= 0]
        ov = ov_matrix(rt.model.model.layers[li].self_attn, mc.num_attention_heads,
                       mc.num_key_value_heads).double()
        basis = torch.linalg.svd(xv @ ov.T, full_matrices=False)[2][:FGR.K]
        wv = (basis @ ov).float()
        bh = FGR.BatchG(held, li)
        for g in range(GROUPS):
            own = torch.isin(tr.hs, torch.tensor([SLOTS.index(s) for s in mine(g)]))
            # the read pass's answer tokens are written too: they count as other tokens here
            wb, bb, _ = P.fit_gate(torch.cat([tr.hx, tr.rx]),
                                   torch.cat([own, torch.zeros(len(tr.rx), dtype=torch.bool)]))
            wk, wq, k_acc, q_acc, (rest_on, rest_off) = fit_layer(tr, he, g, args.lam)
            f = {"wk": wk, "wq": wq, "wb": wb.float(), "bb": float(bb), "wv": wv,
                 "basis": basis.float(), "k_acc": k_acc, "q_acc": q_acc}
            rel, acc, far, back = measure(f, bh, li, g, args.split)
            fits[g]["layers"][li] = {**f, "rel": rel}
            print(f"layer {li} group {g}: held-out key code {k_acc:.3f}, query code "
                  f"{q_acc:.3f} (rest² on the answer {rest_on:.2f}, off it {rest_off:.3f}); "
                  f"read points at the asked token {acc:.3f} (far first {far:.3f}), own key "
                  f"{back:.3f}, |m|/|v| {rel:.3f} ({time.time() - t0:.0f} s)", flush=True)
    for g in range(GROUPS):  # kept for installing at another gain (fit_groups.py install)
        torch.save(fits[g], f"{args.dst}.group{g}.pt")
    FGR.install_fits(args.src, args.dst, fits, args.gain, "copy heads in two groups of fact "
                     "kinds, keys and queries by ridge onto fixed role codes "
                     "(docs/training-attempt-25)")


def measure(f, b, li, g, split: bool = False):
    """On the held-out chats (b: their fit_groups.BatchG) through the real rule
    (fit_address.write and read): |read|/|value| of the group's own questions, how often the
    read points at the asked token (and for far first tokens), and how often the own-key
    read comes back."""
    addr = FA.Addressing(f["wk"], f["wq"], f["wb"], f["bb"], torch.eye(f["wk"].shape[1]))
    with torch.no_grad():
        k, _, v, state = FA.write(addr, f["wv"], b)
        reads, _ = FA.read(addr, f["wv"], b, state)
        ar = torch.arange(len(b.target))
        own = b.tgroup == g
        if split:  # the answer tokens this layer holds
            own &= b.first if split_layer(li) else ~b.first
        tpos = b.cand_q[ar, b.target]
        m = reads[ar, b.ans]
        hit = FG.token_logits(m, v, b, tpos, 0.1).argmax(1) == tpos
        acc = hit[own].float()
        mk = torch.einsum("qkr,qr->qk", state[b.chat], k[b.chat, tpos])
        back = (FG.token_logits(mk, v, b, tpos, 0.1).argmax(1) == tpos)[own].float().mean()
        far = own & ((b.hmask.sum(1)[b.chat] - tpos) > FS.WINDOW) & b.first
        far_acc = hit[far].float().mean()
        rel = (m.norm(dim=1) / v[b.chat, tpos].norm(dim=1))[own].median()
    return float(rel), float(acc.mean()), float(far_acc), float(back)


if __name__ == "__main__":
    FS.ANSWER_TOKENS = 3
    main()
