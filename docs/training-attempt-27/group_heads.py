"""Attempt 27: both kind groups in every copy layer, one rank-16 copy head each.

Attempt 26's layout gave each copy layer one group of five kinds (two heads sharing keys, 32
value directions): every role had a key dimension of its own, but a question was answered by
four layers, and that layout's ideal state answers 5 of 32 outside-window questions (10 with
every copy layer answering). Here, in the same format and size (rank 16, 6 heads, 19.9 MB),
heads 4 and 5 of every copy layer (16-23) hold group 0 and group 1, each with its own keys
(its 15 (kind, place) roles, one dimension each, the 16th the queries' rest), queries, gate,
and 16 value directions (the top 16 of OV_L x at its own group's value tokens): every copy
layer answers every question, on half the value directions.

The fit is role_keys.py's, closed form, per (layer, group): keys by ridge onto one-hot role
codes, queries onto the asked role at answer positions of the group's questions and the rest
dimension elsewhere (other group's questions included), the hinge gate on the group's value
tokens.

    PYTHONPATH=.:.dev/scripts .venv/bin/python docs/training-attempt-27/group_heads.py \
        WIDE OUT --cache PREFIX --chats 140 [--fit-only | --from-fit OUT.fit.pt --gain G]

WIDE: the shipped adapter widened to rank 16 with 6 heads (fit_groups.py widen-rank SRC WIDE
--heads 6). .dev/scripts: the scripts of attempts 18-27 side by side. A one-off (not project
code).
"""

import argparse
import time

import fit_address as FA
import fit_groups as FGR
import fit_served as FS
import role_keys as RK
import slot_codes as SC
import torch
from oracle_copy import ov_matrix
from program_copy import copy_runtime

R = 16


def layer_rows(rt, train, held, li: int, other_frac: float):
    """One copy layer's fit rows (train and held-out slot_codes.Layer), the held-out batch
    for the read measures, the layer's OV matrix, and every train row the gates are fitted
    on (the read pass's tokens are written too: negatives)."""
    tr = SC.Layer(train, li, other_frac, li, read_frac=RK.READ_FRAC)
    he = SC.Layer(held, li, other_frac, 1000 + li, read_frac=RK.READ_FRAC)
    mc = rt.model.config
    ov = ov_matrix(rt.model.model.layers[li].self_attn, mc.num_attention_heads,
                   mc.num_key_value_heads).double()
    return tr, he, FGR.BatchG(held, li), ov, torch.cat([tr.hx, tr.rx])


