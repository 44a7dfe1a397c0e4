"""Attempt 27: copy heads by token place, keyed by fact kind alone.

group_heads.py's keys and queries name a (kind, place) role, a product of two things x holds
side by side; a linear map gets it only in part (the fitted query reads 3 of 32 where the
same state read at the true role reads 8). Here the product is split over what the format
already has per head:

- the place by the gate: in each copy layer, heads 4-7 hold the values' first tokens, 8-11
  their second, 12-15 the later ones (each 4 heads sharing keys, queries and gate, 64 value
  directions of their own): the gate writes only value tokens of its place (x names a token's
  place at 0.92-0.99, attempt 26);
- the kind by the key: one-hot of the fact's kind among all 10 (x names it at 0.92-0.94);
- the query: the asked kind's dimension at every answer position, plus the rest dimension
  (which no key has) everywhere but at the answer token of the head's place. The kind and
  the "not my place" signals are each linear, and the read's normalisation does the "and".

Closed form, ridge regressions as role_keys.py. 16 heads of rank 16 (4 base + 12 copy),
stored as format v2 (zero rows left out).

    PYTHONPATH=.:.dev/scripts .venv/bin/python docs/training-attempt-27/place_heads.py \
        WIDE16 OUT --cache PREFIX --chats 140 --gain G

WIDE16: the shipped adapter widened to rank 16 with 16 heads (fit_groups.py widen-rank SRC
WIDE16 --heads 16). A one-off (not project code).
"""

import argparse
import time

import fit_address as FA
import fit_groups as FGR
import fit_served as FS
import group_heads as GH
import slot_codes as SC
import torch
import torch.nn.functional as F
from program_copy import copy_runtime

R = 16
PLACES = 3  # first token, second, later
HEADS = 4  # a place's heads: 64 value directions
KINDS = len(SC.SLOTS)


