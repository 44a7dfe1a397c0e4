"""Attempt 26: copy heads of rank 16 whose keys are one-hot codes of each value token's role.

`probe_layers.py` found that a linear map of x in layers 14-23 names a held-out value token's
fact kind (10 ways) in 0.90-0.94 of tokens and its (kind, place in the value) role among its
group's 15 in 0.84-0.88: the role is in x. What attempt 25 lacked is room for it: its oracle's
keys by (kind, place) answer 15-16 of 32 outside-window questions when each role has a key
dimension of its own, and a rank-8 state has 7. So here:

- the adapter at rank 16 with 6 heads, the shipped adapter's parameter count (19.9 MB in
  float16): heads 0-3 are attempt 12's, zero-padded (`fit_groups.py widen-rank`, the same
  function), heads 4-5 the copy state of layers 16-23, one state of 32 value directions and
  15 key dimensions a layer (the 16th is the queries' rest);
- each layer holds one group of five kinds (layer % 2: the kinds dealt round-robin, as
  attempts 24-25): 5 kinds × places 0, 1, 2+ = 15 roles, one key dimension each;
- keys: ridge regression of x at the group's value tokens onto tanh⁻¹ of their role's
  one-hot code; queries: onto the asked role's code where the read predicts the answer's
  token at that place, onto the rest dimension everywhere else (attempt 25's targets);
- gates: attempt 18's probe for the group's value tokens, β = --beta at its median;
- values and read-out: the top 32 directions of OV_L x at the group's value tokens.

Nothing by gradient; a fit takes about a minute on 240 chats (CPU). On the served inputs
(`fit_gates.py --collect-block`, attempt 21's train templates with --more-templates).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21:docs/training-attempt-22:docs/training-attempt-23:docs/training-attempt-24:docs/training-attempt-25:docs/training-attempt-26 \
        .venv/bin/python docs/training-attempt-26/role_keys.py WIDE OUT --cache PREFIX --gain 0.5

WIDE is the shipped adapter widened to rank 16 (fit_groups.py widen-rank SRC WIDE --heads 6).
A one-off (not project code).
"""

import argparse
import time

import fit_address as FA
import fit_groups as FGR
import fit_served as FS
import program_memory as P
import slot_codes as SC
import torch
import torch.nn.functional as F
from oracle_copy import ov_matrix
from program_copy import copy_runtime

R = 16
HEADS = 2  # copy heads a layer, sharing keys, queries and gate
REST = R - 1
PLACES = 3
KINDS = 5  # a group's kinds


class Layer:
    """slot_codes.Layer's rows (x at history tokens with their kind, -1: not a value, and
    place in the value; at read-pass tokens the asked kind and the place of the answer token
    they predict, -1: where queries rest), with the read pass cut like the history: every
    row where a query reads and a share `read_frac` of the others, so that a fit on hundreds
    of chats fits a GPU lease (a question's read pass holds ~300 tokens, nearly all rest
    targets). hc and rc: each row's chat."""

    def __init__(self, chats, li, other_frac: float, seed: int, read_frac: float = 0.3):
        gen = torch.Generator().manual_seed(seed)
        hx, hs, hp, hc, rx, rs, rp, rc = [], [], [], [], [], [], [], []
        for ci, c in enumerate(chats):
            s = c["hkind"]
            keep = (s >= 0) | (torch.rand(len(s), generator=gen) < other_frac)
            hx.append(c["x"][li][keep].double())
            hs.append(s[keep])
            hp.append(SC.places(s)[keep])
            hc.append(torch.full((int(keep.sum()),), ci))
            for r in c["reads"]:
                n_r = len(r["x"][li])
                kind, place = torch.full((n_r,), -1), torch.full((n_r,), -1)
                n = int(c["cand_len"][r["target"]])
                lo = r["a_start"] - 1  # the position before answer token j predicts it
                kind[lo:lo + n] = int(c["cand_kind"][r["target"]])
                place[lo:lo + n] = torch.arange(n)
                keep = (place >= 0) | (torch.rand(n_r, generator=gen) < read_frac)
                rx.append(r["x"][li][keep].double())
                rs.append(kind[keep])
                rp.append(place[keep])
                rc.append(torch.full((int(keep.sum()),), ci))
        self.hx, self.hs, self.hp, self.hc = (torch.cat(t) for t in (hx, hs, hp, hc))
        self.rx, self.rs, self.rp, self.rc = (torch.cat(t) for t in (rx, rs, rp, rc))


