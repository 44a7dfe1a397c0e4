"""Attempt 23: how many outside-window questions would a perfect read answer, served?

Attempt 19's oracle (a copy of the asked value's OV_L x added in layers 16-23 at the position
that starts the answer) named 46 of 48 first tokens in teacher-forced episodes. The fits since
have raised the served reads' retrieval, yet the answers have not followed. Here the oracle
runs in the served flow that diagnose.py replays (server turn planning, W = 256, the
evaluator's system prompt). The adapter's copy heads are silenced, and at the prompt's last
position layer L's attention output gets c · B̂ (W_v x_y). x_y is layer L's x at the asked
value's first token (its last occurrence as a whole value in the written transcript), W_v the
copy heads' values and B̂ their read-out directions: exactly the read-out of a read equal to
that value, at c times a full copy. Greedy answer, exact match. Flags:

- --all-tokens: the position that predicts the answer's j-th token gets the value's j-th
  token instead (each step of the greedy decode);
- --perfect-query: inject instead the copy heads' read of the state as the question turn
  starts, with the value token's own key as the query, scaled to that token's value norm;
- --span-bound: inject the best read any query could make of that state (the value's
  projection on the span of the state's eight columns), scaled the same way;
- --layers: inject in these layers only; --full-ov: inject c · OV_L x_y (what layer L's
  attention writes attending to that token alone), for layers without copy heads;
- --keep-values N (with --span-bound or, since attempt 24, --perfect-query): the state
  rebuilt from the written tokens with the gates closed except on the asked value and N
  other answers of the conversation (-1: all).

Added by attempt 24 (the bound of a copy state split into groups, docs/training-attempt-24):
- --value-dims K: the copy value is its first K of 64 directions (the strongest, in SVD
  order: K = 32 is what four heads hold);
- --group-by slot|person with --groups G (and --keep-values -1): the state keeps only the
  answers of the asked one's group (fact kinds dealt round-robin into G groups, or the two
  speakers), as a state of its own keys would that only that group's facts write;
- --grouped (with --value-dims 32 --group-by slot): the adapter is fit_groups.py's, two groups
  of four copy heads with keys of their own; --span-bound and --perfect-query read the asked
  kind's group.

Added by attempt 25 (ideal keyed states, docs/training-attempt-25), all with --all-tokens:
- --ideal-slots B with --ideal-keys kind|place|person|role and --groups G: the copy heads'
  read replaced by that of an ideal state: the asked kind's group's value tokens written by
  the real rule at gate B, each with a one-hot key of its role, read with the asked role;
  --ideal-cont (gate at later tokens), --ideal-dims D (random keys in D dimensions),
  --ideal-split (first tokens in odd layers, later ones in even layers), --ideal-key-error
  P (a written token keyed by another kind with chance P);
- --bag B: one mixture of the answer's token values at every decode step.

Added by attempt 26: --layer-groups (each copy layer holds one group) and --fitted-write (the
state written by the adapter's own copy keys and gate, read ideally). Added by attempt 27:
--group-values N (the adapter's copy heads are N a group in every copy layer, group_heads.py:
the asked group's heads supply values, read-out and, with --fitted-write, keys and gate) and
--fitted-read query|argmax (that fitted state read by the adapter's own query of the live x,
or at its largest role dimension, only where the answer is said) and --ideal-gate (the
fitted keys written at B on the asked group's value tokens only).

A one-off (not project code). The runs of the record (README.md):
- --cs 0.1 0.25 0.5 1, with and without --all-tokens, seeds 1234 and 1235 (oracle_seed*,
  oracle_all_seed*);
- --adapter (attempt 23's fit at gain 0.1) --all-tokens with --perfect-query and with
  --span-bound, --cs 0.25 0.5 1 (oracle_pq_*, oracle_span_a23A_*);
- --all-tokens --span-bound with the shipped adapter (oracle_span_shipped_*), and with
  --keep-values 0, 1, 3 and -1 on seed 1234 (oracle_span_keep*);
- --all-tokens --layers 16 17, 18 19, 20 21 and 22 23 --cs 0.5 1 2 4 (oracle_all_L*);
- --all-tokens --full-ov --layers 22 23 and 24 25 --cs 0.5 1 2 (oracle_ov_L*).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-22:docs/training-attempt-23 \
        .venv/bin/python docs/training-attempt-23/oracle_served.py [--seed 1234] [--cs 0.25 0.5 1]
"""

