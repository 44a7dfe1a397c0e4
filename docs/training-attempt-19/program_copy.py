"""Attempt 19, step 2: eight state heads programmed as one copying head in layers 16-23.
oracle_copy.py found that layers 16-23's attention output, given what a head attending to the
fact's value would write (OV_L x_y) projected on 64 fixed directions a layer, makes the model
say held-out values (46/48 first tokens), and on 8 directions does not (7/48). Eight state
heads a layer carry 64 numbers, so here heads 5-12 (attempt 12's four stay as they are) are
set in closed form in layers 16-23 and silent elsewhere:

- values: head j stores P_L[8j:8j+8] OV_L x, exactly (W_v = P_j OV_L), P_L the top-64
  uncentred principal directions of OV_L x over the train split's value tokens; read-out
  B_o = gain · P_jᵀ / scale, so that the eight reads together add gain · P Pᵀ OV_L x_y.
- keys: the fact's slot code (10 codes in the first 7 of 8 dimensions), as attempt 18;
  queries: the asked slot's code at the generation prompt and the answer, and the 8th
  dimension, where no key points, everywhere else, so that the heads read nothing there;
  gates: attempt 18's value-token probe, β = 0.12 at value tokens, 1e-4 elsewhere.
  All eight heads share keys, queries and gates: together they are one 8 × 64 state.

A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19 .venv/bin/python \
        docs/training-attempt-19/program_copy.py IN OUT [--gains G ...] [--chats N] \
        [--general N] [--beta-pos B] [--quiet-questions]

The runs of the record: defaults (att19copy.log); --general 300 --gains 1.5 2 3
(att19g12.log); --general 300 --beta-pos 0.3 --gains 0.6 0.8 1.2 (att19g30.log);
--general 300 --quiet-questions --gains 2 (att19q.log). The adapter keeps the best gain.
"""

import argparse
import time

import program_memory as P
import torch
from oracle_copy import ov_matrix
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem import scan
from deltamem.adapter import load_adapter, save_adapter, widen_state_heads
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder

COPY_LAYERS = range(16, 24)
COPY_HEADS = 8
BASE_HEADS = 4  # attempt 12's


def copy_columns(r: int) -> slice:
    """The copy heads' rows of W_q/W_k/W_v/W_β and columns of B_q/B_o."""
    return slice(BASE_HEADS * r, (BASE_HEADS + COPY_HEADS) * r)


def collect(rt, tok, enc, layers, words, n_chats):
    """Per copy layer: x at history value tokens (slot), at other history tokens (sampled),
    at the read's generation prompt and answer (asked slot), at the read's other tokens."""
    slots = list(D.SLOTS)
    hx = {li: [] for li in COPY_LAYERS}
    rx = {li: [] for li in COPY_LAYERS}
    qx = {li: [] for li in COPY_LAYERS}  # the question's own tokens (a served turn writes them)
    hslot, rslot = [], []
    inp = P.Inputs(layers)
    pool = D.pools("train")
    t0 = time.time()
    for c in range(n_chats):
        rng, conv, hist, ids, label, state = P.fit_chat(rt, tok, enc, inp, pool, words,
                                                        f"program-copy:{c}", c % 2 == 0)
        keep = (label >= 0) | (torch.rand(len(ids)) < 0.12)
        for li in COPY_LAYERS:
            hx[li].append(inp.xs[li][keep])
        hslot.append(label[keep])
        for fact in conv.facts:
            question = rng.choice(pool.question[fact.slot] + P.EXTRA_QUESTIONS[fact.slot])
            ep = D.Episode(hist, question.format(p=fact.person), fact.value, fact.category,
                           fact.slot)
            context = rng.choice([0, min(D.messages_after_fact(ep), 6)])
            r_ids, q_start, a_start = enc.read(ep, context)
            lo, hi = a_start - 4, len(r_ids) - 1
            lab = torch.full((len(r_ids),), -1)
            lab[lo:hi] = slots.index(fact.slot)
            sel = (lab >= 0) | (torch.rand(len(r_ids)) < 0.3)
            inp.xs.clear()
            with torch.no_grad():
                rt.forward(torch.tensor([r_ids]), state,
                           torch.zeros(1, len(r_ids), dtype=torch.bool))
            for li in COPY_LAYERS:
                rx[li].append(inp.xs[li][sel])
                qx[li].append(inp.xs[li][q_start:a_start - 4])
            rslot.append(lab[sel])
        if c % 20 == 19:
            print(f"  {c + 1} chats, {time.time() - t0:.0f} s", flush=True)
    inp.remove()
    return ({li: torch.cat(v).double() for li, v in hx.items()}, torch.cat(hslot),
            {li: torch.cat(v).double() for li, v in rx.items()}, torch.cat(rslot),
            {li: torch.cat(v).double() for li, v in qx.items()})


