"""Attempt 28: the copy heads trained by gradient through the served answer's loss, on the CPU.

Attempts 20-27 fitted the copy heads (layers 16-23, heads 4-11 of the shipped adapter) to
surrogates: the read at the answer must point at the asked value's v̂, or name its (kind,
place) code. Attempt 27's oracles put the loss in the keys and queries, which a linear map of
x realises only in part, and proposed learning them end to end instead. That was thought to
need a GPU. It does not if the parts that the copy heads barely move are cached once:

- the served turn flow of each train chat is replayed in the HF runtime with the shipped
  adapter (server.sessions.plan_turn / finish_turn, W = 256, as diagnose.py), keeping x of
  layers 16-23 over every written token;
- per question, the served prompt minus its last token is run once and kept: its KV cache
  (float16), the state after it, and x of its written tokens (the question);
- a step recomputes, for the copy heads only, the state at the answer from the cached x with
  the current weights (--parts: W_k, W_q, W_β, and W_v, B_o's copy columns), puts it beside the
  cached state of the other heads, and runs the tail (the prompt's last token, " " + value,
  <|im_end|>) on the cached KV through all 30 layers; the loss is cross-entropy on the
  answer's tokens and <|im_end|>, so the gradient reaches the copy heads through their reads
  at the answer and every layer above.

What the cache freezes: x at the written tokens and the prompt's KV depend on the copy heads'
reads there. So the loss adds --rest times the copy read-out's mean |Δo|² over the written
tokens, relative to the source adapter's on the held-out questions (without it, run 2 of the
README, the served history moved). The replay (diagnose.py) is the check that serves the
trained heads for real.

The held-out measure is teacher-forced: a far question (its value's last mention more than W
written tokens before the question) counts when every answer token and <|im_end|> is the
argmax. A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21:docs/training-attempt-22 \
        .venv/bin/python docs/training-attempt-28/e2e_copy.py collect --split train --start 0 --n 20 \
        --more-templates --cache /tmp/att28
    ... e2e_copy.py train --out OUT --cache /tmp/att28 --train-blocks 0:20 20:40 \
        --held-blocks 0:16 16:32 --held-far-only --parts kqbo

The runs of the record are in README.md (runs 1 and 2 predate --rest: --rest 0).
"""

import argparse
import copy
import glob
import random
import time

import fit_address as FA
import program_memory as P
import torch
import torch.nn.functional as F
from diagnose import keep_inputs, replay_history, replay_runtime
from program_copy import copy_columns
from transformers import DynamicCache

from deltamem import data as D
from deltamem import evaluate as E
from deltamem import scan
from deltamem.adapter import save_adapter
from server.sessions import plan_turn

WINDOW = 256
LAYERS = list(range(16, 24))
R = 8
COPY = copy_columns(R)  # rows 32:96 of W_q/W_k/W_v/W_β, columns of B_o
H0, H1 = COPY.start // R, COPY.stop // R  # copy heads 4..11


@torch.no_grad()
def cache_question(rt, fmt, plan, answer: list[int], xs: dict) -> dict:
    """A question's cached prompt: the served prompt minus its last token run once from the
    session's state (xs filled by diagnose.keep_inputs), keeping its KV (float16), the state
    after it, x of its written tokens, and the tail a step runs (the prompt's last token, the
    answer, <|im_end|>)."""
    n = len(plan.prompt) - 1
    cache = DynamicCache()
    mask = (torch.arange(n) >= plan.write_start)[None]
    _, state, _ = rt.forward(torch.tensor([plan.prompt[:n]]), plan.initial_state[None], mask,
                             past_key_values=cache)
    return {"kv": [(lay.keys.half(), lay.values.half()) for lay in cache.layers],
            "state": state[0], "n": n,
            "px": {li: xs[li][plan.write_start:n].half() for li in LAYERS},
            "tail": [plan.prompt[-1], *answer, fmt.im_end]}


def collect(args):
    tok, rt, fmt, ident = replay_runtime(args.adapter)
    words = D.copy_word_lists(list(tok.get_vocab()))
    xs = keep_inputs(rt, LAYERS)
    pool, questions = FA.chat_source(args.split, args.more_templates)
    chats = []
    t0 = time.time()
    for ci in range(args.start, args.start + args.n):
        rng = random.Random(f"att28:{args.split}:{ci}")
        conv = FA.fit_conversation(rng, pool, words, args.split, ci)
        turns = E.session_turns({"conversation": D.locomo_layout(conv)[0]})
        with torch.no_grad():
            rec, hx = replay_history(rt, fmt, ident, turns, WINDOW, xs, LAYERS)
        ids = rec.transcript[:rec.tokens_absorbed]
        qs = []
        for fact in conv.facts:
            spans = P.value_spans(tok, ids, [fact.value])
            if not spans:
                continue
            question = rng.choice(questions(fact.slot)).format(p=fact.person)
            plan = plan_turn(fmt, copy.deepcopy(rec), [{"role": "user", "content": question}],
                             WINDOW, 8192, 16)
            answer = tok(D.ANSWER_PREFIX + fact.value, add_special_tokens=False).input_ids
            qs.append({**cache_question(rt, fmt, plan, answer, xs),
                       "far": len(ids) - spans[-1][0] > WINDOW,
                       "category": fact.category, "answer": fact.value})
        chats.append({"hx": {li: x.half() for li, x in hx.items()}, "qs": qs})
        print(f"  {args.split} chat {ci}: {len(ids)} tokens, {len(qs)} questions "
              f"({sum(q['far'] for q in qs)} far), {time.time() - t0:.0f} s", flush=True)
    path = f"{args.cache}_{args.split}_{args.start}_{args.n}.pt"
    torch.save(chats, path)
    print("saved", path)