import copy
import json
import random
import zlib

import program_memory as P
import torch
import torch.nn.functional as F
from diagnose import COPY_LAYERS, keep_inputs, replay_history, replay_parser, replay_runtime
from oracle_copy import ov_matrix
from program_copy import BASE_HEADS, COPY_HEADS, copy_columns

from deltamem import data as D
from deltamem import evaluate as E
from deltamem import scan
from server.sessions import plan_turn


def perfect_read(mod, x, state, v, first=BASE_HEADS):
    """The copy heads' read of one layer's state (H, r, r) with x's own key as the query,
    scaled to the norm of x's value v. first: the first copy head (of v's group, --grouped)."""
    k = mod.project(x).k[first]  # the copy heads (of a group) share their keys
    m = (state[first:first + COPY_HEADS].float() @ k).flatten()[:len(v)]
    return m * (v.norm() / m.norm().clamp_min(1e-12))


def span_read(state, v, first=BASE_HEADS):
    """The read S q closest to v over every query q: v's projection on the span of the copy
    heads' state (64 × r) columns, scaled to v's norm. v may hold only the first K rows (of
    the heads from `first` on)."""
    m = state[first:first + COPY_HEADS].float().reshape(-1, state.shape[-1])
    m = m[:len(v)]
    p = m @ (torch.linalg.pinv(m) @ v)
    return p * (v.norm() / p.norm().clamp_min(1e-12))


def state_keeping(mod, hx, spans):
    """One layer's state (H, r, r) after the written tokens hx (T, d) with every gate closed
    but on the tokens of these spans; the copy heads' rows are what span_read uses."""
    p = mod.project(hx[None])
    beta = torch.zeros_like(p.beta)
    for a, b in spans:
        beta[:, a:b] = p.beta[:, a:b]
    H, r = p.q.shape[-2:]
    s0 = torch.zeros(1, H, r, r)
    _, final = scan.delta_rule_scan(p.q, p.k, p.v, beta, s0, None)
    return final[0]


