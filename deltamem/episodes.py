"""Episodes as tensors, their losses and their evaluation: what `deltamem train` computes.

One episode (docs/design.md §1): a write pass over the history (chat template, writes on,
gradients flow through the state), then a read pass with writes off over only [system,
question, answer] starting from the write pass's final state; the loss is next-token
cross-entropy on the answer tokens (plus <|im_end|>), plus BETA_WEIGHT · mean over layers of
(mean β − BETA_TARGET)². The history is never in the read pass's attention, so the state is
the only way the answer can get there.

General-ability episodes hold the backbone's own answers to sessionless questions in place;
the evaluations measure state-only exact match and whether the state carries the episode's
fact (`state_gain`). Research scripts import these too, so the names stay put.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

# Messages a served window (W = 256 tokens) holds of a real-style conversation, about.
DIALOGUE_WINDOW = 14
BETA_TARGET = 0.05
BETA_WEIGHT = 0.01


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

    def history_message_ids(self, ep) -> list[int]:
        """The SSW message id of each token of `history(ep)`, as the reference's session
        runtime numbers them: every token of a message's rendering (its header and closing
        tokens too) carries the message's number, counting the non-system messages from 0;
        the system message's tokens carry -1 (not written)."""
        msgs = ep.history
        text = self.tok.apply_chat_template(msgs, tokenize=False)
        ends, owner, n = [], [], 0
        for i, msg in enumerate(msgs):
            part = self.tok.apply_chat_template(msgs[:i + 1], tokenize=False)
            if not text.startswith(part):
                raise ValueError("the chat template is not prefix-stable: message spans are "
                                 "unknown")
            ends.append(len(part))
            owner.append(-1 if msg["role"] == "system" else n)
            n += msg["role"] != "system"
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        out, j = [], 0
        for start, _ in enc["offset_mapping"]:
            while j < len(ends) - 1 and start >= ends[j]:
                j += 1
            out.append(owner[j])
        return out

    def read(self, ep, context: int = 0) -> tuple[list[int], int, int]:
        """(ids, question_start, answer_start): the read pass [system, the last `context`
        history messages, question, answer]; the answer's tokens end with <|im_end|>."""
        from .data import read_messages

        msgs = read_messages(ep, context=context)
        before_q = self.ids(msgs[:-2])
        prompt = self.ids(msgs[:-1], generation_prompt=True)
        return prompt + self.answer(ep), len(before_q), len(prompt)

    def answer(self, ep) -> list[int]:
        """The trained answer's tokens (deltamem.data.ANSWER_PREFIX and the answer) and the
        closing <|im_end|>."""
        from .data import ANSWER_PREFIX

        return self.tok(ANSWER_PREFIX + ep.answer, add_special_tokens=False).input_ids + [
            self.end_id]


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


def writes_messages(rt) -> bool:
    """Whether the runtime's adapter writes per message (SSW): its write passes then need
    message ids (make_batch's `message_ids`)."""
    return rt.adapter.config.writes_messages