def collect_general(rt, enc, layers, n: int):
    """Per copy layer: x over sessionless general questions, written as served (the template's
    own system prompt, the question, the generation prompt), the evaluator's left out."""
    from deltamem.evaluate import GENERAL_SET

    held = {q for q, _ in GENERAL_SET}
    xs = {li: [] for li in COPY_LAYERS}
    inp = P.Inputs(layers)
    for q in [q for q in D.general_prompts(n) if q not in held]:
        ids = enc.ids([{"role": "user", "content": q}], generation_prompt=True)
        inp.xs.clear()
        with torch.no_grad():
            rt.forward(torch.tensor([ids]), None, torch.ones(1, len(ids), dtype=torch.bool))
        for li in COPY_LAYERS:
            xs[li].append(inp.xs[li][-8:])
    inp.remove()
    return {li: torch.cat(v).double() for li, v in xs.items()}


def program(rt, tok, enc, words, source_fingerprint, n_chats, n_general,
            quiet_questions=False):
    cfg = rt.adapter.config
    r = cfg.rank
    layers = list(rt.adapter.module.layers.values())
    blocks = rt.model.model.layers
    mc = rt.model.config
    codes7 = P.slot_codes(len(D.SLOTS), r - 1).double()
    codes = torch.cat([codes7, torch.zeros(len(codes7), 1, dtype=codes7.dtype)], 1)
    null = torch.zeros(r, dtype=codes.dtype)
    null[-1] = 1
    print("slot codes: max |cos|", float((codes @ codes.T - torch.eye(len(codes))).abs().max()))
    # The inputs depend on the source adapter's heads (on while collecting), not on the copy
    # heads (silent then): cached per source adapter and chat count.
    cache = f"/tmp/program_copy_{source_fingerprint[7:]}_{n_chats}.pt"
    try:
        hx, hslot, rx, rslot, qx = torch.load(cache)
    except FileNotFoundError:
        hx, hslot, rx, rslot, qx = collect(rt, tok, enc, layers, words, n_chats)
        torch.save((hx, hslot, rx, rslot, qx), cache)
    gx = collect_general(rt, enc, layers, n_general) if n_general else None
    val = hslot >= 0
    if int(val.sum()) < COPY_HEADS * r:
        raise SystemExit(f"{int(val.sum())} value tokens cannot span {COPY_HEADS * r} value "
                         f"directions: fit on more chats (--chats)")
    print(f"{len(hslot)} history tokens ({int(val.sum())} value tokens), {len(rslot)} read "
          f"positions ({int((rslot >= 0).sum())} asking)", flush=True)

    def target(lab):
        t = torch.where((lab >= 0)[:, None], codes[lab.clamp_min(0)], null)
        return torch.atanh(0.9 * t / t.abs().max(1, keepdim=True).values)

    perm = torch.randperm(len(rslot), generator=torch.Generator().manual_seed(1))
    tr, te = perm[:int(0.8 * len(perm))], perm[int(0.8 * len(perm)):]
    cols = copy_columns(r)
    with torch.no_grad():
        for li, layer in enumerate(layers):
            layer.b_o.weight[:, BASE_HEADS * r:] = 0
            layer.b_q.weight[:, BASE_HEADS * r:] = 0
            if li not in COPY_LAYERS:
                continue
            x, xr = hx[li], rx[li]
            wk = P.ridge(x[val], target(hslot[val]))
            # Queries: asked slot at the answer, null elsewhere (read pass and history alike).
            # and at the end of sessionless general questions, whose state holds their words.
            xq = torch.cat([xr[tr], x[~val], *([gx[li]] if gx else [])])
            nq = len(gx[li]) if gx else 0
            wq = P.ridge(xq, target(torch.cat([rslot[tr], hslot[~val],
                                               torch.full((nq,), -1)])))
            qte = torch.tanh(xr[te] @ wq.T)
            qte = qte / qte.norm(dim=1, keepdim=True)
            ask = rslot[te] >= 0
            q_acc = float(((qte[ask] @ codes.T).argmax(1) == rslot[te][ask]).float().mean())
            leak = float((qte[~ask] @ codes.T).abs().max(1).values.mean())
            if quiet_questions:  # a question's words (its person's name) are not facts
                wb, bb, g_acc = P.fit_gate(torch.cat([x, qx[li]]), torch.cat(
                    [val, torch.zeros(len(qx[li]), dtype=torch.bool)]))
            else:
                wb, bb, g_acc = P.fit_gate(x, val)
            ov = ov_matrix(blocks[li].self_attn, mc.num_attention_heads,
                           mc.num_key_value_heads).double()
            basis = torch.linalg.svd(x[val] @ ov.T, full_matrices=False)[2][:COPY_HEADS * r]
            for name, w in (("w_k", wk), ("w_q", wq), ("w_beta", wb.expand(r, -1))):
                getattr(layer, name).weight[cols] = w.float().repeat(COPY_HEADS, 1)
            layer.w_beta.bias[cols] = bb
            layer.w_v.weight[cols] = (basis @ ov).float()
            layer.b_o.weight[:, cols] = basis.T.float() / cfg.scale
            print(f"layer {li}: query→slot {q_acc:.3f}  |q̂·code| off-answer {leak:.3f}  "
                  f"gate {g_acc:.3f}", flush=True)