def layer_group(li: int) -> int:
    return li % SC.GROUPS


def role_codes(kind, place, g: int):
    """Row of each token's role among group g's 15 (kind, place) codes, -1 for tokens of no
    kind of the group."""
    mine = torch.tensor([SC.SLOTS.index(s) for s in SC.mine(g)])
    hit = kind[:, None] == mine[None, :]
    row = hit.float().argmax(1) * PLACES + place.clamp(0, PLACES - 1)
    return torch.where(hit.any(1), row, -1)


def fit_gate(x, y, x_cal, y_cal):
    """Attempt 18's gate probe (program_memory.fit_gate: logistic on standardised x, β_POS at
    the positives' median logit, β_NEG at the negatives' 99th percentile), its scale and
    offset set on chats the probe did not see: on its own chats the positives' logits sit
    higher than on new ones, and attempt 25's group-0 gate fell to β 0.01 held out."""
    w, b, _ = P.fit_gate(x, y)
    w, b = w.detach(), b.detach()
    with torch.no_grad():
        logit = x_cal.float() @ w + b
        pos_m, neg_m = logit[y_cal].median(), logit[~y_cal].quantile(0.99)
        lo_t = torch.logit(torch.tensor(P.BETA_NEG))
        hi_t = torch.logit(torch.tensor(P.BETA_POS))
        # a separation under 2 logits (an overfitted probe) would make the gate a step
        s = (hi_t - lo_t) / (pos_m - neg_m).clamp_min(2.0)
    print(f"    gate probe on the calibration chats: positives' median logit {float(pos_m):.2f},"
          f" negatives' 99th percentile {float(neg_m):.2f}", flush=True)
    return (s * w).detach(), float(hi_t - s * pos_m + s * b)