def make_batch(enc: Encoder, episodes, write_read: list[bool] | None = None,
               contexts: list[int] | None = None, device=None, message_ids: bool = False):
    """Right-padded tensors for a list of episodes.

    Pads never write (write_mask False), so the final state of a row is its state after its
    last real token. With `message_ids` (SSW adapters) the batch also has "h_mids", each
    history token's message (Encoder.history_message_ids, -1 for the system message and
    pads), and "r_mids" for the read pass: its written tokens as a served SSW turn writes
    them (the question as one message, then each answer token as a message of its own). In
    SSW every token of a forward reads the state from before it, so the read pass's writes
    never reach its own logits.
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
    batch = {"h_ids": h_ids, "h_mask": h_mask, "r_ids": r_ids, "r_mask": r_mask,
             "labels": labels, "n_hist_tokens": sum(len(h) for h in hist)}
    if message_ids:
        import torch

        h_mids = torch.full(h_ids.shape, -1, dtype=torch.long)
        for b, ep in enumerate(episodes):
            mids = enc.history_message_ids(ep)
            if len(mids) != len(hist[b]):
                raise ValueError("message ids do not cover the history's tokens")
            h_mids[b, :len(mids)] = torch.tensor(mids)
        r_mids = torch.full(r_ids.shape, -1, dtype=torch.long)
        for b, (r, q_start, a_start) in enumerate(reads):
            r_mids[b, q_start:a_start] = 0
            r_mids[b, a_start:len(r)] = torch.arange(1, len(r) - a_start + 1)
        batch["h_mids"] = h_mids.to(device)
        batch["r_mids"] = r_mids.to(device)
    return batch


def make_stream_batch(enc: Encoder, episodes, contexts: list[int] | None = None, device=None):
    """Episodes as a served session runs them (`--read-pass stream`): history, question and
    answer in one stream, every token written under the state of its time, the history's K/V
    kept for the question as the server keeps a session's KV; the question and the answer
    attend to the system prompt and the window (the last `context` history messages) only.

    Returns ids, write mask (the real tokens), labels (the answer and <|im_end|>), and a
    (B, 1, T, T) boolean attention mask (True: attend). The history's own tokens attend
    causally to all the history before them, where a served ingest sees its window: the
    question's read of the state and of the window's K/V is what this makes exact."""
    import torch

    rows, starts = [], []
    for ep, c in zip(episodes, contexts or [0] * len(episodes), strict=True):
        hist = ep.history
        if not hist or hist[0]["role"] != "system":
            raise ValueError("a stream episode's history starts with its system message")
        prompt = enc.ids([*hist, {"role": "user", "content": ep.question}],
                         generation_prompt=True)
        ids = prompt + enc.answer(ep)
        history = enc.ids(hist)
        q_start = len(history)
        if prompt[:q_start] != history:
            raise ValueError("the chat template is not prefix-stable")
        sys_len = len(enc.ids(hist[:1]))
        win = len(enc.ids(hist[:len(hist) - min(c, len(hist) - 1)])) if c else q_start
        rows.append(ids)
        starts.append((sys_len, win, q_start, len(prompt)))
    ids, real, labels = pad_rows(rows, enc.pad_id, [a for *_, a in starts])
    B, T = ids.shape
    mask = torch.ones((T, T), dtype=torch.bool).tril().repeat(B, 1, 1, 1)
    for b, (sys_len, win, q_start, _) in enumerate(starts):
        mask[b, 0, q_start:len(rows[b]), sys_len:win] = False  # history outside the window
    return {"s_ids": ids.to(device), "s_mask": real.to(device), "s_attn": mask.to(device),
            "labels": labels.to(device), "n_hist_tokens": sum(q for *_, q, _ in starts)}


def training_episodes(cfg, stages: list, stage: int, step: int, rng, copy_words=None):
    """A training step's episodes and how each read pass is served: (episodes, write_read,
    contexts), make_batch's arguments. `cfg` is a TrainConfig, `stages` its curriculum,
    `rng` the step's own random.Random, so the stream depends on (seed, step) only."""
    from . import data as D

    eps, write_read, contexts = [], [], []
    for i in range(cfg.batch):
        s = stage if stage == 0 or rng.random() >= cfg.p_earlier else rng.randrange(stage)
        served = not stages[s].state_only  # else: the probe setting, the state only
        # No draw for --dialogues when it is 0, as for --outside-window below.
        if served and cfg.dialogues > 0 and rng.random() < cfg.dialogues:
            from . import dialogues as G

            ep = G.make_episode("train", cfg.seed, step * cfg.batch + i,
                                rng=random.Random(rng.random()))
        else:
            ep = D.make_episode("train", cfg.seed, step * cfg.batch + i, stages[s],
                                copy_words, cfg.p_copy, cfg.p_multi)
        eps.append(ep)
        write_read.append(served and rng.random() < cfg.read_write_prob)
        # A real-style conversation is far longer than a served window: its read pass
        # re-sends at most a window's worth of messages.
        longest = len(ep.dialogue) if ep.evidence is None else DIALOGUE_WINDOW
        # No draw for --outside-window when it is 0: runs without it keep the data
        # stream of earlier versions (the same seed gives the same episodes and windows).
        if served and cfg.outside_window > 0 and rng.random() < cfg.outside_window:
            contexts.append(min(D.messages_after_fact(ep) if ep.evidence is None
                                else len(ep.dialogue) - 1 - max(ep.evidence), longest))
        else:
            contexts.append(rng.randint(1, min(len(ep.dialogue), longest))
                            if served and rng.random() < cfg.context_prob else 0)
    return eps, write_read, contexts


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


def keep_rows(episodes, contexts: list[int]) -> list[bool]:
    """Which read passes show the answer's evidence in their window: the rows the keep term
    (episode_loss's `keep_weight`) holds to the backbone's own answer."""
    from .data import answer_in_window

    return [c > 0 and answer_in_window(ep, c) for ep, c in zip(episodes, contexts, strict=True)]