def set_gain(rt, units: dict, gain: float):
    """Copy heads' read-out = gain × the unit columns `program` set (kept in `units`)."""
    cols = copy_columns(rt.adapter.config.rank)
    with torch.no_grad():
        for li, w in units.items():
            rt.adapter.module.layers[str(li)].b_o.weight[:, cols] = w * gain


def copy_runtime(src: str, device: str = "cpu"):
    """(tokenizer, encoder, copy words, source adapter, HF runtime of the source widened to
    BASE_HEADS + COPY_HEADS heads): the common start of attempts 19's and 20's scripts."""
    scan.USE_CPU_KERNEL = False  # numba slows later torch work (attempt 18)
    torch.manual_seed(0)
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    words = D.copy_word_lists(list(tok.get_vocab()))
    source = load_adapter(src)
    rt = DeltaMemHF.from_pretrained(md, adapter=widen_state_heads(source,
                                                                  BASE_HEADS + COPY_HEADS),
                                    device=device)
    return tok, enc, words, source, rt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--gains", type=float, nargs="*", default=[2.0, 4.0, 8.0, 16.0])
    ap.add_argument("--chats", type=int, default=80)
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--general", type=int, default=0,
                    help="general questions whose answer start the queries must not ask from")
    ap.add_argument("--beta-pos", type=float, default=P.BETA_POS)
    ap.add_argument("--quiet-questions", action="store_true",
                    help="fit the gates to write nothing at a question's own tokens")
    args = ap.parse_args(argv)
    tok, enc, words, source, rt = copy_runtime(args.src)
    ad = rt.adapter
    t0 = time.time()
    P.BETA_POS = args.beta_pos
    program(rt, tok, enc, words, source.fingerprint(), args.chats, args.general,
            args.quiet_questions)
    cols = copy_columns(ad.config.rank)
    units = {li: rt.adapter.module.layers[str(li)].b_o.weight[:, cols].clone()
             for li in COPY_LAYERS}
    gain = P.best_gain(rt, enc, lambda g: set_gain(rt, units, g), args.gains, args.episodes, t0)
    set_gain(rt, units, gain)
    save_adapter(rt.adapter, args.dst, {"programmed": "copy heads in layers 16-23 "
                                                      "(docs/training-attempt-19)"})
    print("saved", args.dst, "gain", gain)


if __name__ == "__main__":
    main()