def fit_layer(tr: SC.Layer, he: SC.Layer, g: int, lam: float):
    """Keys (15, d) and queries (16, d), with their held-out role accuracy (argmax of the
    key's 15 dimensions; the query's, on the group's own answer positions) and the median
    rest² of held-out queries on the answer and off it."""
    role = role_codes(tr.hs, tr.hp, g)
    own = role >= 0
    wk = SC.ridge(tr.hx[own], SC.HOT * F.one_hot(role[own], REST).double(), lam)
    q_role = role_codes(tr.rs, tr.rp, g)
    tq = torch.zeros(len(tr.hx) + len(tr.rx), R, dtype=torch.float64)
    tq[:len(tr.hx), REST] = SC.HOT_REST
    rq = torch.zeros(len(tr.rx), R, dtype=torch.float64)
    on = q_role >= 0
    rq[on, :REST] = SC.HOT * F.one_hot(q_role[on], REST).double()
    rq[~on, REST] = SC.HOT_REST
    tq[len(tr.hx):] = rq
    wq = SC.ridge(torch.cat([tr.hx, tr.rx]), tq, lam)

    hrole = role_codes(he.hs, he.hp, g)
    hown = hrole >= 0
    k_acc = float((torch.tanh(he.hx[hown] @ wk.T).argmax(1) == hrole[hown]).float().mean())
    hq = role_codes(he.rs, he.rp, g)
    q = F.normalize(torch.tanh(he.rx @ wq.T), dim=1)
    q_acc = float((q[hq >= 0, :REST].argmax(1) == hq[hq >= 0]).float().mean())
    rest = q[:, REST].pow(2)
    return wk.float(), wq.float(), k_acc, q_acc, (float(rest[hq >= 0].median()),
                                                  float(rest[hq < 0].median()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", help="the shipped adapter widened to rank 16 with 6 heads (its base "
                    "heads are what the inputs were collected with)")
    ap.add_argument("dst")
    ap.add_argument("--cache", default="/tmp/att26s")
    ap.add_argument("--chats", type=int, default=240)
    ap.add_argument("--beta", type=float, default=0.2, help="the gate at the median value "
                    "token of the layer's group")
    ap.add_argument("--gain", type=float, default=0.5, help="read-out relative to a full copy")
    ap.add_argument("--lam", type=float, default=1e-2, help="ridge penalty (relative)")
    ap.add_argument("--other-frac", type=float, default=0.1,
                    help="share of the non-value history tokens in the query and gate fits")
    ap.add_argument("--layers", type=int, nargs="*", default=FA.ALL_COPY_LAYERS)
    ap.add_argument("--fit-only", action="store_true", help="save DST.fit.pt and stop (the "
                    "GPU run: SRC is then any adapter of the backbone, e.g. the base heads)")
    ap.add_argument("--from-fit", default=None, help="install a saved fit into SRC (the "
                    "widened adapter) at --gain, nothing else")
    args = ap.parse_args()
    P.BETA_POS = args.beta
    SC.R, SC.REST, SC.PLACES = R, REST, PLACES
    FGR.configure(R, SC.GROUPS, HEADS)
    if args.from_fit:
        return install(args.src, args.dst, torch.load(args.from_fit), args.gain)
    tok, _, words, _, rt = copy_runtime(args.src)
    train, held = FGR.load_chats(args.cache, tok, words, more_templates=True)
    train = train[:args.chats]
    print(f"{len(train)} train chats, {len(held)} held out", flush=True)
    mc = rt.model.config
    fit = {"group": 0, "layers": {}}  # group 0's columns: heads 4-5 in every copy layer
    for li in args.layers:
        t0 = time.time()
        g = layer_group(li)
        tr = Layer(train, li, args.other_frac, li)
        he = Layer(held, li, args.other_frac, 1000 + li)
        mine = torch.tensor([SC.SLOTS.index(s) for s in SC.mine(g)])
        own = torch.isin(tr.hs, mine)
        ov = ov_matrix(rt.model.model.layers[li].self_attn, mc.num_attention_heads,
                       mc.num_key_value_heads).double()
        basis = torch.linalg.svd(tr.hx[own] @ ov.T, full_matrices=False)[2][:HEADS * R]
        if len(basis) < HEADS * R:
            raise SystemExit(f"layer {li}: {len(basis)} value directions, too few chats")
        wv = (basis @ ov).float()
        # the read pass's own tokens (the answer included) are written too: other tokens here
        gx = torch.cat([tr.hx, tr.rx])
        gy = torch.cat([own, torch.zeros(len(tr.rx), dtype=torch.bool)])
        cal = torch.cat([tr.hc, tr.rc]) >= int(len(train) * 0.8)  # the last fifth calibrates
        wb, bb = fit_gate(gx[~cal], gy[~cal], gx[cal], gy[cal])
        del gx
        wk, wq, k_acc, q_acc, (rest_on, rest_off) = fit_layer(tr, he, g, args.lam)
        f = {"wk": wk, "wq": wq, "wb": wb.float(), "bb": bb, "wv": wv,
             "basis": basis.float(), "k_acc": k_acc, "q_acc": q_acc, "group": g}
        rel, acc, far, back = SC.measure(f, FGR.BatchG(held, li), li, g)
        fit["layers"][li] = {**f, "rel": rel}
        beta_h = torch.sigmoid(he.hx[torch.isin(he.hs, mine)].float() @ f["wb"] + f["bb"])
        print(f"layer {li} group {g}: held-out key role {k_acc:.3f}, query role {q_acc:.3f} "
              f"(rest² on the answer {rest_on:.2f}, off it {rest_off:.3f}); β median on "
              f"held-out values {float(beta_h.median()):.3f}; read points at the asked token "
              f"{acc:.3f} (far first {far:.3f}), own key {back:.3f}, |m|/|v| {rel:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    torch.save(fit, f"{args.dst}.fit.pt")
    if args.fit_only:
        return
    install(args.src, args.dst, fit, args.gain)


def install(src: str, dst: str, fit: dict, gain: float):
    FGR.install_fits(src, dst, [fit], gain,
                     "copy heads of rank 16, one group of kinds a layer, keys and queries by "
                     "ridge onto one-hot (kind, place) codes (docs/training-attempt-26)")


if __name__ == "__main__":
    FS.ANSWER_TOKENS = 3
    main()