def ideal_reads(wv, hx, tok, full, facts, asked, groups: int, b: float,
                b_cont: float | None, keys: str, steps: int,
                dims: int | None = None, split: str | None = None,
                key_error: float = 0.0, layer_group: int | None = None,
                fitted: dict | None = None) -> list[torch.Tensor]:
    """Reads of an ideal keyed copy state (attempt 25), one per decode step: every value token
    (old values of updates too) of the asked fact's kind group written in order at gate b
    (b_cont at a value's later tokens) with a one-hot key of its role, every other token not
    at all, by the real rule S <- (1 - b) S + b (v - S k) k^T. A role is the fact's kind
    (keys "kind"), its person and kind ("person"), its kind and the token's place in the value
    ("place"), or all three ("role"); with a place, decode step j reads the asked fact's j-th
    role. A read is S k / b: one fresh write gives the value. A step whose role nothing wrote
    reads nothing. dims: each role's key a random unit vector in this many dimensions (seeded
    by the role) instead of its own one-hot dimension.
    split "first" / "rest" (keys "place"): this layer holds only the values' first tokens, or
    only their later tokens, all on one role per kind; it reads at the first decode step, or
    at the later ones. key_error: each written token's key is, with this chance, that of
    another kind of its group (at the same place and person), as a key map that names the
    kind wrong would write it; the draw is seeded by the token's position.
    layer_group (attempt 26): this layer holds only that group; others read nothing here.
    fitted (attempt 26, keys "place"): the state written instead by a fitted write side, every
    written token of the history with its fitted key normalize(tanh(W_k x)) and gate
    sigmoid(w_β x + b_β) ({"wk", "wb", "bb"}, role_keys.py's layout: the key's dimension
    3 · (the kind's index in its group) + min(place, 2)); the read stays ideal, or with
    fitted["state_only"] (attempt 27's --fitted-read) the state itself is returned, and with
    fitted["ideal_gate"] (--ideal-gate) the fitted keys write at b on the group's value tokens
    only."""
    slots = sorted(D.SLOTS)
    group = slots.index(asked.slot) % groups
    b_cont = b if b_cont is None else b_cont
    if layer_group is not None and layer_group != group:
        return [torch.zeros(wv.shape[0]) for _ in range(steps)]
    if fitted is not None:
        mine = [s for s in slots if slots.index(s) % groups == group]
        n_val = max(e - a for a, e in P.value_spans(tok, full, [str(asked.value)]))
        xs = hx[:len(full)].float()
        ks = F.normalize(torch.tanh(xs @ fitted["wk"].T), dim=-1)
        bs = torch.sigmoid(xs @ fitted["wb"] + fitted["bb"])
        if fitted.get("ideal_gate"):  # attempt 27: b on the group's value tokens, 0 elsewhere
            bs = torch.zeros(len(xs))
            for f in facts:
                if slots.index(f.slot) % groups == group:
                    for v in [*f.history, f.value]:
                        for a, e in P.value_spans(tok, full, [str(v)]):
                            bs[a:e] = b
        vs = xs @ wv.T
        S = torch.zeros(wv.shape[0], ks.shape[1])
        for k, bt, v in zip(ks, bs, vs, strict=True):
            S = (1 - bt) * S + bt * torch.outer(v - S @ k, k)
        if fitted.get("state_only"):
            return S
        return [S[:, 3 * mine.index(asked.slot) + min(j, 2)] / b if j < n_val
                else S.new_zeros(len(S)) for j in range(steps)]

    def role(f, j):
        if split:
            return (f.slot, min(j, 1))
        return (f.slot, f.person if keys in ("person", "role") else None,
                j if keys in ("place", "role") else None)

    writes = sorted((y, role(f, y - a), b if y == a else b_cont)
                    for f in facts if slots.index(f.slot) % groups == group
                    for v in [*f.history, f.value]
                    for a, e in P.value_spans(tok, full, [str(v)]) for y in range(a, e)
                    if split is None or (y == a) == (split == "first"))
    if key_error:
        kinds = [s for s in slots if slots.index(s) % groups == group]
        wrong = []
        for y, r, bt in writes:
            rng = random.Random(y)
            if rng.random() < key_error:
                r = (rng.choice([s for s in kinds if s != r[0]]), *r[1:])
            wrong.append((y, r, bt))
        writes = wrong
    roles = sorted({r for _, r, _ in writes} | {role(asked, j) for j in range(steps)}, key=str)
    if dims:
        keys_of = {r: F.normalize(torch.randn(dims, generator=torch.Generator().manual_seed(
            zlib.crc32(str(r).encode()))), dim=0) for r in roles}
    else:
        keys_of = dict(zip(roles, torch.eye(len(roles)), strict=True))
    S = torch.zeros(wv.shape[0], dims or len(roles))
    written = set()
    for y, r, bt in writes:
        k = keys_of[r]
        S = (1 - bt) * S + bt * torch.outer(wv @ hx[y].float() - S @ k, k)
        written.add(r)
    return [S @ keys_of[role(asked, j)] / b if role(asked, j) in written
            and (split is None or (j == 0) == (split == "first"))
            else S.new_zeros(len(S)) for j in range(steps)]


def fitted_query(wq, x, how: str) -> torch.Tensor:
    """The adapter's query of x (--fitted-read query), or the one-hot of its largest role
    dimension, the last (the rest) excluded (argmax)."""
    q = F.normalize(torch.tanh(wq @ x), dim=0)
    if how == "argmax":
        return F.one_hot(q[:-1].argmax(), len(q)).to(q.dtype)
    return q