def values_and_gate(tr, gx, ov, own, n_dirs: int, args):
    """A head group's values and gate from the train rows `own` marks as its value tokens:
    the top n_dirs directions of OV_L x there (the read-out's basis, and W_v = basis · OV_L),
    and the hinge gate (role_keys.fit_gate_hinge) with every other row a negative."""
    basis = torch.linalg.svd(tr.hx[own] @ ov.T, full_matrices=False)[2][:n_dirs]
    gy = torch.cat([own, torch.zeros(len(tr.rx), dtype=torch.bool)])
    wb, bb = RK.fit_gate_hinge(gx, gy, args.gate_lam, args.beta, args.neg_beta)
    return {"wv": (basis @ ov).float(), "basis": basis.float(), "wb": wb, "bb": bb}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", help="the shipped adapter widened to rank 16 with 6 heads")
    ap.add_argument("dst")
    ap.add_argument("--cache", default="/tmp/att27c")
    ap.add_argument("--chats", type=int, default=140)
    ap.add_argument("--beta", type=float, default=0.2, help="the gate's β at the group's "
                    "value tokens (the hinge gate's target)")
    ap.add_argument("--gain", type=float, default=0.5, help="read-out relative to a full copy")
    ap.add_argument("--lam", type=float, default=1e-2, help="ridge penalty (relative)")
    ap.add_argument("--gate-lam", type=float, default=0.1, help="the gate's ridge penalty")
    ap.add_argument("--neg-beta", type=float, default=1e-3, help="the β above which another "
                    "token's gate logit costs (squared hinge)")
    ap.add_argument("--hot-key", type=float, default=0.3, help="tanh⁻¹ target of a key's role "
                    "dimension")
    ap.add_argument("--hot-query", type=float, default=SC.HOT, help="the same for a query's")
    ap.add_argument("--other-frac", type=float, default=0.1,
                    help="share of the non-value history tokens in the query and gate fits")
    ap.add_argument("--layers", type=int, nargs="*", default=FA.ALL_COPY_LAYERS)
    ap.add_argument("--groups", type=int, default=2, help="kind groups (the kinds dealt "
                    "round-robin): 2 holds 15 (kind, place) roles a group, 4 holds 6-9")
    ap.add_argument("--heads-per-group", type=int, default=1, help="copy heads a group, "
                    "sharing keys, queries and gate (16 value directions each): 1 fits the "
                    "shipped format's 6 heads; 4 needs SRC widened to 12 heads")
    ap.add_argument("--fit-only", action="store_true", help="save DST.fit.pt and stop")
    ap.add_argument("--from-fit", default=None, help="install a saved fit into SRC at --gain")
    ap.add_argument("--rest-scale", type=float, default=1.0, help="with --from-fit: the "
                    "queries' rest row scaled by this (under 1: at the answer, where the fitted "
                    "rest still takes 0.6-0.8 of a query's energy, the role gets more; the "
                    "read-out keeps the fit's |m|/|v|, so the gain is relative to it)")
    args = ap.parse_args()
    RK.P.BETA_POS = args.beta
    SC.R, SC.REST, SC.PLACES = R, R - 1, RK.PLACES
    SC.GROUPS = args.groups
    if args.from_fit:
        fits = torch.load(args.from_fit)
        FGR.configure(R, len(fits), fits[0]["heads"])
        for fit in fits:
            for f in fit["layers"].values():
                f["wq"][R - 1] *= args.rest_scale
        return install(args.src, args.dst, fits, args.gain)
    FGR.configure(R, SC.GROUPS, args.heads_per_group)  # group g: its heads from 4 + g · HPG
    n_dirs = R * args.heads_per_group
    tok, _, words, _, rt = copy_runtime(args.src)
    train, held = FGR.load_chats(args.cache, tok, words, more_templates=True)
    train = train[:args.chats]
    print(f"{len(train)} train chats, {len(held)} held out", flush=True)
    fits = [{"group": g, "heads": args.heads_per_group, "layers": {}}
            for g in range(SC.GROUPS)]
    for li in args.layers:
        tr, he, hb, ov, gx = layer_rows(rt, train, held, li, args.other_frac)
        for g in range(SC.GROUPS):
            t0 = time.time()
            mine = RK.group_kinds(g)
            f = values_and_gate(tr, gx, ov, torch.isin(tr.hs, mine), n_dirs, args)
            wk, wq, k_acc, q_acc, (rest_on, rest_off) = RK.fit_layer(
                tr, he, g, args.lam, args.hot_key, args.hot_query)
            f.update(wk=wk, wq=wq, k_acc=k_acc, q_acc=q_acc, group=g)
            rel, acc, far, back = SC.measure(f, hb, li, g)
            fits[g]["layers"][li] = {**f, "rel": rel}
            beta = torch.sigmoid(he.hx.float() @ f["wb"] + f["bb"])
            held_own = torch.isin(he.hs, mine)
            b_own, b_other = beta[held_own], beta[~held_own]
            print(f"layer {li} group {g}: held-out key role {k_acc:.3f}, query role "
                  f"{q_acc:.3f} (rest² on the answer {rest_on:.2f}, off it {rest_off:.3f}); "
                  f"β median on held-out values {float(b_own.median()):.3f} (10-90%: "
                  f"{float(b_own.quantile(0.1)):.3f}-{float(b_own.quantile(0.9)):.3f}; other "
                  f"tokens' mean {float(b_other.mean()):.4f}); read points at the asked token "
                  f"{acc:.3f} (far first {far:.3f}), own key {back:.3f}, |m|/|v| {rel:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        del gx
    torch.save(fits, f"{args.dst}.fit.pt")
    if not args.fit_only:
        install(args.src, args.dst, fits, args.gain)


def install(src: str, dst: str, fits: list[dict], gain: float):
    FGR.install_fits(src, dst, fits, gain,
                     f"copy heads of rank 16, both kind groups in every copy layer "
                     f"({FGR.HEADS} heads a group from head 4), keys and queries by ridge onto "
                     f"one-hot (kind, place) codes (docs/training-attempt-27)")


if __name__ == "__main__":
    FS.ANSWER_TOKENS = 3
    main()
