"""Attempt 22, diagnosis: where an outside-window answer is lost in the served forward pass.

The evaluation's δ-mem@W mode is replayed in the HF reference runtime (float32) with the
server's own turn planning (server.sessions.plan_turn / finish_turn), so the prompts, windows
and write starts are the ones the engine sees. For each question whose evidence lies outside
W, at the position that predicts the answer's first token:

- the rank of the answer's first token with the shipped adapter, with its eight copy heads
  silenced (their read-out columns zeroed) and with their read-out doubled;
- per copy layer 16-23, which written position the copy heads' read points at (cosine of the
  64-number read against the value v̂ written at each position whose gate is open): the asked
  value's own position, another value, or elsewhere.

A hit is a read whose best token is the answer's first token (any occurrence), so for
values whose first token is shared (" a" of events, the month of dates) it is an upper
bound. A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19 \
        .venv/bin/python docs/training-attempt-22/diagnose.py [--seed 1234] [--conversations 12]
"""

import argparse
import copy
import json
from collections import Counter

import torch
from program_copy import BASE_HEADS, COPY_HEADS, copy_columns
from transformers import AutoTokenizer

from deltamem import evaluate as E
from deltamem import scan
from deltamem.adapter import load_adapter
from deltamem.data import SYSTEM_PROMPT
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from memory_store import SessionRecord, StateIdentity
from server.sessions import ChatFormat, finish_turn, plan_turn

COPY_LAYERS = list(range(16, 24))


def replay_history(rt, fmt, ident, turns, window: int, xs: dict, layers):
    """Feed a conversation's turns (evaluate.session_turns) the way the evaluator does through
    the server's turn planning: the system prompt the adapters train with on the first turn,
    a one-token reply each. xs is filled by the caller's hooks with each layer's x of the last
    forward. Returns the session record and, per layer, x of every token written (the
    transcript's absorbed tokens, in order)."""
    written = {li: [] for li in layers}
    rec = SessionRecord("s", "t", ident)
    for i, (msgs, _) in enumerate(turns):
        if i == 0:
            msgs = [{"role": "system", "content": SYSTEM_PROMPT}, *msgs]
        plan = plan_turn(fmt, rec, msgs, window, 8192, 1)
        res = rt.run(plan.prompt, plan.initial_state, plan.write_start, 1, [fmt.im_end])
        for li in layers:
            written[li].append(xs[li][plan.write_start:])
        rec = finish_turn(plan, res.tokens, fmt.decode(res.tokens), res.final_state,
                          res.finish_reason, ident)
    written = {li: torch.cat(v) for li, v in written.items()}
    assert len(written[layers[0]]) == rec.tokens_absorbed
    return rec, written


def keep_inputs(rt, layers) -> dict[int, torch.Tensor]:
    """{layer: its x (T, d) in the last forward}, kept by hooks on the layers' q_proj (x is
    the δ-mem input: the attention input after the input RMSNorm)."""
    xs: dict[int, torch.Tensor] = {}

    def grab(li):
        def hook(mod, inp):
            xs[li] = inp[0][0].detach().float()
        return hook

    for li in layers:
        rt.model.model.layers[li].self_attn.q_proj.register_forward_pre_hook(grab(li))
    return xs