def trainable(rt, parts: str):
    """The copy heads' parameters that train, as (module weight, its rows or columns)."""
    out = []
    for li in LAYERS:
        m = rt.adapter.module.layer(li)
        if "k" in parts:
            out.append((m.w_k.weight, 0))
        if "q" in parts:
            out.append((m.w_q.weight, 0))
        if "b" in parts:
            out += [(m.w_beta.weight, 0), (m.w_beta.bias, 0)]
        if "v" in parts:
            out.append((m.w_v.weight, 0))
        if "o" in parts:
            out.append((m.b_o.weight, 1))
    return out


def copy_scan(m, x, s0):
    """The copy heads of layer module m over x (1, T, d) from state s0: their read-out Δo
    (T, d) and the state after."""
    p = m.project(x)
    sl = slice(H0, H1)
    reads, s = scan.delta_rule_scan(p.q[:, :, sl], p.k[:, :, sl], p.v[:, :, sl],
                                    p.beta[:, :, sl], s0)
    return m.cfg.scale * reads[0].flatten(-2) @ m.b_o.weight[:, COPY].T, s


@torch.no_grad()
def copy_grads_only(params):
    """Zero the gradient outside the copy heads' rows (columns of B_o): only they move."""
    for w, axis in params:
        keep = torch.zeros_like(w.grad, dtype=torch.bool)
        if axis == 0:
            keep[COPY] = True
        else:
            keep[:, COPY] = True
        w.grad[~keep] = 0


def copy_states(rt, chat, q):
    """The copy heads' state (8 layers, 8 heads, r, r) after the history and the question's
    written tokens, from the cached x with the current weights (differentiable), and the
    mean squared norm of their read-out Δo over those tokens: what the copy heads add to the
    residual stream off the answer, which the cache holds fixed."""
    out, off = [], 0.0
    for li in LAYERS:
        x = torch.cat([chat["hx"][li], q["px"][li]]).float()[None]
        do, s = copy_scan(rt.adapter.module.layer(li), x, x.new_zeros(1, H1 - H0, R, R))
        off = off + do.square().sum(-1).mean() / len(LAYERS)
        out.append(s[0])
    return out, off


def copy_slots(rt) -> dict[int, int]:
    """{copy layer: its row in the adapter's state}."""
    return {li: rt.adapter.config.layers.index(li) for li in LAYERS}


def tail_forward(rt, q, slots, states: dict):
    """The tail's logits on a question's cached prompt KV, with the copy heads' state of each
    copy layer replaced by states[layer] (8 heads, r, r) and the other heads' as cached."""
    full = q["state"].clone()
    for li, s in states.items():
        full[slots[li], H0:H1] = s
    cache = DynamicCache()
    for i, (k, v) in enumerate(q["kv"]):
        cache.update(k.float(), v.float(), i)
    ids = torch.tensor([q["tail"]])  # positions follow the cache's length
    logits, _, _ = rt.forward(ids, full[None], torch.ones_like(ids, dtype=torch.bool),
                              past_key_values=cache)
    return logits[0]


def tail_logits(rt, chat, q, slots):
    """The tail's logits on the cached prompt, with the copy heads' state recomputed (the
    other heads' as cached), and copy_states' off-answer Δo. Differentiable when grad is on."""
    states, off = copy_states(rt, chat, q)
    return tail_forward(rt, q, slots, dict(zip(LAYERS, states, strict=True))), off


def tail_loss(rt, chat, q, slots, grad: bool):
    """Cross-entropy of the answer's tokens and <|im_end|> given the cached prompt, whether
    every one of them is the argmax, whether the first is, and copy_states' off-answer Δo."""
    with torch.set_grad_enabled(grad):
        logits, off = tail_logits(rt, chat, q, slots)
    lg = logits[:-1]
    tgt = torch.tensor(q["tail"][1:])
    ce = F.cross_entropy(lg, tgt)
    return ce, bool((lg.argmax(-1) == tgt).all()), int(lg[0].argmax() == tgt[0]), off


def load_blocks(prefix, split, specs):
    """Cache blocks ("a:b" chats of a split), memory-mapped: runs side by side share one copy
    in the page cache."""
    chats = []
    for s in specs:
        a, b = map(int, s.split(":"))
        chats += torch.load(f"{prefix}_{split}_{a}_{b - a}.pt", mmap=True)
    return chats