def episode_loss(rt, batch, probe: BetaProbe | None = None, memory: bool = True,
                 keep_weight: float = 0.0):
    """Loss and metrics of a batch. With grad enabled it is differentiable through the state.

    With `keep_weight` > 0 and a bool list `batch["keep"]` (keep_rows), the rows marked keep
    are not pulled to the reference answer: their loss is KL(backbone || δ-mem) of the
    next-token distributions on the answer's positions, the backbone being the same read
    pass with memory off. Where the window already shows the answer, the memory must not
    change what the backbone says, nor the form it says it in."""
    import torch

    if "s_ids" in batch:
        return _stream_loss(rt, batch, probe, memory, keep_weight)
    beta_reg = torch.zeros((), device=rt.device)
    mean_beta = float("nan")
    h_mids, r_mids = batch.get("h_mids"), batch.get("r_mids")
    if memory:
        with _no_lm_head(rt):
            if probe is not None:
                with probe.collect():
                    _, state, _ = rt.forward(batch["h_ids"], None, batch["h_mask"],
                                             message_ids=h_mids)
                w = batch["h_mask"].unsqueeze(-1).float()
                if h_mids is not None:  # SSW: β of the written messages, one per message
                    w = _written_messages(h_mids, batch["h_mask"]).unsqueeze(-1).float()
                beta_reg, mean_beta = _beta_reg(probe, w)
            else:
                _, state, _ = rt.forward(batch["h_ids"], None, batch["h_mask"],
                                         message_ids=h_mids)
    else:
        state = None
    logits, _, _ = rt.forward(batch["r_ids"], state, batch["r_mask"], message_ids=r_mids,
                              memory=memory)
    sel = batch["labels"] != -100
    return _answer_loss(logits[sel], batch, memory, keep_weight, beta_reg, mean_beta,
                        lambda: rt.forward(batch["r_ids"], None, batch["r_mask"],
                                           memory=False)[0][sel])


def _beta_reg(probe: BetaProbe, w):
    """BETA_WEIGHT · mean over layers of (mean β of the written tokens − BETA_TARGET)², and
    the mean β."""
    import torch

    per_layer = torch.stack([(torch.sigmoid(o) * w).sum((0, 1)).sum() / (w.sum() * o.shape[-1])
                             for o in probe.outputs])
    return BETA_WEIGHT * ((per_layer - BETA_TARGET) ** 2).mean(), float(per_layer.detach().mean())


def _stream_loss(rt, batch, probe, memory, keep_weight):
    """episode_loss of a make_stream_batch batch: one forward, writes on every real token."""
    import torch

    if writes_messages(rt):
        raise ValueError("the stream read pass writes per token; SSW adapters are not supported")
    ids, mask, attn = batch["s_ids"], batch["s_mask"], _attention(rt, batch["s_attn"])
    sel = batch["labels"] != -100
    beta_reg, mean_beta = torch.zeros((), device=rt.device), float("nan")

    def answer_logits(memory: bool):
        # the vocabulary projection of the answer's positions only: a stream is thousands
        # of tokens long, its answer a few
        with _no_lm_head(rt):
            hidden, _, _ = rt.forward(ids, None, mask, attention_mask=attn, memory=memory)
        return rt.model.lm_head(hidden[sel])

    if memory and probe is not None:
        with probe.collect():
            logits = answer_logits(True)
        beta_reg, mean_beta = _beta_reg(probe, mask.unsqueeze(-1).float())
    else:
        logits = answer_logits(memory)
    return _answer_loss(logits, batch, memory, keep_weight, beta_reg, mean_beta,
                        lambda: answer_logits(False))


