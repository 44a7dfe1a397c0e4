"""`deltamem train`: train a δ-mem adapter on generated memory episodes (DESIGN.md §1).

One episode: a write pass over the history (chat template, writes on, gradients flow through
the state), then a read pass with writes off over only [system, question, answer] starting
from the write pass's final state; the loss is next-token cross-entropy on the answer tokens
(plus <|im_end|>), plus 0.01 · mean over layers of (mean β − 0.05)². The history is never in
the read pass's attention, so the state is the only way the answer can get there.

Only the δ-mem parameters train (the runtime freezes the backbone). Data are indexed by
(seed, step, slot), so a resumed run sees exactly the episodes an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

BETA_TARGET = 0.05
BETA_WEIGHT = 0.01
DEFAULT_OUT = Path("results/train")


def _span(least: int):
    """An argparse type for 'min,max' of a count, least <= min <= max."""
    def parse(text: str) -> tuple[int, int]:
        try:
            lo, hi = (int(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'min,max', got {text!r}") from None
        if not least <= lo <= hi:
            raise argparse.ArgumentTypeError(f"expected {least} <= min <= max, got {text!r}")
        return lo, hi
    return parse


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="backbone folder (default: the default model)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                   help="checkpoints, log, metrics, loss curve, card (default: results/train)")
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="start from this adapter folder instead of a fresh initialisation")
    p.add_argument("--layers", default="all",
                   help="layers a fresh adapter wraps: 'all', 'last:N' or 'i,j,...' "
                        "(default all; --tiny uses last:4, whose backward stays shallow)")
    p.add_argument("--state-heads", type=int, default=None,
                   help="state heads per layer: 1 = TSW, 4 = DESIGN's MSW (four 8×8 states, "
                        "reads of rank 32). A new adapter gets this many (default 1); with "
                        "--init-adapter, more heads than the adapter has widens it: the new "
                        "heads start silent (zero read-out), so training starts from the same "
                        "function")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/last (weights, optimizer, step, metrics)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch", type=int, default=4, help="episodes per step (default 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction (default 0.1)")
    p.add_argument("--min-lr-frac", type=float, default=0.05,
                   help="cosine floor as a fraction of the peak lr (default 0.05)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of init and data (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the backbone and the adapter: cpu, cuda, cuda:N "
                        "(default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the frozen backbone; the adapter and the state stay float32 "
                        "(default float32; bfloat16 is what the engine serves and is faster "
                        "where the CPU has bf16 instructions)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of the training loop: the learning-rate schedule "
                        "and the curriculum follow max(step/steps, elapsed/budget), and "
                        "training stops at whichever ends first (default: steps only)")
    p.add_argument("--curriculum", default="0:0,0.3:1,0.45:2,0.6:3,0.75:4,0.9:5",
                   help="frac:stage,... the stage reached at each fraction of the run "
                        "(stages in deltamem.data.STAGES; default "
                        "0:0,0.3:1,0.45:2,0.6:3,0.75:4,0.9:5)")
    p.add_argument("--advance-at", type=float, default=0.7,
                   help="move to the next stage early when the recent train exact match "
                        "reaches this (default 0.7; >1 disables)")
    p.add_argument("--p-earlier", type=float, default=0.3,
                   help="chance an episode comes from an earlier stage (default 0.3)")
    p.add_argument("--max-stage", type=int, default=None,
                   help="never go beyond this stage (default: the last)")
    p.add_argument("--facts", type=_span(1), default=None,
                   help="override facts per episode for every stage, 'min,max' (e.g. 1,1)")
    p.add_argument("--chatter", type=_span(0), default=None,
                   help="override chatter turns per episode for every stage but the probe "
                        "(stage 0), 'min,max': longer histories ask the state to carry a fact "
                        "across more text than a window holds (e.g. 20,40)")
    p.add_argument("--sessions", type=int, choices=range(1, 11), metavar="N", default=None,
                   help="override sessions per episode (1-10) for every stage but the probe")
    p.add_argument("--probe-values", type=int, default=None,
                   help="values per kind in stage 0, the probe setting (default: the stage's "
                        "own, 6); 0 = the whole pools plus copy words (--p-copy), which asks "
                        "the state to carry values it cannot memorise")
    p.add_argument("--read-write-prob", type=float, default=1.0,
                   help="chance that the read pass writes its question and answer tokens, as "
                        "a server does with every question turn (default 1; 0 is the "
                        "reference recipe's read pass without writes)")
    p.add_argument("--context-prob", type=float, default=0.5,
                   help="chance that the read pass re-sends a window of the history (the last "
                        "1..all messages, not written) before the question, as a served turn "
                        "with a window does (default 0.5; otherwise the state only)")
    p.add_argument("--outside-window", type=float, default=0.0,
                   help="chance that a served episode's read pass re-sends every history "
                        "message after the asked fact and none before it, so the answer is "
                        "in the state only, behind a window of text, as the evaluation's "
                        "questions outside W are (default 0; it takes precedence over "
                        "--context-prob)")
    p.add_argument("--p-copy", type=float, default=0.5,
                   help="chance that an open-class value (pet, city, job ...) is a random "
                        "word of the vocabulary (one token, unless --p-multi) instead of a "
                        "pool value, so the "
                        "state learns to carry values rather than memorise a pool (default 0.5)")
    p.add_argument("--p-multi", type=float, default=0.0,
                   help="chance that a copy value (--p-copy) is a multi-token pseudo-word "
                        "(a vocabulary word plus one or two word pieces), as most held-out "
                        "values are several tokens; above 0, events get copy phrases too "
                        "(default 0)")
    p.add_argument("--general-per-step", type=int, default=2,
                   help="general-ability episodes per step: a sessionless question whose "
                        "target is the backbone's own answer, so δ-mem leaves such answers "
                        "alone (default 2; 0 = none)")
    p.add_argument("--general-prompts", type=int, default=0,
                   help="templated prompts added to the 48 fixed general-ability questions "
                        "(deltamem.data.general_prompts; the evaluator's are left out); a long "
                        "run fits a small set and drifts elsewhere (default 0)")
    p.add_argument("--general-weight", type=float, default=1.0,
                   help="weight of the general-ability loss (default 1)")
    p.add_argument("--general-loss", choices=("ce", "kl"), default="ce",
                   help="general-ability loss on the answer tokens: 'ce', cross-entropy of "
                        "the backbone's greedy answer; 'kl', KL(backbone || δ-mem) over the "
                        "whole next-token distribution, which pins more than the top token "
                        "(default ce)")
    p.add_argument("--beta-bias-init", type=float, default=None,
                   help="initial b_beta of a fresh adapter, or of the new state heads when "
                        "--state-heads widens --init-adapter (default: DESIGN's -1.5); lower "
                        "values forget less over long histories at the start")
    p.add_argument("--eval-episodes", type=int, default=64,
                   help="held-out episodes of the final evaluation, per stage (default 64)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="periodic held-out evaluation every N steps, 0 = never (default 100)")
    p.add_argument("--eval-periodic-episodes", type=int, default=32,
                   help="held-out episodes of each periodic evaluation (default 32)")
    p.add_argument("--eval-seed", type=int, default=7, help="seed of the held-out episodes")
    p.add_argument("--before-episodes", type=int, default=None,
                   help="held-out episodes per stage of the before-training evaluation "
                        "(default: --eval-episodes)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--tiny", action="store_true",
                   help="a fast smoke configuration: 4 steps, 2 episodes, stages 0-1, tiny eval")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--finalize", action="store_true",
                   help="train no further: resume <out-dir>/last, evaluate the best checkpoint, "
                        "write the adapter folder with its card and loss curve")


def _tiny(args) -> None:
    args.steps = min(args.steps, 4)
    args.batch = min(args.batch, 2)
    args.max_stage = 1  # stage 0 (state only) and stage 1 (windows, written questions)
    args.eval_episodes = min(args.eval_episodes, 2)
    args.eval_periodic_episodes = min(args.eval_periodic_episodes, 4)
    args.eval_every = 2
    args.ckpt_every = 2
    args.general_per_step = min(args.general_per_step, 1)
    if args.layers == "all":
        args.layers = "last:4"


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    if spec == "all":
        return None
    if spec.startswith("last:"):
        n = int(spec.split(":", 1)[1])
        return list(range(max(0, num_layers - n), num_layers))
    return sorted(int(x) for x in spec.split(","))


# --- schedule and curriculum -----------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: float, floor: float,
          progress: float | None = None) -> float:
    """Linear warm-up then cosine decay to floor·peak (step is 0-based). `progress` (0..1), a
    run's progress on a time budget, counts where it is further along than the step."""
    frac = max((step + 1) / max(1, total), progress or 0.0)
    warmup = max(warmup, 1e-9)
    if frac < warmup:
        return peak * frac / warmup
    t = (frac - warmup) / max(1e-9, 1 - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def run_progress(step: int, total: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far a run is (0..1): by steps, or by wall-clock time when a budget is set and time
    runs out first. The schedule and the curriculum follow it, so a run on a time budget still
    warms up, decays and reaches every stage."""
    p = step / max(1, total)
    if budget_s is not None:
        p = max(p, elapsed_s / max(budget_s, 1e-9))
    return min(1.0, p)


def parse_curriculum(spec: str) -> list[tuple[float, int]]:
    out = []
    for part in spec.split(","):
        frac, stage = part.split(":")
        out.append((float(frac), int(stage)))
    return sorted(out)


def scheduled_stage(curriculum: list[tuple[float, int]], progress: float) -> int:
    stage = curriculum[0][1]
    for f, s in curriculum:
        if progress >= f:
            stage = s
    return stage


# --- tokenisation and batches ----------------------------------------------------------------


class Encoder:
    """Chat-template token ids for write passes and read passes."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def ids(self, messages, generation_prompt=False) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)
        return self.tok(text, add_special_tokens=False).input_ids

    def history(self, ep) -> list[int]:
        return self.ids(ep.history)

    def read(self, ep, context: int = 0) -> tuple[list[int], int, int]:
        """(ids, question_start, answer_start): the read pass [system, the last `context`
        history messages, question, answer]; the answer's tokens end with <|im_end|>."""
        from .data import read_messages

        msgs = read_messages(ep, context=context)
        before_q = self.ids(msgs[:-2])
        prompt = self.ids(msgs[:-1], generation_prompt=True)
        answer = self.tok(msgs[-1]["content"], add_special_tokens=False).input_ids + [self.end_id]
        return prompt + answer, len(before_q), len(prompt)


def pad_rows(rows: list[list[int]], pad_id: int, answer_starts: list[int] | None = None,
             device=None):
    """(ids, real, labels): right-padded ids, a mask of the real tokens, and next-token labels
    for the tokens from each row's answer start on (-100 elsewhere; all -100 without starts).

    Pads, being after every real token, are never attended by one under the causal mask, so
    no attention mask is needed."""
    import torch

    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    real = torch.zeros((B, T), dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        real[b, :len(r)] = True
        if answer_starts is not None:
            a = answer_starts[b]
            # logits at position t predict token t+1: label the answer tokens at t = index - 1.
            labels[b, a - 1:len(r) - 1] = torch.tensor(r[a:])
    return ids.to(device), real.to(device), labels.to(device)


def make_batch(enc: Encoder, episodes, write_read: list[bool] | None = None,
               contexts: list[int] | None = None, device=None):
    """Right-padded tensors for a list of episodes.

    Pads never write (write_mask False), so the final state of a row is its state after its
    last real token.
    """
    hist = [enc.history(ep) for ep in episodes]
    reads = [enc.read(ep, c) for ep, c in zip(episodes, contexts or [0] * len(episodes),
                                               strict=True)]
    h_ids, h_mask, _ = pad_rows(hist, enc.pad_id, device=device)
    r_ids, r_real, labels = pad_rows([r for r, _, _ in reads], enc.pad_id,
                                     [a for _, _, a in reads], device)
    r_mask = r_real.clone()
    for b, (_, q_start, _) in enumerate(reads):
        # Like a served question turn: the system prompt and the window are re-sent context
        # (not written), the question and the generated answer are written.
        written = write_read is not None and write_read[b]
        r_mask[b, :q_start if written else r_mask.shape[1]] = False
    return {"h_ids": h_ids, "h_mask": h_mask, "r_ids": r_ids, "r_mask": r_mask,
            "labels": labels, "n_hist_tokens": sum(len(h) for h in hist)}


# --- the episode loss ------------------------------------------------------------------------


class BetaProbe:
    """Collects β of the write pass from each layer's w_beta output (a forward hook, so the
    runtime's API is untouched)."""

    def __init__(self, module):
        self.active = False
        self.outputs: list = []
        self.handles = [layer.w_beta.register_forward_hook(self._hook)
                        for layer in module.layers.values()]

    def _hook(self, _mod, _inp, out):
        if self.active:
            self.outputs.append(out)

    @contextmanager
    def collect(self):
        self.outputs = []
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def remove(self):
        for h in self.handles:
            h.remove()


@contextmanager
def _no_lm_head(rt):
    """The write pass needs the state, not logits: skip the vocabulary projection."""
    import torch

    head = rt.model.lm_head
    rt.model.lm_head = torch.nn.Identity()
    try:
        yield
    finally:
        rt.model.lm_head = head


def episode_loss(rt, batch, probe: BetaProbe | None = None, memory: bool = True):
    """Loss and metrics of a batch. With grad enabled it is differentiable through the state."""
    import torch
    import torch.nn.functional as F

    B = batch["h_ids"].shape[0]
    beta_reg = torch.zeros((), device=rt.device)
    mean_beta = float("nan")
    if memory:
        with _no_lm_head(rt):
            if probe is not None:
                with probe.collect():
                    _, state, _ = rt.forward(batch["h_ids"], None, batch["h_mask"])
                w = batch["h_mask"].unsqueeze(-1).float()
                per_layer = torch.stack([
                    (torch.sigmoid(o) * w).sum((0, 1)).sum() / (w.sum() * o.shape[-1])
                    for o in probe.outputs])
                beta_reg = BETA_WEIGHT * ((per_layer - BETA_TARGET) ** 2).mean()
                mean_beta = float(per_layer.detach().mean())
            else:
                _, state, _ = rt.forward(batch["h_ids"], None, batch["h_mask"])
    else:
        state = None
    logits, _, _ = rt.forward(batch["r_ids"], state, batch["r_mask"], memory=memory)
    labels = batch["labels"]
    sel = labels != -100
    ce = F.cross_entropy(logits[sel].float(), labels[sel])
    with torch.no_grad():
        pred = logits.argmax(-1)
        correct = (pred == labels) | ~sel
        exact = correct.all(dim=1).float()
        tok_acc = ((pred == labels) & sel).sum().float() / sel.sum()
    return ce + beta_reg, {"ce": float(ce.detach()), "beta_reg": float(beta_reg.detach()),
                           "mean_beta": mean_beta, "tok_acc": float(tok_acc),
                           "exact": float(exact.mean()), "exact_rows": exact.tolist(), "B": B}


# --- general-ability episodes ----------------------------------------------------------------


def general_targets(rt, tok, questions: list[str], cache: Path, max_new: int = 24,
                    batch: int = 32) -> list[tuple[list[int], int]]:
    """(ids, answer_start) per question: the prompt of a sessionless served request (the
    template's own system prompt, the question, the generation prompt) followed by the
    backbone's greedy answer with memory off. Computed once, cached in `cache`.

    Batched (left-padded) greedy decoding: one prompt at a time cost ~1 s on 2 CPU cores, so
    a thousand prompts took 20 minutes. In bf16 a padded batch can pick a different token at
    a near-tie; any answer of the backbone's is a valid target, so that does not matter."""
    import torch

    done = json.loads(cache.read_text()) if cache.is_file() else {}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = {}
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        prompts[q] = tok(text, add_special_tokens=False).input_ids
    todo = [q for q in questions if q not in done]
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        padded = tok.pad({"input_ids": [prompts[q] for q in chunk]}, padding_side="left",
                         return_tensors="pt").to(rt.device)
        width = padded["input_ids"].shape[1]
        with torch.no_grad():  # outside rt.forward the δ-mem wrappers pass through
            gen = rt.model.generate(**padded, do_sample=False, max_new_tokens=max_new,
                                    eos_token_id=end, pad_token_id=tok.pad_token_id,
                                    temperature=None, top_p=None, top_k=None)
        for q, row in zip(chunk, gen[:, width:].tolist(), strict=True):
            done[q] = row[:row.index(end) + 1] if end in row else row
    cache.write_text(json.dumps(done))
    return [(prompts[q] + done[q], len(prompts[q])) for q in questions]


def general_loss(rt, rows: list[tuple[list[int], int]], pad_id: int, kind: str = "ce"):
    """How far δ-mem moves the backbone's own answers, every token written from a fresh state
    (a sessionless request). 'ce': cross-entropy of the greedy answer; 'kl': KL(backbone ||
    δ-mem) of the next-token distributions at the same positions (a forward with memory off
    gives the backbone's), which also holds the runner-up tokens in place."""
    import torch
    import torch.nn.functional as F

    ids, real, labels = pad_rows([r for r, _ in rows], pad_id, [a for _, a in rows], rt.device)
    logits, _, _ = rt.forward(ids, None, real)
    sel = labels != -100
    if kind == "ce":
        return F.cross_entropy(logits[sel].float(), labels[sel])
    with torch.no_grad():
        ref, _, _ = rt.forward(ids, None, real, memory=False)
    return F.kl_div(F.log_softmax(logits[sel].float(), -1), F.log_softmax(ref[sel].float(), -1),
                    log_target=True, reduction="batchmean")


# --- evaluation ------------------------------------------------------------------------------


def heldout_episodes(n_per_stage: int, seed: int, stages: dict, split: str = "heldout"):
    """n episodes of each stage ({index: Difficulty}), from a seed stream of their own."""
    from .data import make_episode

    return {s: [make_episode(split, 10_000 + seed, s * 100_000 + i, diff)
                for i in range(n_per_stage)] for s, diff in stages.items()}


def evaluate(rt, enc: Encoder, sets: dict, batch: int = 8, memory: bool = True,
             write_read: bool = False) -> dict:
    """State-only exact match (greedy = teacher-forced argmax of every answer token and the
    closing <|im_end|>) per stage, no history in the read pass."""
    import torch

    out = {}
    with torch.no_grad():
        for stage, eps in sets.items():
            rows = []
            for i in range(0, len(eps), batch):
                chunk = eps[i:i + batch]
                b = make_batch(enc, chunk, [write_read] * len(chunk), device=rt.device)
                _, m = episode_loss(rt, b, None, memory=memory)
                rows += m["exact_rows"]
            out[str(stage)] = sum(rows) / max(1, len(rows))
    out["all"] = sum(out.values()) / max(1, len(out))
    return out


def state_gain(rt, enc: Encoder, eps, batch: int = 8) -> dict:
    """Does the state carry the episode's fact? Answer cross-entropy and first-answer-token
    accuracy with the episode's own state against the state of another episode of the same
    batch (rolled by one): same kind of input, wrong fact. A memory that carries the value
    makes the first lower and the second higher; a generic bias moves both alike. Also the
    state-only exact match of `evaluate` (from the own state), so that one write pass serves
    both."""
    import torch
    import torch.nn.functional as F

    sums = {"ce_own": 0.0, "ce_other": 0.0, "first_own": 0.0, "first_other": 0.0,
            "exact": 0.0}
    n = n_other = 0
    with torch.no_grad():
        for i in range(0, len(eps), batch):
            chunk = eps[i:i + batch]
            b = make_batch(enc, chunk, device=rt.device)
            with _no_lm_head(rt):
                _, st, _ = rt.forward(b["h_ids"], None, b["h_mask"])
            labels = b["labels"]
            sel = labels != -100
            first = sel & (sel.cumsum(1) == 1)
            # A lone episode has no other state to compare with: it counts for "own" only.
            pairs = [("own", st)] + ([("other", st.roll(1, dims=0))] if len(chunk) > 1 else [])
            for key, state in pairs:
                logits, _, _ = rt.forward(b["r_ids"], state, b["r_mask"])
                ce = F.cross_entropy(logits[sel].float(), labels[sel], reduction="none")
                per_row = torch.zeros(len(chunk), device=ce.device).index_add_(
                    0, sel.nonzero()[:, 0], ce)
                sums[f"ce_{key}"] += float((per_row / sel.sum(1)).sum())
                pred = logits.argmax(-1)
                sums[f"first_{key}"] += float((pred == labels)[first].sum())
                if key == "own":
                    sums["exact"] += float(((pred == labels) | ~sel).all(dim=1).sum())
            n += len(chunk)
            n_other += len(chunk) if len(chunk) > 1 else 0
    return {k: v / max(1, n_other if k.endswith("_other") else n) for k, v in sums.items()
            } | {"n": n}


def exact_by_stage(gains: dict) -> dict:
    """{stage: exact, "all": mean} from state_gain's results per stage."""
    ev = {st: g["exact"] for st, g in gains.items()}
    return ev | {"all": sum(ev.values()) / max(1, len(ev))}


# --- checkpoints, plots, card ----------------------------------------------------------------


def save_checkpoint(path: Path, rt, opt, step: int, extra: dict) -> None:
    import torch

    from .adapter import save_adapter

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(rt.adapter, tmp, {"trained": True, "step": step, **extra.get("meta", {})})
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def plot_curves(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, acc, ev_steps, ev = [], [], [], [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            steps.append(r["step"])
            loss.append(r["ce"])
            acc.append(r["exact"])
        elif r.get("kind") == "eval":
            ev_steps.append(r["step"])
            ev.append(r["heldout"]["all"])

    def smooth(xs, k=20):
        out, acc_ = [], 0.0
        for i, x in enumerate(xs):
            acc_ = x if i == 0 else acc_ + (x - acc_) / min(i + 1, k)
            out.append(acc_)
        return out

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, loss, alpha=0.3, label="answer CE")
    ax[0].plot(steps, smooth(loss), label="answer CE (smoothed)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].plot(steps, smooth(acc), label="train exact match (smoothed)")
    if ev_steps:
        ax[1].plot(ev_steps, ev, "o-", label="held-out exact match, state only")
    ax[1].set_xlabel("step")
    ax[1].set_ylim(-0.02, 1.02)
    ax[1].legend()
    fig.suptitle("δ-mem training, SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _machine(device: str = "cpu") -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"
    if torch.device(device).type == "cuda":
        where = f"{torch.cuda.get_device_name(torch.device(device))} (torch " \
                f"{torch.__version__}) on {where}"
    return where


def _describe(cfg, model_name: str) -> str:
    kind = {"token": "TSW", "message_mean": "SSW"}.get(cfg.write_granularity,
                                                        cfg.write_granularity)
    if cfg.num_state_heads > 1:
        kind = f"MSW ({cfg.num_state_heads} state heads, {kind} writes)"
    n = len(cfg.layers)
    where = f"all {n} layers" if n == cfg.num_layers else f"{n} of {cfg.num_layers} layers"
    heads = "/".join(h.upper() for h in cfg.delta_heads)
    return f"{model_name}, {kind} (rank {cfg.rank}, {heads}, {where})"


def write_card(path: Path, info: dict, stages: list) -> None:
    """The training card; `stages` is the run's curriculum (its Difficulty per stage)."""
    from .data import CATEGORY_NAMES, SYSTEM_PROMPT

    def row(name, d):
        cells = " | ".join(f"{100 * d.get(str(s), float('nan')):.1f}" for s in info["stages"])
        return f"| {name} | {cells} | {100 * d.get('all', float('nan')):.1f} |"

    head = " | ".join(f"stage {s}" for s in info["stages"])
    lines = [
        f"# δ-mem adapter: {info['adapter_desc']}",
        "",
        f"Trained with `deltamem train` ({info['command']}).",
        "",
        "## Recipe",
        "- Frozen backbone; only the δ-mem parameters train "
        f"({info['n_params']:,} parameters).",
        "- Episode: write pass over the history (chat template, writes on, gradients through "
        "the state) → read pass over only [system, question, answer] from the write pass's final "
        "state, writes off" + (f" (the question and answer written in {100 * info['read_write_prob']:.0f}% of episodes, "
                               "as a served question turn is)" if info["read_write_prob"] else "")
        + "; loss = cross-entropy on the answer tokens and the closing `<|im_end|>`, "
        f"+ {BETA_WEIGHT}·mean((mean β − {BETA_TARGET})²).",
        (f"- Read passes that re-send every history message after the asked fact and none "
         f"before it (the answer is in the state only): {100 * info['outside_window']:.0f}%; "
         "of the rest, read passes" if info.get("outside_window") else "- Read passes")
        + " that re-send a window of the history first (read, not written): "
        f"{100 * info.get('context_prob', 0):.0f}%; open-class values replaced by random "
        f"vocabulary words: {100 * info.get('p_copy', 0):.0f}%, of those multi-token "
        f"pseudo-words: {100 * info.get('p_multi', 0):.0f}%; general-ability "
        "episodes (a sessionless question, target = the backbone's own greedy answer"
        + (", loss = KL(backbone ‖ δ-mem) over the vocabulary"
           if info.get("general_loss") == "kl" else "") + "): "
        f"{info.get('general_per_step', 0)} per step. State-only stages (the probe setting) "
        "re-send no window, write no question and add no general-ability episodes. "
        "Initial b_β (of a fresh adapter, or of the heads a widening adds): "
        + ("DESIGN's" if info.get("beta_bias_init") is None
           else str(info["beta_bias_init"])) + "."
        + ("" if info.get("probe_values") is None else
           f" Stage 0 values per kind: {info['probe_values'] or 'all, with copy words'}."),
        f"- AdamW (weight decay 0), peak lr {info['lr']}, cosine with {info['warmup']:.0%} "
        f"warm-up, gradient clip {info['clip']}, {info['batch']} episodes per step, "
        f"{info['steps_done']} steps (of {info['steps']} planned"
        + (f", or {info['max_minutes']} minutes" if info.get("max_minutes") else "")
        + f"), seed {info['seed']}.",
        f"- System prompt (use the same when serving): `{SYSTEM_PROMPT}`",
        "",
        "## Data (`deltamem/data.py`)",
        "Generated chats between two people: facts about the speakers (pet, city, job, "
        "favourite food, hobby, instrument, planned trip, birthday, sister, event) drawn at "
        "random from value pools, later updates that override a fact, same-kind facts of the "
        "other speaker, chatter and reactions; one user message per turn (`Name: text`). "
        "The question asks a fact's current value. Train and held-out splits use different "
        "seeds and disjoint pools of names, values, templates and chatter.",
        "",
        "Curriculum stages:",
        "",
        "| stage | facts | chatter turns | p(update) | p(distractor) | sessions |",
        "|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(stages):
        lines.append(f"| {i} | {d.n_facts[0]}–{d.n_facts[1]} | {d.n_chatter[0]}–"
                     f"{d.n_chatter[1]} | {d.p_update} | {d.p_distractor} | {d.n_sessions} |")
    lines += [
        "",
        f"Stage schedule: `{info['curriculum']}` (advance early at recent train exact match ≥ "
        f"{info['advance_at']}); {info['p_earlier']:.0%} of episodes replay earlier stages. "
        f"Stages reached: {info.get('stage_log', '')}.",
        "",
        "## Result: state-only exact match",
        "",
        "Fresh episodes (never trained on). The read pass sees only the system prompt and the "
        "question; the history reaches it only through the state. Exact match = greedy answer "
        "equals the value token for token (and stops).",
        "",
        f"| adapter ({info['eval_n']} episodes per stage) | {head} | all |",
        "|---|" + "---|" * (len(info["stages"]) + 1),
    ]
    start = ("untrained adapter, held-out" if not info.get("started_from")
             else f"starting adapter ({info['started_from']}), held-out")
    for name, key in (("no memory (backbone alone), held-out", "nomem"),
                      (start, "before"),
                      ("**trained adapter, held-out split**", "after"),
                      ("trained adapter, held-out, question written", "after_write"),
                      ("trained adapter, train split (new episodes)", "after_train_split")):
        if key in info:
            lines.append(row(name, info[key]))
    if info.get("gain"):
        lines += [
            "",
            "Does the state carry the fact? Held-out answer cross-entropy (nats per token) and "
            "first-answer-token accuracy, read from the episode's own state and from another "
            "episode's state (same batch, rolled): a memory that holds the value lowers the "
            "first and raises its accuracy; a generic bias moves both alike.",
            "",
            "| stage | CE own state | CE other state | first token, own | first token, other |",
            "|---|---|---|---|---|",
        ]
        for st, g in info["gain"].items():
            lines.append(f"| {st} | {g['ce_own']:.3f} | {g['ce_other']:.3f} | "
                         f"{100 * g['first_own']:.1f}% | {100 * g['first_other']:.1f}% |")
    score = info.get("best_score", float("nan"))
    if math.isnan(score):  # no periodic evaluation ran
        shipped = (f"Shipped checkpoint: step {info.get('best_step')}, the last one (no "
                   "periodic evaluations ran).")
    else:
        shipped = (f"Shipped checkpoint: step {info.get('best_step')} (the best periodic "
                   "held-out exact match, ties broken by the state margin, the answer "
                   "cross-entropy from another episode's state minus that from the episode's "
                   f"own). Its periodic score: exact {score:.3f}, margin "
                   f"{info.get('best_margin', float('nan')):.3f} nats.")
    lines += [
        "",
        shipped,
        "",
        "## Run",
        f"- Machine: {info['machine']}; torch threads {info['threads']}; backbone "
        f"{info.get('dtype', 'float32')}.",
        f"- Wall time: {info['wall_s'] / 60:.1f} min, {info['s_per_step']:.2f} s per step on "
        "average.",
        "- Loss curve: `loss.png`.",
        "",
        "Categories of the LoCoMo-format held-out file (`write_locomo_json`): "
        + "; ".join(f"{k} = {v}" for k, v in CATEGORY_NAMES.items()) + ".",
    ]
    path.write_text("\n".join(lines) + "\n")


# --- the run ---------------------------------------------------------------------------------


def run(args) -> int:
    """`deltamem train`. The compiled CPU scan kernel is off while it runs: once it has run in
    a process, torch's own forward and backward there are 3-4x slower (see scan.py)."""
    from . import scan

    kernel = scan.USE_CPU_KERNEL
    scan.USE_CPU_KERNEL = False
    try:
        return _run(args)
    finally:
        scan.USE_CPU_KERNEL = kernel


def _run(args) -> int:
    import torch

    if args.tiny:
        _tiny(args)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer

    from . import data as D
    from .adapter import AdapterError, load_adapter, widen_state_heads
    from .hf_runtime import DeltaMemHF
    from .model_fetch import resolve_model

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = Encoder(tok)
    last = out / "last"
    if args.finalize:
        args.resume = True
    resume = args.resume and (last / "trainer_state.json").is_file()
    if resume:
        init = load_adapter(last)
    elif args.init_adapter is not None:
        try:
            init = load_adapter(args.init_adapter)
            widen = (args.state_heads is not None
                     and args.state_heads != init.config.num_state_heads)
            if args.beta_bias_init is not None and not widen:
                raise AdapterError("--beta-bias-init sets the gates of a fresh adapter or of "
                                   "the heads --state-heads adds; this run adds none")
            if widen:
                init = widen_state_heads(init, args.state_heads, seed=args.seed,
                                         beta_bias=args.beta_bias_init)
        except AdapterError as e:
            print(f"deltamem train: --init-adapter {args.init_adapter}: {e}", file=sys.stderr)
            return 2
    else:
        init = None
    if init is None:
        n_layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
        rt = DeltaMemHF.from_pretrained(model_dir, seed=args.seed, device=args.device,
                                        dtype=getattr(torch, args.dtype),
                                        target_layers=parse_layers(args.layers, n_layers),
                                        num_state_heads=1 if args.state_heads is None
                                        else args.state_heads)
        if args.beta_bias_init is not None:
            with torch.no_grad():
                for layer in rt.adapter.module.layers.values():
                    layer.w_beta.bias.fill_(args.beta_bias_init)
    else:
        rt = DeltaMemHF.from_pretrained(model_dir, adapter=init, device=args.device,
                                        dtype=getattr(torch, args.dtype))
    if init is not None:
        from .adapter import backbone_fingerprint

        init.check_backbone(backbone_fingerprint(model_dir))
    params = [p for p in rt.adapter.module.parameters()]
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    probe = BetaProbe(rt.adapter.module)

    import dataclasses

    # The run's own copy of the curriculum, with the command line's overrides.
    stages = list(D.STAGES)
    if args.max_stage is not None:
        stages = stages[:max(0, args.max_stage) + 1]
    every = {"n_facts": args.facts} if args.facts else {}
    served = dict(every)  # the probe (state-only) stage keeps its own history size
    if args.chatter:
        served["n_chatter"] = args.chatter
    if args.sessions:
        served["n_sessions"] = args.sessions
    stages = [dataclasses.replace(d, **(every if d.state_only else served)) for d in stages]
    if args.probe_values is not None:
        stages[0] = dataclasses.replace(stages[0], value_subset=args.probe_values)
    stages_all = dict(enumerate(stages))
    max_stage = len(stages) - 1
    curriculum = parse_curriculum(args.curriculum)
    periodic_sets = heldout_episodes(args.eval_periodic_episodes // len(stages_all) or 1,
                                     args.eval_seed + 1, stages_all)

    state = {"step": 0, "stage": 0, "recent": [], "best_score": -1.0, "best_step": None,
             "wall_s": 0.0, "stage_log": [], "before": None, "nomem": None}
    metrics_path = out / "metrics.jsonl"
    if resume:
        st = json.loads((last / "trainer_state.json").read_text())
        state.update(st["trainer"])
        ck = torch.load(last / "optimizer.pt", weights_only=True)
        opt.load_state_dict(ck["optimizer"])
        # Steps a killed run took after its last checkpoint are taken again: drop their records.
        if metrics_path.is_file():
            kept = [x for x in metrics_path.read_text().splitlines()
                    if x.strip() and json.loads(x).get("step", 0) <= state["step"]]
            metrics_path.write_text("".join(x + "\n" for x in kept))
        print(f"[train] resumed from {last} at step {state['step']}", file=sys.stderr)
    else:
        metrics_path.write_text("")
    log = open(out / "log.txt", "a")  # noqa: SIM115

    def emit(rec: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def say(msg: str) -> None:
        log.write(time.strftime("%H:%M:%S ") + msg + "\n")
        log.flush()

    final_sets = heldout_episodes(args.eval_episodes, args.eval_seed, stages_all)
    copy_words = None
    if args.p_copy > 0:
        copy_words = D.copy_word_lists(list(tok.get_vocab()))
        say(f"copy words: {len(copy_words['cap'])} capitalised, {len(copy_words['low'])} "
            "lower case")
    general = []
    if args.general_per_step > 0:
        t0 = time.time()
        from .evaluate import GENERAL_SET

        held = {q for q, _ in GENERAL_SET}  # the evaluator's questions stay unseen
        prompts = [q for q in D.general_prompts(args.general_prompts) if q not in held]
        general = general_targets(rt, tok, prompts[:4] if args.tiny else prompts,
                                  out / "general_targets.json")
        say(f"general-ability targets: {len(general)} ({time.time() - t0:.0f} s)")
    if state["before"] is None:
        t0 = time.time()
        rt.adapter.module.eval()
        nb = args.before_episodes or args.eval_episodes
        state["before"] = evaluate(rt, enc, {s: v[:nb] for s, v in final_sets.items()})
        state["started_from"] = str(args.init_adapter) if init is not None else None
        state["nomem"] = evaluate(rt, enc, {s: v[: max(1, len(v) // 4)]
                                            for s, v in final_sets.items()}, memory=False)
        say(f"before training: held-out exact {state['before']}, no memory {state['nomem']} "
            f"({time.time() - t0:.0f} s)")

    cmd = "deltamem train " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["train"]
                                       else sys.argv[1:])
    meta = {"recipe": "deltamem-train", "system_prompt": D.SYSTEM_PROMPT}
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=state["step"], disable=args.no_progress,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    import random

    t_start = time.time() - state["wall_s"]
    budget_s = None if args.max_minutes is None else 60.0 * args.max_minutes

    def progress() -> float:
        return run_progress(state["step"], args.steps, time.time() - t_start, budget_s)

    while progress() < 1.0 and not args.finalize:
        step = state["step"]
        frac = progress()
        sched = min(scheduled_stage(curriculum, frac), max_stage)
        recent = state["recent"][-25:]
        if (len(recent) >= 25 and sum(recent) / len(recent) >= args.advance_at
                and state["stage"] < max_stage):
            state["stage"] += 1
            state["recent"] = []
            say(f"step {step}: advancing early to stage {state['stage']}")
        if sched > state["stage"]:
            state["stage"] = sched
            state["recent"] = []
        stage = state["stage"]
        if not state["stage_log"] or state["stage_log"][-1][1] != stage:
            state["stage_log"].append([step, stage])
        rng = random.Random(f"train-step:{args.seed}:{step}")
        eps, write_read, contexts = [], [], []
        for i in range(args.batch):
            s = stage if stage == 0 or rng.random() >= args.p_earlier else rng.randrange(stage)
            ep = D.make_episode("train", args.seed, step * args.batch + i, stages[s], copy_words,
                                args.p_copy, args.p_multi)
            eps.append(ep)
            served = not stages[s].state_only  # else: the probe setting, the state only
            write_read.append(served and rng.random() < args.read_write_prob)
            # No draw for --outside-window when it is 0: runs without it keep the data
            # stream of earlier versions (the same seed gives the same episodes and windows).
            if served and args.outside_window > 0 and rng.random() < args.outside_window:
                contexts.append(D.messages_after_fact(ep))
            else:
                contexts.append(rng.randint(1, len(ep.dialogue))
                                if served and rng.random() < args.context_prob else 0)
        batch = make_batch(enc, eps, write_read, contexts, rt.device)
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_frac, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        rt.adapter.module.train()
        t0 = time.time()
        loss, m = episode_loss(rt, batch, probe)
        if general and not stages[stage].state_only:  # first learn to hold a fact at all
            g = general_loss(rt, rng.sample(general, min(args.general_per_step, len(general))),
                             enc.pad_id, args.general_loss)
            loss = loss + args.general_weight * g
            m["general"] = float(g.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        dt = time.time() - t0
        state["step"] = step + 1
        state["recent"].append(m["exact"])
        state["wall_s"] = time.time() - t_start
        rec = {"kind": "train", "step": step + 1, "stage": stage, "lr": lr, "ce": m["ce"],
               "beta_reg": m["beta_reg"], "mean_beta": m["mean_beta"], "tok_acc": m["tok_acc"],
               "exact": m["exact"], "gnorm": gnorm, "s": dt,
               f"general_{args.general_loss}": m.get("general"),
               "hist_tokens": batch["n_hist_tokens"]}
        emit(rec)
        say(json.dumps(rec))
        bar.set_postfix(loss=f"{m['ce']:.3f}", acc=f"{m['tok_acc']:.2f}",
                        em=f"{sum(state['recent'][-25:]) / len(state['recent'][-25:]):.2f}",
                        stage=stage, refresh=False)
        bar.update(1)
        done = progress() >= 1.0
        if args.eval_every and (state["step"] % args.eval_every == 0 or done):
            rt.adapter.module.eval()
            gains = {str(st): state_gain(rt, enc, eps) for st, eps in periodic_sets.items()}
            ev = exact_by_stage(gains)
            # Long before a held-out answer is exactly right, the state shows in its answer
            # cross-entropy: how much worse another episode's state does than the episode's own.
            margin = sum(g["ce_other"] - g["ce_own"] for g in gains.values()) / len(gains)
            emit({"kind": "eval", "step": state["step"], "heldout": ev, "state_margin": margin})
            say(f"step {state['step']}: periodic held-out exact {ev}, state margin "
                f"{margin:.3f} nats")
            # Ties (all zero, early on) go to the larger margin, then to the later checkpoint.
            if ev["all"] > state["best_score"] or (
                    ev["all"] == state["best_score"]
                    and margin >= state.get("best_margin", -math.inf)):
                state["best_score"], state["best_step"] = ev["all"], state["step"]
                state["best_margin"] = margin
                save_checkpoint(out / "best", rt, opt, state["step"],
                                {"trainer": state, "meta": meta})
        if state["step"] % args.ckpt_every == 0 or done:
            save_checkpoint(last, rt, opt, state["step"], {"trainer": state, "meta": meta})
            plot_curves(metrics_path, out / "loss.png")
    bar.close()
    probe.remove()

    # Final evaluation of the best checkpoint (the last one when no periodic eval ran).
    best_dir = out / "best" if (out / "best").is_dir() else last
    if best_dir == last:
        state["best_step"] = state["step"]
    if best_dir != last:
        from .adapter import load_adapter as _load

        best = _load(best_dir)
        rt.adapter.module.load_state_dict(best.module.state_dict())
    rt.adapter.module.eval()
    info = {
        "command": cmd, "adapter_desc": _describe(rt.adapter.config, Path(model_dir).name),
        "n_params": n_params, "lr": args.lr, "warmup": args.warmup,
        "clip": args.clip, "batch": args.batch, "steps": args.steps,
        "steps_done": state["step"], "seed": args.seed, "curriculum": args.curriculum,
        "advance_at": args.advance_at, "p_earlier": args.p_earlier,
        "read_write_prob": args.read_write_prob, "stages": list(stages_all),
        "context_prob": args.context_prob, "outside_window": args.outside_window,
        "p_copy": args.p_copy, "p_multi": args.p_multi,
        "probe_values": args.probe_values, "max_minutes": args.max_minutes,
        "general_per_step": args.general_per_step, "general_loss": args.general_loss,
        "beta_bias_init": args.beta_bias_init,
        "stage_log": ", ".join(f"stage {s} from step {t}" for t, s in state["stage_log"]),
        "eval_n": args.eval_episodes, "before": state["before"], "nomem": state["nomem"],
        "started_from": state.get("started_from"),
        "best_step": state["best_step"] or state["step"],
        "best_score": state["best_score"] if state["best_score"] >= 0 else float("nan"),
        "best_margin": state.get("best_margin", float("nan")),
        "machine": _machine(args.device), "device": args.device, "threads": args.threads,
        "dtype": args.dtype,
        "wall_s": state["wall_s"],
        "s_per_step": state["wall_s"] / max(1, state["step"]),
    }
    t0 = time.time()
    info["gain"] = {str(st): state_gain(rt, enc, eps) for st, eps in final_sets.items()}
    info["after"] = exact_by_stage(info["gain"])
    info["after_write"] = evaluate(rt, enc, final_sets, write_read=True)
    info["after_train_split"] = evaluate(
        rt, enc, heldout_episodes(args.eval_episodes, args.eval_seed, stages_all, "train"))
    say(f"final (best = step {info['best_step']}): held-out exact {info['after']}; question "
        f"written {info['after_write']}; train split {info['after_train_split']} "
        f"({time.time() - t0:.0f} s)")
    say(f"state gain: {info['gain']}")
    (out / "final_eval.json").write_text(json.dumps(info, indent=1))
    from .adapter import save_adapter

    save_adapter(rt.adapter, out / "adapter",
                 {**meta, "trained": True, "step": info["best_step"],
                  "heldout_exact_state_only": info["after"]["all"]})
    plot_curves(metrics_path, out / "loss.png")
    shutil.copy(out / "loss.png", out / "adapter" / "loss.png")
    write_card(out / "adapter" / "TRAINING_CARD.md", info, stages)
    log.close()
    print(json.dumps({"before": info["before"], "after": info["after"],
                      "adapter": str(out / "adapter")}))
    return 0