def far_only(chats):
    """The chats with their far questions only: the measure that matters, at 40% of the cost."""
    return [{**ch, "qs": [q for q in ch["qs"] if q["far"]]} for ch in chats]


def trainable_adam(rt, parts: str, lr: float):
    """Freeze the adapter but the copy-head weights `parts` names: (trainable, Adam on them)."""
    for w in rt.adapter.module.parameters():
        w.requires_grad_(False)
    params = trainable(rt, parts)
    for w, _ in params:
        w.requires_grad_(True)
    return params, torch.optim.Adam([w for w, _ in params], lr=lr)


def evaluate(rt, chats, slots):
    far_ok = far_first = far = near_ok = near = 0
    ce_far = off_sum = 0.0
    with torch.no_grad():
        for c in chats:
            for q in c["qs"]:
                ce, ok, first, off = tail_loss(rt, c, q, slots, False)
                off_sum += float(off)
                if q["far"]:
                    far += 1
                    far_ok += ok
                    far_first += first
                    ce_far += float(ce)
                else:
                    near += 1
                    near_ok += ok
    return {"far": far, "far_exact": far_ok, "far_first": far_first,
            "far_ce": round(ce_far / max(far, 1), 4), "near": near, "near_exact": near_ok,
            "off_answer_do2": round(off_sum / max(far + near, 1), 5)}


def train(args):
    tok, rt, fmt, ident = replay_runtime(args.adapter)
    slots = copy_slots(rt)
    train_chats = load_blocks(args.cache, "train", args.train_blocks)
    held = load_blocks(args.cache, "heldout", args.held_blocks)
    if args.held_far_only:
        held = far_only(held)
    qs = [(ci, qi) for ci, ch in enumerate(train_chats) for qi in range(len(ch["qs"]))]
    print(f"{len(train_chats)} train chats, {len(qs)} questions; {len(held)} held-out chats",
          flush=True)
    params, opt = trainable_adam(rt, args.parts, args.lr)
    res = evaluate(rt, held, slots)
    print(f"step 0: held {res}", flush=True)
    # The copy heads' read-out off the answer, relative to the source adapter's (whose queries
    # rest there), is penalised: the cached history and prompt KV assume it stays small, and
    # served, it feeds every later layer.
    off0 = res["off_answer_do2"]
    best = (res["far_exact"], -res["far_ce"])
    rng = random.Random(0)
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        rng.shuffle(qs)
        for i in range(0, len(qs), args.batch):
            opt.zero_grad()
            tot = tot_rest = 0.0
            for ci, qi in qs[i:i + args.batch]:
                ce, _, _, off = tail_loss(rt, train_chats[ci], train_chats[ci]["qs"][qi],
                                          slots, True)
                rest = off / off0
                ((ce + args.rest * rest) / args.batch).backward()
                tot_rest += float(rest.detach())
                tot += float(ce.detach())
            copy_grads_only(params)
            opt.step()
            step += 1
            if step % args.log == 0:
                print(f"epoch {epoch} step {step}: train ce {tot / args.batch:.3f} "
                      f"rest {tot_rest / args.batch:.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
            if step % args.eval_every == 0:
                res = evaluate(rt, held, slots)
                print(f"step {step}: held {res}", flush=True)
                key = (res["far_exact"], -res["far_ce"])
                if key > best:
                    best = key
                    save(rt, params, args.out, step, res)
    res = evaluate(rt, held, slots)
    print(f"end, step {step}: held {res}", flush=True)
    if (res["far_exact"], -res["far_ce"]) > best or not glob.glob(args.out + "/*"):
        save(rt, params, args.out, step, res)


def save(rt, params, out, step, res):
    for w, _ in params:
        w.requires_grad_(False)
    save_adapter(rt.adapter, out, {"trained": f"attempt 28: copy heads by gradient through "
                                              f"the served answer loss, step {step}, held {res}"},
                 dtype=torch.float16)
    for w, _ in params:
        w.requires_grad_(True)
    print("saved", out, "at step", step, flush=True)


def train_flags(ap, parts: str, eval_every: int):
    """The flags a training run over the cache takes (this script's and attempt 29's)."""
    ap.add_argument("--adapter", default="deltamem/adapters/smollm2-135m-instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/att28")
    ap.add_argument("--train-blocks", nargs="+", required=True)
    ap.add_argument("--held-blocks", nargs="+", required=True)
    ap.add_argument("--parts", default=parts, help="which copy-head weights train: k q b v o")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rest", type=float, default=1.0,
                    help="weight of the off-answer read-out (mean |Δo|², over the source's)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--log", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=eval_every)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--adapter", default="deltamem/adapters/smollm2-135m-instruct")
    c.add_argument("--split", default="train")
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--n", type=int, default=20)
    c.add_argument("--more-templates", action="store_true")
    c.add_argument("--cache", default="/tmp/att28")
    t = sub.add_parser("train")
    train_flags(t, parts="kqb", eval_every=20)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--held-far-only", action="store_true",
                   help="measure the far held-out questions only")
    args = ap.parse_args()
    collect(args) if args.cmd == "collect" else train(args)


if __name__ == "__main__":
    main()