def fit_layer(tr, he, p: int, lam: float, hot_key: float, hot_query: float):
    """Keys (15, d; kinds in the first 10) and place p's queries (16, d), with the held-out
    kind accuracy of keys (value tokens) and queries (answer positions)."""
    own = tr.hs >= 0
    wk = SC.ridge(tr.hx[own], hot_key * F.one_hot(tr.hs[own], R - 1).double(), lam)
    tq = torch.zeros(len(tr.hx) + len(tr.rx), R, dtype=torch.float64)
    tq[:len(tr.hx), R - 1] = SC.HOT_REST
    on = tr.rs >= 0
    rq = torch.zeros(len(tr.rx), R, dtype=torch.float64)
    rq[on, :R - 1] = hot_query * F.one_hot(tr.rs[on], R - 1).double()
    mine = on & (tr.rp.clamp(max=PLACES - 1) == p)
    rq[~mine, R - 1] = SC.HOT_REST
    tq[len(tr.hx):] = rq
    wq = SC.ridge(torch.cat([tr.hx, tr.rx]), tq, lam)
    hown = he.hs >= 0
    k_acc = float((torch.tanh(he.hx[hown] @ wk.T)[:, :KINDS].argmax(1) == he.hs[hown])
                  .float().mean())
    q = F.normalize(torch.tanh(he.rx @ wq.T), dim=1)
    hon = he.rs >= 0
    q_acc = float((q[hon, :KINDS].argmax(1) == he.rs[hon]).float().mean())
    hmine = hon & (he.rp.clamp(max=PLACES - 1) == p)
    rest = q[:, R - 1].pow(2)
    return wk.float(), wq.float(), k_acc, q_acc, (float(rest[hmine].median()),
                                                  float(rest[hon & ~hmine].median()),
                                                  float(rest[~hon].median()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", help="the shipped adapter widened to rank 16 with 16 heads")
    ap.add_argument("dst")
    ap.add_argument("--cache", default="/tmp/att27c")
    ap.add_argument("--base", default="deltamem/adapters/smollm2-135m-instruct",
                    help="an adapter of at most 12 heads for the runtime the OV matrices come "
                    "from (copy_runtime widens it to 12)")
    ap.add_argument("--chats", type=int, default=140)
    ap.add_argument("--beta", type=float, default=0.2)
    ap.add_argument("--gains", type=float, nargs="+", default=[0.25, 0.5],
                    help="read-out relative to a full copy; one adapter each (DST_gG)")
    ap.add_argument("--lam", type=float, default=1e-2)
    ap.add_argument("--gate-lam", type=float, default=0.1)
    ap.add_argument("--neg-beta", type=float, default=1e-3)
    ap.add_argument("--hot-key", type=float, default=0.3)
    ap.add_argument("--hot-query", type=float, default=SC.HOT)
    ap.add_argument("--other-frac", type=float, default=0.1)
    ap.add_argument("--layers", type=int, nargs="*", default=FA.ALL_COPY_LAYERS)
    ap.add_argument("--from-fit", default=None, help="install a saved fit (DST.fit.pt) at "
                    "--gains, nothing else")
    ap.add_argument("--first-place-scale", action="store_true", help="every place's "
                    "read-out scaled by the first place's |m|/|v| (the later places' reads at "
                    "their own answer token are 0.01-0.06 of a value, so their own scale makes "
                    "their read-out 3-10 times louder, everywhere)")
    ap.add_argument("--places", type=int, default=PLACES, help="install the first N places' "
                    "heads only (1: a read at the answer's first token alone)")
    args = ap.parse_args()
    SC.R, SC.REST, SC.PLACES = R, R - 1, PLACES
    FGR.configure(R, PLACES, HEADS)  # a place's heads from 4 + p · HEADS, as a group's
    if args.from_fit:
        return install(args.src, args.dst, torch.load(args.from_fit), args.gains,
                       args.first_place_scale, args.places)
    tok, _, words, _, rt = copy_runtime(args.base)
    train, held = FGR.load_chats(args.cache, tok, words, more_templates=True)
    train = train[:args.chats]
    print(f"{len(train)} train chats, {len(held)} held out", flush=True)
    fits = {}
    for li in args.layers:
        tr, he, hb, ov, gx = GH.layer_rows(rt, train, held, li, args.other_frac)
        place = tr.hp.clamp(max=PLACES - 1)
        fits[li] = []
        for p in range(PLACES):
            t0 = time.time()
            f = GH.values_and_gate(tr, gx, ov, (tr.hs >= 0) & (place == p), HEADS * R, args)
            wk, wq, k_acc, q_acc, (rest_mine, rest_other, rest_off) = fit_layer(
                tr, he, p, args.lam, args.hot_key, args.hot_query)
            f.update(wk=wk, wq=wq)
            # |m|/|v| of the held-out reads at the answer token of this place (the read-out's
            # scale: the gain is relative to a full copy at that median)
            addr = FA.Addressing(wk, wq, f["wb"], f["bb"], torch.eye(wk.shape[1]))
            with torch.no_grad():
                _, _, v, state = FA.write(addr, f["wv"], hb)
                reads, _ = FA.read(addr, f["wv"], hb, state)
                ar = torch.arange(len(hb.target))
                tpos = hb.cand_q[ar, hb.target] + p
                ok = tpos < hb.hx.shape[1]
                m = reads[ar, (hb.ans + p).clamp(max=reads.shape[1] - 1)]
                rel = float((m.norm(dim=1) / v[hb.chat, tpos.clamp(max=v.shape[1] - 1)]
                             .norm(dim=1).clamp_min(1e-6))[ok].median())
            f["rel"] = rel
            fits[li].append(f)
            beta = torch.sigmoid(he.hx.float() @ f["wb"] + f["bb"])
            hown = (he.hs >= 0) & (he.hp.clamp(max=PLACES - 1) == p)
            print(f"layer {li} place {p}: held-out key kind {k_acc:.3f}, query kind {q_acc:.3f} "
                  f"(rest² at its place {rest_mine:.2f}, other answer tokens {rest_other:.2f}, "
                  f"off the answer {rest_off:.3f}); β median on its held-out value tokens "
                  f"{float(beta[hown].median()):.3f} (10-90%: {float(beta[hown].quantile(0.1)):.3f}"
                  f"-{float(beta[hown].quantile(0.9)):.3f}; other tokens' mean "
                  f"{float(beta[~hown].mean()):.4f}); |m|/|v| {rel:.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
        del gx
    torch.save(fits, f"{args.dst}.fit.pt")
    install(args.src, args.dst, fits, args.gains, args.first_place_scale, args.places)


def install(src: str, dst: str, fits: dict, gains: list[float], first_place_scale: bool,
            places: int = PLACES):
    """Each place's fits as fit_groups.install_fits' group p (heads from 4 + p · HEADS), one
    adapter DST_gG a gain."""
    groups = [{"group": p, "layers": {
        li: {**fl[p], "rel": fl[0]["rel"]} if first_place_scale else fl[p]
        for li, fl in fits.items()}} for p in range(places)]
    for gain in gains:
        FGR.install_fits(src, f"{dst}_g{gain}", groups, gain,
                         "copy heads by token place (4 a place), keyed by fact kind, queries "
                         "by kind plus a rest for other places (docs/training-attempt-27)")


if __name__ == "__main__":
    FS.ANSWER_TOKENS = 3
    main()
