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
  one-hot code, scaled by --hot-key (0.3: with tanh no longer flattening the role's own
  dimension, the ridge's noise on the other 14 weighs less; held out, the keys' energy on
  their role rises from 0.40-0.61 at 1.5 to 0.56-0.77); queries: onto the asked role's code
  where the read predicts the answer's token at that place, onto the rest dimension
  everywhere else (attempt 25's targets);
- gates (--gate): the logit by least squares onto logit(β) at the group's value tokens, a
  squared hinge at logit(--neg-beta) elsewhere (fit_gate_hinge; the default), or onto
  logit(--neg-beta) everywhere else (flat), or attempt 18's probe (probe);
- values and read-out: the top 32 directions of OV_L x at the group's value tokens.

Nothing by gradient; a fit takes ~20 s on 140 chats (CPU). On the served inputs
(`fit_gates.py --collect-block`, attempt 21's train templates with --more-templates). The
runs of the record (README.md): run A `--chats 140 --gate flat --neg-weight 0.8 --neg-beta
1e-4 --gate-lam 0.01`, run B the defaults with `--chats 140` (both `--fit-only`, then
`--from-fit OUT.fit.pt --gain G`); run C `fit_groups.py fit --init` from run B's fit, one
process a group, then `--from-fit GROUP0.pt GROUP1.pt --gain G`.

    PYTHONPATH=.:.dev/scripts .venv/bin/python docs/training-attempt-26/role_keys.py \
        WIDE OUT --cache PREFIX --chats 140 --fit-only

(.dev/scripts: the scripts of attempts 18-26 copied side by side; or the PYTHONPATH of
attempt 25's scripts plus docs/training-attempt-26.)

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
from program_copy import BASE_HEADS, copy_runtime

from deltamem.adapter import Adapter, load_adapter, save_adapter
from deltamem.layer import DeltaMem, DeltaMemConfig

R = 16
HEADS = 2  # copy heads a layer, sharing keys, queries and gate
REST = R - 1
PLACES = 3
READ_FRAC = 0.3  # the read pass's rest rows kept (slot_codes.Layer's read_frac)


def layer_group(li: int) -> int:
    return li % SC.GROUPS


def group_kinds(g: int) -> torch.Tensor:
    """Group g's kinds as indices in SLOTS (kinds are dealt round-robin, slot_codes.mine)."""
    return torch.tensor([SC.SLOTS.index(s) for s in SC.mine(g)])


def role_codes(kind, place, g: int):
    """Row of each token's role among group g's 15 (kind, place) codes, -1 for tokens of no
    kind of the group."""
    mine = group_kinds(g)
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


def ridge_with_bias(x1, wt, t, lam: float):
    """Weighted least squares of x1 (rows with a trailing 1) onto t, row weights wt, the ridge
    penalty lam · the mean weighted diagonal on every column but the bias: (w, b), in x1's
    dtype."""
    xtx = x1.T @ (x1 * wt[:, None])
    reg = lam * xtx.diagonal()[:-1].mean() * torch.eye(len(xtx), dtype=x1.dtype)
    reg[-1, -1] = 0  # the bias is not shrunk
    w = torch.linalg.solve(xtx + reg, x1.T @ (wt * t))
    return w[:-1], w[-1]


def fit_gate_flat(x, y, lam: float, beta: float, neg_weight: float = 0.5,
                  neg_beta: float = P.BETA_NEG):
    """A gate whose logit is fitted by least squares to logit(β) on the positives and to
    logit(neg_beta) elsewhere (the other tokens' share of the weight: neg_weight), with a
    bias: its positives' logits gather round one value, so β stays near `beta` on them. A
    probe's logits spread its positives from β 0.0 to 0.98 (10th to 90th percentile): a write
    at β ≈ 1 decays the whole state row to nothing, one at β ≈ 0 writes nothing, and the
    own-key read falls from 0.66 (β 0.2 on every value token) to 0.20."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    wt = torch.where(y, (1 - neg_weight) / y.sum(), neg_weight / (~y).sum()).to(x.dtype)
    t = torch.where(y, torch.logit(torch.tensor(beta)),
                    torch.logit(torch.tensor(neg_beta))).to(x.dtype)
    w, b = ridge_with_bias(x1, wt, t, lam)
    return w.float(), float(b)


def fit_gate_hinge(x, y, lam: float, beta: float, neg_beta: float = 1e-3, iters: int = 8):
    """The gate's logit by least squares onto logit(β) on the positives, and on the other
    tokens only where it lies above logit(neg_beta) (a squared hinge, by reweighted least
    squares): the positives' logits gather round logit(β), and the fit spends nothing on
    negatives that are already shut. Every write decays its whole state row by (1 - β), so
    one token at β ≈ 1 wipes the state (the probe's gate puts a tenth of the values above
    0.98), and writes at β ~ 10⁻³ over a history's ~2,000 other tokens both decay the early
    facts and pile junk on them (the flat fit's sum of β off the values is 2-8 a chat)."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    t_pos = torch.logit(torch.tensor(beta, dtype=x.dtype))
    t_neg = torch.logit(torch.tensor(neg_beta, dtype=x.dtype)) - 2.0  # aim below the hinge
    hinge = torch.logit(torch.tensor(neg_beta, dtype=x.dtype))
    active = torch.ones(len(x), dtype=torch.bool)
    for _ in range(iters):
        rows = y | active
        wt = torch.where(y, 0.5 / y.sum(), 0.5 / max(int((rows & ~y).sum()), 1)).to(x.dtype)
        w, b = ridge_with_bias(x1[rows], wt[rows], torch.where(y[rows], t_pos, t_neg), lam)
        active = (x @ w + b) > hinge
    return w.float(), float(b)


def fit_layer(tr: SC.Layer, he: SC.Layer, g: int, lam: float, hot_key: float, hot_query: float):
    """Keys (15, d) and queries (16, d), with their held-out role accuracy (argmax of the
    key's 15 dimensions; the query's, on the group's own answer positions) and the median
    rest² of held-out queries on the answer and off it."""
    role = role_codes(tr.hs, tr.hp, g)
    own = role >= 0
    wk = SC.ridge(tr.hx[own], hot_key * F.one_hot(role[own], REST).double(), lam)
    q_role = role_codes(tr.rs, tr.rp, g)
    tq = torch.zeros(len(tr.hx) + len(tr.rx), R, dtype=torch.float64)
    tq[:len(tr.hx), REST] = SC.HOT_REST
    rq = torch.zeros(len(tr.rx), R, dtype=torch.float64)
    on = q_role >= 0
    rq[on, :REST] = hot_query * F.one_hot(q_role[on], REST).double()
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
    ap.add_argument("--cache", default="/tmp/att26c")
    ap.add_argument("--chats", type=int, default=240)
    ap.add_argument("--beta", type=float, default=0.2, help="the gate's β at the layer "
                    "group's value tokens (hinge, flat: their target; probe: their median)")
    ap.add_argument("--gain", type=float, default=0.5, help="read-out relative to a full copy")
    ap.add_argument("--lam", type=float, default=1e-2, help="ridge penalty (relative)")
    ap.add_argument("--gate", choices=("hinge", "flat", "probe"), default="hinge",
                    help="hinge: fit_gate_hinge; flat: the gate's logit by least squares onto "
                    "logit(β), negatives onto logit(--neg-beta) (fit_gate_flat); probe: "
                    "attempt 18's probe, its scale and offset set on a fifth of the train "
                    "chats")
    ap.add_argument("--gate-lam", type=float, default=0.1, help="ridge penalty of the hinge "
                    "and flat gates (relative)")
    ap.add_argument("--neg-weight", type=float, default=0.5, help="flat gate: the other "
                    "tokens' share of the least-squares weight")
    ap.add_argument("--neg-beta", type=float, default=1e-3, help="hinge gate: the β above which"
                    " another token's logit costs; flat gate: the β they are fitted to")
    ap.add_argument("--hot-key", type=float, default=0.3, help="tanh⁻¹ target of a key's "
                    "role dimension (smaller: the ridge's noise on the other 14 is smaller "
                    "beside it once tanh no longer flattens the role's own)")
    ap.add_argument("--hot-query", type=float, default=SC.HOT,
                    help="the same for the queries' role dimension on the answer")
    ap.add_argument("--other-frac", type=float, default=0.1,
                    help="share of the non-value history tokens in the query and gate fits")
    ap.add_argument("--layers", type=int, nargs="*", default=FA.ALL_COPY_LAYERS)
    ap.add_argument("--fit-only", action="store_true", help="save DST.fit.pt and stop (the "
                    "GPU run: SRC is then any adapter of the backbone, e.g. the base heads)")
    ap.add_argument("--from-fit", nargs="+", default=None, help="install saved fits into "
                    "SRC (the widened adapter) at --gain, nothing else: this script's, or "
                    "fit_groups.py fit --init's, one a group, their layers merged")
    ap.add_argument("--narrow-base", action="store_true", help="write SRC's four base heads "
                    "as an adapter at DST and stop (the GPU run's .dev/base4)")
    args = ap.parse_args()
    if args.narrow_base:
        return narrow_to_base(args.src, args.dst)
    P.BETA_POS = args.beta
    SC.R, SC.REST, SC.PLACES = R, REST, PLACES
    FGR.configure(R, SC.GROUPS, HEADS)
    if args.from_fit:
        layers = {li: f for path in args.from_fit for li, f in torch.load(path)["layers"].items()}
        return install(args.src, args.dst, {"group": 0, "layers": layers}, args.gain)
    tok, _, words, _, rt = copy_runtime(args.src)
    train, held = FGR.load_chats(args.cache, tok, words, more_templates=True)
    train = train[:args.chats]
    print(f"{len(train)} train chats, {len(held)} held out", flush=True)
    mc = rt.model.config
    fit = {"group": 0, "layers": {}}  # group 0's columns: heads 4-5 in every copy layer
    for li in args.layers:
        t0 = time.time()
        g = layer_group(li)
        tr = SC.Layer(train, li, args.other_frac, li, read_frac=READ_FRAC)
        he = SC.Layer(held, li, args.other_frac, 1000 + li, read_frac=READ_FRAC)
        mine = group_kinds(g)
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
        if args.gate == "hinge":
            wb, bb = fit_gate_hinge(gx, gy, args.gate_lam, args.beta, args.neg_beta)
        elif args.gate == "flat":
            wb, bb = fit_gate_flat(gx, gy, args.gate_lam, args.beta, args.neg_weight,
                                   args.neg_beta)
        else:
            cal = torch.cat([tr.hc, tr.rc]) >= int(len(train) * 0.8)  # the last fifth
            wb, bb = fit_gate(gx[~cal], gy[~cal], gx[cal], gy[cal])
        del gx
        wk, wq, k_acc, q_acc, (rest_on, rest_off) = fit_layer(tr, he, g, args.lam,
                                                              args.hot_key, args.hot_query)
        f = {"wk": wk, "wq": wq, "wb": wb.float(), "bb": bb, "wv": wv,
             "basis": basis.float(), "k_acc": k_acc, "q_acc": q_acc, "group": g}
        rel, acc, far, back = SC.measure(f, FGR.BatchG(held, li), li, g)
        fit["layers"][li] = {**f, "rel": rel}
        beta = torch.sigmoid(he.hx.float() @ f["wb"] + f["bb"])
        beta_h, beta_o = beta[torch.isin(he.hs, mine)], beta[~torch.isin(he.hs, mine)]
        print(f"layer {li} group {g}: held-out key role {k_acc:.3f}, query role {q_acc:.3f} "
              f"(rest² on the answer {rest_on:.2f}, off it {rest_off:.3f}); β median on "
              f"held-out values {float(beta_h.median()):.3f} (10-90%: "
              f"{float(beta_h.quantile(0.1)):.3f}-{float(beta_h.quantile(0.9)):.3f}; other "
              f"tokens' mean {float(beta_o.mean()):.4f}); read points at the asked token "
              f"{acc:.3f} (far first {far:.3f}), own key {back:.3f}, |m|/|v| {rel:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    torch.save(fit, f"{args.dst}.fit.pt")
    if args.fit_only:
        return
    install(args.src, args.dst, fit, args.gain)


def narrow_to_base(src: str, dst: str):
    """SRC's first BASE_HEADS heads as an adapter of their own (6.7 MB): the heads the served
    inputs depend on while the copy heads are silent, small enough to go with a GPU lease's
    upload (gpu_run.sh's .dev/base4)."""
    old = load_adapter(src)
    cfg = DeltaMemConfig.from_dict({**old.config.to_dict(), "num_state_heads": BASE_HEADS})
    mod, n = DeltaMem(cfg), BASE_HEADS * cfg.rank
    with torch.no_grad():
        for li in cfg.layers:
            new, o = mod.layer(li), old.module.layer(li)
            for name in ("w_q", "w_k", "w_v", "w_beta"):
                getattr(new, name).weight.copy_(getattr(o, name).weight[:n])
            new.w_beta.bias.copy_(o.w_beta.bias[:n])
            new.b_q.weight.copy_(o.b_q.weight[:, :n])
            new.b_o.weight.copy_(o.b_o.weight[:, :n])
    save_adapter(Adapter(mod, old.backbone, {**old.meta, "narrowed_to_base_heads":
                                             old.fingerprint()}), dst, dtype=torch.float16)
    print("saved", dst)


def install(src: str, dst: str, fit: dict, gain: float):
    FGR.install_fits(src, dst, [fit], gain,
                     "copy heads of rank 16, one group of kinds a layer, keys and queries by "
                     "ridge onto one-hot (kind, place) codes (docs/training-attempt-26)")


if __name__ == "__main__":
    FS.ANSWER_TOKENS = 3
    main()