def replay_parser() -> argparse.ArgumentParser:
    """The flags of a replay of the evaluation: adapter, conversations, window."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="deltamem/adapters/smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--window", type=int, default=256)
    return ap


def replay_runtime(adapter: str):
    """(tokenizer, HF runtime with the adapter, chat format, state identity), float32 with
    the reference scan."""
    scan.USE_CPU_KERNEL = False
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    rt = DeltaMemHF.from_pretrained(md, adapter=load_adapter(adapter))
    c = rt.adapter.config
    return tok, rt, ChatFormat(tok), StateIdentity("b", "a", len(c.layers),
                                                   c.num_state_heads, c.rank)


def main():
    ap = replay_parser()
    ap.add_argument("--all", action="store_true", help="every question, not only outside W")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, rt, fmt, ident = replay_runtime(args.adapter)
    c = rt.adapter.config
    slots = {li: c.layers.index(li) for li in COPY_LAYERS}
    mods = {li: rt.adapter.module.layer(li) for li in COPY_LAYERS}
    COPY = copy_columns(c.rank)
    bo_copy = {li: mods[li].b_o.weight[:, COPY].clone() for li in COPY_LAYERS}

    xs = keep_inputs(rt, COPY_LAYERS)
    reads: dict[int, list[torch.Tensor]] = {li: [] for li in COPY_LAYERS}  # per forward

    def grab_read(li):
        def hook(mod, inp):
            reads[li].append(rt.ctx.reads[slots[li]][0, -1].detach().float())
        return hook

    for li in COPY_LAYERS:
        attn = rt.model.model.layers[li].self_attn
        attn.o_proj.register_forward_pre_hook(grab_read(li))

    def set_copy_gain(g):
        with torch.no_grad():
            for li in COPY_LAYERS:
                mods[li].b_o.weight[:, COPY] = g * bo_copy[li]

    eos = [fmt.im_end, tok.eos_token_id]
    rows = []
    convs = E.load_conversations(None, args.conversations, args.seed)
    for sample in convs:
        turns = E.session_turns(sample)
        rec, hx = replay_history(rt, fmt, ident, turns, args.window, xs, COPY_LAYERS)
        full = rec.transcript[:rec.tokens_absorbed]
        with torch.no_grad():
            hv = {li: mods[li].w_v(hx[li])[:, COPY] for li in COPY_LAYERS}
            hb = {li: torch.sigmoid(mods[li].w_beta(hx[li]))[:, COPY][:, 0] for li in COPY_LAYERS}
        top = hb[20].topk(24).indices.sort().values
        print("layer 20's most open gates:", " ".join(
            f"{tok.decode([full[i]])!r}:{hb[20][i]:.2f}" for i in top), flush=True)
        # Each answer's first token as the model may say it after "assistant\n" (bare or after
        # a space), and where in the transcript it was last written. The last positions are
        # the fit's own candidates: the values' first tokens, not every written token.
        first_ids, last = {}, {}
        for q in sample["qa"]:
            a = str(q["answer"])
            first_ids[a] = (tok.encode(a, add_special_tokens=False)[0],
                            tok.encode(" " + a, add_special_tokens=False)[0])
            occ = [i for i, t in enumerate(full) if t in first_ids[a]]
            if occ:
                last[a] = occ[-1]
        for q in sample["qa"]:
            dist = E.evidence_distance(tok, turns, q.get("evidence", []))
            if not args.all and (dist is None or dist <= args.window):
                continue
            ans = str(q["answer"])
            first, spaced = first_ids[ans]
            at = last.get(ans)
            plan = plan_turn(fmt, copy.deepcopy(rec), [{"role": "user", "content": q["question"]}],
                             args.window, 8192, 16)
            row = {"sample": sample["sample_id"], "question": q["question"], "answer": ans,
                   "category": q.get("category"), "distance": dist, "value_pos": at}
            for name, g in (("shipped", 1.0), ("silenced", 0.0), ("double", 2.0)):
                set_copy_gain(g)
                for li in COPY_LAYERS:
                    reads[li].clear()
                r = rt.run(plan.prompt, plan.initial_state, plan.write_start, 12, eos)
                lg = r.step_logits[0]
                row[name] = {"prediction": fmt.decode(r.tokens),
                             "rank_first": int((lg > lg[first]).sum()),
                             "rank_spaced": int((lg > lg[spaced]).sum()),
                             "top": fmt.tok.convert_ids_to_tokens(lg.topk(3).indices.tolist())}
                if name == "shipped":
                    # the prompt's forward, its last position: the read that shapes the answer
                    m = {li: reads[li][0][BASE_HEADS:BASE_HEADS + COPY_HEADS].flatten()
                         for li in COPY_LAYERS}
            set_copy_gain(1.0)
            per_layer = {}
            for li in COPY_LAYERS:
                open_ = (hb[li] > 0.5 * hb[li].max()).nonzero().flatten()
                cs = torch.nn.functional.cosine_similarity(hv[li][open_], m[li][None], dim=-1)
                best = int(open_[cs.argmax()])
                per_layer[li] = {"best": best, "hit": full[best] in (first, spaced),
                                 "best_token": tok.decode([full[best]]),
                                 "read_norm": float(m[li].norm()),
                                 "cos_best": float(cs.max()),
                                 "cos_answer": float(cs[open_ == at].max())
                                 if at is not None and (open_ == at).any() else None,
                                 "answer_gate_open": at is not None and bool((open_ == at).any()),
                                 "beta_answer": float(hb[li][at]) if at is not None else None,
                                 "beta_rank": int((hb[li] > hb[li][at]).sum())
                                 if at is not None else None,
                                 "beta_max": float(hb[li].max()), "open": len(open_)}
                if at is not None and len(last) > 1:
                    names = list(last)
                    cv = hv[li][[last[n] for n in names]]
                    cs2 = torch.nn.functional.cosine_similarity(cv, m[li][None], dim=-1)
                    per_layer[li]["fit_hit"] = names[int(cs2.argmax())] == ans
                    per_layer[li]["fit_candidates"] = len(names)
            row["layers"] = per_layer
            rows.append(row)
            print(f"{ans!r:>22} d={dist} | shipped {row['shipped']['prediction'][:18]!r} "
                  f"r{row['shipped']['rank_first']}/{row['shipped']['rank_spaced']} | silenced "
                  f"r{row['silenced']['rank_first']}/{row['silenced']['rank_spaced']} | double "
                  f"{row['double']['prediction'][:14]!r} r{row['double']['rank_first']}/{row['double']['rank_spaced']} | "
                  f"hits {sum(v['hit'] for v in per_layer.values())}/8 "
                  f"read→{Counter(v['best_token'] for v in per_layer.values()).most_common(2)}",
                  flush=True)
    n = len(rows)

    def top1(name):
        return sum(min(r[name]["rank_first"], r[name]["rank_spaced"]) == 0 for r in rows)

    def top10(name):
        return sum(min(r[name]["rank_first"], r[name]["rank_spaced"]) < 10 for r in rows)

    print(f"\n{n} questions outside W")
    for name in ("shipped", "silenced", "double"):
        print(f"{name:>9}: first token top-1 {top1(name)}, top-10 {top10(name)}, "
              f"exact {sum(E.exact_match(r[name]['prediction'], r['answer']) for r in rows):.0f}")
    for li in COPY_LAYERS:
        print(f"layer {li}: read points at the asked value {sum(r['layers'][li]['hit'] for r in rows)}/{n}, "
              f"its gate open {sum(r['layers'][li]['answer_gate_open'] for r in rows)}/{n}, "
              f"among the values' first tokens (the fit's measure) "
              f"{sum(r['layers'][li].get('fit_hit', False) for r in rows)}/{n}")
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