def _attention(rt, allowed):
    """A boolean (True: attend) 4D mask in the form the backbone's attention takes."""
    import torch

    if rt.model.config._attn_implementation == "sdpa":
        return allowed
    dtype = next(rt.model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def _answer_loss(logits, batch, memory, keep_weight, beta_reg, mean_beta, backbone):
    """The answer's loss and the metrics, shared by both read passes. `logits` (N, V) are
    those of the answer's positions (batch["labels"] != -100, in row-major order);
    `backbone()` gives the same positions' logits with memory off, for the keep term."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    sel = labels != -100
    target = labels[sel]
    row_of = sel.nonzero()[:, 0]
    keep = batch.get("keep")
    kl = torch.zeros((), device=logits.device)
    if memory and keep_weight > 0 and keep is not None and any(keep):
        kept = torch.tensor(keep, device=logits.device)[row_of]
        with torch.no_grad():
            ref = backbone()
        kl = keep_weight * F.kl_div(F.log_softmax(logits[kept].float(), -1),
                                    F.log_softmax(ref[kept].float(), -1), log_target=True,
                                    reduction="sum") / len(target)
        # each row's tokens weigh as much as without the keep term
        ce = (F.cross_entropy(logits[~kept].float(), target[~kept], reduction="sum")
              / len(target)) if bool((~kept).any()) else kl * 0
    else:
        ce = F.cross_entropy(logits.float(), target)
    with torch.no_grad():
        right = logits.argmax(-1) == target
        wrong_rows = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
        wrong_rows.index_add_(0, row_of, (~right).long())
        exact = (wrong_rows == 0).float()
        tok_acc = right.float().mean()
    return ce + kl + beta_reg, {"ce": float(ce.detach()), "keep_kl": float(kl.detach()),
                                "beta_reg": float(beta_reg.detach()), "mean_beta": mean_beta,
                                "tok_acc": float(tok_acc), "exact": float(exact.mean()),
                                "exact_rows": exact.tolist(), "B": labels.shape[0]}


def _written_messages(mids, mask):
    """(B, n_msg) bool: which messages of an SSW write pass a row writes (their β count)."""
    import torch

    active = (mids >= 0) & mask
    n = int(mids[active].max()) + 1 if bool(active.any()) else 0
    return torch.stack([((mids == j) & active).any(1) for j in range(n)], 1) if n else \
        torch.zeros((mids.shape[0], 0), dtype=torch.bool, device=mids.device)


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


def general_rows(rt, tok, n_prompts: int, cache: Path, limit: int | None = None):
    """A run's general-ability rows: the fixed questions plus `n_prompts` templated ones
    (deltamem.data.general_prompts) less the evaluator's, which stay unseen; the first
    `limit` of them, with the backbone's own answers (general_targets, cached in `cache`)."""
    from .data import general_prompts
    from .evaluate import GENERAL_SET

    held = {q for q, _ in GENERAL_SET}
    prompts = [q for q in general_prompts(n_prompts) if q not in held]
    return general_targets(rt, tok, prompts[:limit], cache)


def general_loss(rt, rows: list[tuple[list[int], int]], pad_id: int, kind: str = "ce"):
    """How far δ-mem moves the backbone's own answers, every token written from a fresh state
    (a sessionless request). 'ce': cross-entropy of the greedy answer; 'kl': KL(backbone ||
    δ-mem) of the next-token distributions at the same positions (a forward with memory off
    gives the backbone's), which also holds the runner-up tokens in place."""
    import torch
    import torch.nn.functional as F

    ids, real, labels = pad_rows([r for r, _ in rows], pad_id, [a for _, a in rows], rt.device)
    # SSW: the request as one message (every token reads the fresh state either way).
    mids = real.long() - 1 if writes_messages(rt) else None
    logits, _, _ = rt.forward(ids, None, real, message_ids=mids)
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
                b = make_batch(enc, chunk, [write_read] * len(chunk), device=rt.device,
                               message_ids=writes_messages(rt))
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
            b = make_batch(enc, chunk, device=rt.device, message_ids=writes_messages(rt))
            with _no_lm_head(rt):
                _, st, _ = rt.forward(b["h_ids"], None, b["h_mask"], message_ids=b.get("h_mids"))
            labels = b["labels"]
            sel = labels != -100
            first = sel & (sel.cumsum(1) == 1)
            # A lone episode has no other state to compare with: it counts for "own" only.
            pairs = [("own", st)] + ([("other", st.roll(1, dims=0))] if len(chunk) > 1 else [])
            for key, state in pairs:
                logits, _, _ = rt.forward(b["r_ids"], state, b["r_mask"],
                                          message_ids=b.get("r_mids"))
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


def periodic_scores(rt, enc: Encoder, sets: dict) -> tuple[dict, float]:
    """(exact match by stage, state margin) of held-out sets. Long before a held-out answer is
    exactly right, the state shows in its answer cross-entropy: the margin is how much worse
    another episode's state does than the episode's own (nats, mean over stages)."""
    gains = {str(st): state_gain(rt, enc, eps) for st, eps in sets.items()}
    margin = sum(g["ce_other"] - g["ce_own"] for g in gains.values()) / len(gains)
    return exact_by_stage(gains), margin


def before_training(rt, enc: Encoder, sets: dict, n_episodes: int) -> dict:
    """The starting point: state-only exact match on the first `n_episodes` of each held-out
    set, and the backbone's alone (memory off) on a quarter of each."""
    return {"before": evaluate(rt, enc, {s: v[:n_episodes] for s, v in sets.items()}),
            "nomem": evaluate(rt, enc, {s: v[: max(1, len(v) // 4)] for s, v in sets.items()},
                              memory=False)}


def after_training(rt, enc: Encoder, sets: dict, train_sets: dict) -> dict:
    """The final results: state gain and state-only exact match on held-out sets, exact match
    with the question written, and exact match on fresh train-split episodes."""
    gain = {str(st): state_gain(rt, enc, eps) for st, eps in sets.items()}
    return {"gain": gain, "after": exact_by_stage(gain),
            "after_write": evaluate(rt, enc, sets, write_read=True),
            "after_train_split": evaluate(rt, enc, train_sets)}