def main():
    ap = replay_parser()
    ap.add_argument("--cs", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    ap.add_argument("--all-tokens", action="store_true", help="inject at every answer "
                    "position the value's token at that position, not only the first")
    ap.add_argument("--perfect-query", action="store_true", help="inject the copy heads' "
                    "read of the state before the question with the value token's own key as "
                    "the query (scaled to that token's value norm), not the value itself")
    ap.add_argument("--span-bound", action="store_true", help="inject the best read any "
                    "query could make of that state: the value's projection on the span of "
                    "the state's columns (scaled to the value's norm)")
    ap.add_argument("--layers", type=int, nargs="*", default=COPY_LAYERS,
                    help="inject in these copy layers only")
    ap.add_argument("--full-ov", action="store_true", help="inject c · OV_L x_y, what the "
                    "layer's attention writes attending to that token alone, instead of the "
                    "copy heads' 64 directions (for layers without copy heads)")
    ap.add_argument("--keep-values", type=int, default=None, help="with --span-bound or "
                    "--perfect-query: the "
                    "copy state rebuilt from the written tokens with the gates closed except "
                    "on the asked value and N other answers of the conversation (-1: all)")
    ap.add_argument("--value-dims", type=int, default=None, help="copy values of their "
                    "first K directions only")
    ap.add_argument("--group-by", choices=["slot", "person"], default=None,
                    help="with --keep-values -1: keep only the answers of the asked one's group")
    ap.add_argument("--groups", type=int, default=2, help="slot groups (round-robin)")
    ap.add_argument("--grouped", action="store_true", help="the adapter's copy heads are "
                    "two groups of four by slot (fit_groups.py; use --value-dims 32 "
                    "--group-by slot): read the asked kind's group")
    ap.add_argument("--bag", type=float, default=None, help="with --all-tokens: inject at "
                    "every decode step one mixture of the answer's token values: their "
                    "running average, each later token at weight B (attempt 25)")
    ap.add_argument("--ideal-slots", type=float, default=None, help="with --all-tokens: "
                    "inject the read of an ideal keyed copy state (attempt 25): one-hot "
                    "keys by role (--ideal-keys) within the asked kind's group (--groups), "
                    "the gate at B on that group's value tokens (old values too) and 0 "
                    "elsewhere, the real update rule; the asked role reads at every decode "
                    "step, read-out relative to one fresh write (c / B)")
    ap.add_argument("--ideal-keys", choices=["kind", "person", "place", "role"],
                    default="kind", help="with --ideal-slots: what a one-hot key tells apart "
                    "(the fact's kind; its person and kind; its kind and the token's place in "
                    "the value; its person, kind and token place)")
    ap.add_argument("--ideal-dims", type=int, default=None, help="with --ideal-slots: "
                    "keys random unit vectors in this many dimensions, one per role, instead "
                    "of one-hot (a fixed key code of that size)")
    ap.add_argument("--ideal-split", action="store_true", help="with --ideal-slots: odd "
                    "layers hold the values' first tokens, even layers their later tokens, "
                    "keyed by kind alone (what 7 key dimensions can hold orthogonally)")
    ap.add_argument("--ideal-key-error", type=float, default=0.0, help="with "
                    "--ideal-slots: the chance that a written token's key names another kind "
                    "of its group")
    ap.add_argument("--ideal-cont", type=float, default=None, help="with --ideal-slots B: "
                    "the gate at a value's later tokens (default B); B at its first token")
    ap.add_argument("--layer-groups", action="store_true", help="with --ideal-slots: each "
                    "copy layer holds one group, layer % --groups (attempt 26's layout)")
    ap.add_argument("--fitted-write", action="store_true", help="with --ideal-slots B "
                    "--ideal-keys place --layer-groups: the state written by the adapter's "
                    "own copy keys and gate (attempt 26's role_keys.py adapter) over the whole "
                    "history, read ideally (the asked role's key dimension at decode step j)")
    ap.add_argument("--group-values", type=int, default=0, metavar="N", help="with "
                    "--ideal-slots: the adapter's copy heads are N a group in every copy layer "
                    "(attempt 27's group_heads.py: group g's from head 4 + g · N); the ideal "
                    "state of the asked kind's group uses its heads' values and read-out "
                    "(and, with --fitted-write, their keys and gate)")
    ap.add_argument("--fitted-read", choices=["query", "argmax"], default=None,
                    help="with --fitted-write --group-values N: read that state with the "
                    "adapter's own query of the live x, normalize(tanh(W_q x)) (query), or "
                    "only the key dimension where it is largest among the roles (argmax), at "
                    "the prompt's last position and each decode step (attempt 27: the served "
                    "read, but only where the answer is said), scaled c / B as the ideal read")
    ap.add_argument("--ideal-gate", action="store_true", help="with --fitted-write: the "
                    "adapter's keys, but the gate B on the asked group's value tokens and 0 "
                    "elsewhere (attempt 27)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok, rt, fmt, ident = replay_runtime(args.adapter)
    c = rt.adapter.config
    mods = {li: rt.adapter.module.layer(li) for li in COPY_LAYERS}
    COPY = copy_columns(c.rank)
    with torch.no_grad():
        # the copy heads' values (first --value-dims rows) and read-out directions, one pair a
        # group with --group-values (attempt 27: group g's heads are the g-th N of the copy
        # heads, normalised apart: each has its own |m|/|v|), else one for all copy heads
        per = c.rank * args.group_values or COPY.stop - COPY.start
        n_g = args.groups if args.group_values else 1
        gcols = [slice(COPY.start + g * per, COPY.start + (g + 1) * per) for g in range(n_g)]
        wv_g = {li: [mods[li].w_v.weight[cc][:args.value_dims].clone() for cc in gcols]
                for li in COPY_LAYERS}
        bdir_g = {li: [(mods[li].b_o.weight[:, cc] / mods[li].b_o.weight[:, cc][:, 0].norm())
                       [:, :args.value_dims] for cc in gcols] for li in COPY_LAYERS}
        wv = {li: v[0] for li, v in wv_g.items()}
        bdir = {li: b[0] for li, b in bdir_g.items()}
        # attempt 26: the copy heads' own write side (one head's rows; the copy heads share it)
        fitted = {li: [{"wk": mods[li].w_k.weight[cc][:c.rank].clone(),
                        "wq": mods[li].w_q.weight[cc][:c.rank].clone(),
                        "wb": mods[li].w_beta.weight[cc][0].clone(),
                        "bb": float(mods[li].w_beta.bias[cc][0])} for cc in gcols]
                  for li in COPY_LAYERS} if args.fitted_write else {}
        for li in COPY_LAYERS:  # silence the copy heads: the oracle replaces their read
            mods[li].b_o.weight[:, COPY] = 0

    hooked = sorted(set(COPY_LAYERS) | set(args.layers))
    xs = keep_inputs(rt, hooked)
    add: dict[int, list[torch.Tensor]] = {}  # per layer, one vector per answer position
    calls = {li: 0 for li in hooked}  # forwards of this run so far (0: the prompt)

    def inject(li):
        def hook(mod, inp, out):
            k = calls[li]
            calls[li] += 1
            if li in add and callable(add[li]):  # --fitted-read: a read of the live x
                out = out.clone()
                out[0, -1] += add[li](xs[li][-1]).to(out.dtype)
                return out
            if li in add and k < len(add[li]):  # the prompt's last position, then each step
                out = out.clone()
                out[0, -1] += add[li][k].to(out.dtype)
                return out
        return hook

    mc = rt.model.config
    ov = {li: ov_matrix(rt.model.model.layers[li].self_attn, mc.num_attention_heads,
                        mc.num_key_value_heads) for li in args.layers} if args.full_ov else {}
    for li in hooked:
        rt.model.model.layers[li].self_attn.o_proj.register_forward_hook(inject(li))

    eos = [fmt.im_end, tok.eos_token_id]
    rows = []
    slots = sorted(D.SLOTS)
    for i, sample in enumerate(E.load_conversations(None, args.conversations, args.seed)):
        turns = E.session_turns(sample)
        group = {}
        if args.group_by or args.grouped or args.ideal_slots is not None:
            # the facts behind the questions, regenerated with locomo_conversation's seed
            facts = D.generate_conversation(
                random.Random(f"deltamem-locomo:heldout:{args.seed}:{i}"),
                D.pools("heldout"), D.HELDOUT_LOCOMO).facts
            if [str(f.value) for f in facts] != [str(q["answer"]) for q in sample["qa"]]:
                raise SystemExit("regenerated facts differ from the conversation's questions")
            group = {str(f.value): (f.person if args.group_by == "person"
                                    else slots.index(f.slot) % args.groups) for f in facts}
            fact_of = {str(f.value): f for f in facts}
        add.clear()
        rec, hx = replay_history(rt, fmt, ident, turns, args.window, xs, hooked)
        full = rec.transcript[:rec.tokens_absorbed]
        # every answer of the conversation where it is last written whole (--keep-values)
        others = {str(q["answer"]): P.value_spans(tok, full, [str(q["answer"])])
                  for q in sample["qa"]}
        others = {a: sp for a, sp in others.items() if sp}
        for q in sample["qa"]:
            dist = E.evidence_distance(tok, turns, q.get("evidence", []))
            if dist is None or dist <= args.window:
                continue
            ans = str(q["answer"])
            spans = others.get(ans, [])
            plan = plan_turn(fmt, copy.deepcopy(rec), [{"role": "user", "content": q["question"]}],
                             args.window, 8192, 16)
            row = {"sample": sample["sample_id"], "answer": ans, "distance": dist,
                   "found": bool(spans)}
            # per layer, (M, vectors u): the oracle adds c · M u at each answer position
            inject_at = {}
            if spans:
                a, b = spans[-1]
                ys = range(a, b if args.all_tokens else a + 1)
                with torch.no_grad():
                    for li in args.layers:
                        if args.full_ov:
                            inject_at[li] = (ov[li], [hx[li][y] for y in ys])
                            continue
                        vals = [wv[li] @ hx[li][y] for y in ys]
                        steps = 16  # --bag, --ideal-slots: every step of the greedy decode
                        if args.ideal_slots is not None:
                            g = (slots.index(fact_of[ans].slot) % args.groups
                                 if args.group_values else 0)
                            vals = ideal_reads(wv_g[li][g], hx[li], tok, full, facts,
                                               fact_of[ans], args.groups, args.ideal_slots,
                                               args.ideal_cont, args.ideal_keys, steps,
                                               args.ideal_dims,
                                               None if not args.ideal_split else
                                               ("first" if li % 2 else "rest"),
                                               args.ideal_key_error,
                                               li % args.groups if args.layer_groups else None,
                                               {**fitted[li][g],
                                                "state_only": bool(args.fitted_read),
                                                "ideal_gate": args.ideal_gate}
                                               if fitted else None)
                            inject_at[li] = (bdir_g[li][g], vals, *(
                                [fitted[li][g]["wq"]] if args.fitted_read else []))
                            continue
                        if args.bag is not None:
                            mix = vals[0]
                            for v in vals[1:]:
                                mix = (1 - args.bag) * mix + args.bag * v
                            vals = [mix] * steps
                        if not (args.span_bound or args.perfect_query):
                            inject_at[li] = (bdir[li], vals)
                            continue
                        st = plan.initial_state[c.layers.index(li)]
                        if args.keep_values is not None:
                            keep = [spans[-1]] + [
                                sp[-1] for a2, sp in others.items() if a2 != ans and (
                                    args.group_by is None or group[a2] == group[ans])
                            ][:None if args.keep_values < 0 else args.keep_values]
                            st = state_keeping(mods[li], hx[li], keep)
                        # --grouped: the asked kind's group of heads
                        first = BASE_HEADS + (COPY_HEADS // args.groups * group[ans]
                                              if args.grouped else 0)
                        if args.span_bound:
                            vals = [span_read(st, v, first) for v in vals]
                        else:
                            vals = [perfect_read(mods[li], hx[li][y], st, v, first)
                                    for y, v in zip(ys, vals, strict=True)]
                        inject_at[li] = (bdir[li], vals)
            for cval in [0.0, *args.cs]:
                add.clear()
                if cval:
                    with torch.no_grad():
                        for li, (mat, us, *wq) in inject_at.items():
                            add[li] = [cval * mat @ u for u in us] if not wq else (
                                lambda x, mat=mat, S=us, wq=wq[0], cval=cval:
                                cval * mat @ (S @ fitted_query(wq, x, args.fitted_read))
                                / args.ideal_slots)
                for li in hooked:
                    calls[li] = 0
                r = rt.run(plan.prompt, plan.initial_state, plan.write_start, 12, eos)
                pred = fmt.decode(r.tokens)
                row[str(cval)] = {"prediction": pred, "exact": E.exact_match(pred, ans)}
            rows.append(row)
            print(f"{ans!r:>22} found {row['found']!s:5} | " + " | ".join(
                f"c{k} {row[k]['prediction'][:16]!r}" for k in row if k[0].isdigit()), flush=True)
    print(f"\n{len(rows)} questions outside W, value found in the transcript in "
          f"{sum(r['found'] for r in rows)}")
    for cval in [0.0, *args.cs]:
        print(f"c = {cval}: exact {sum(r[str(cval)]['exact'] for r in rows):.0f}")
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
