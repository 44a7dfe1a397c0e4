"""`deltamem train`: train a δ-mem adapter on generated memory episodes (docs/design.md §1).

The loop and its checkpoints. What to run is a `TrainConfig` (deltamem/train_config.py: the
flags, and the recipe files in recipes/); what an episode is and how it is scored is
deltamem/episodes.py; the run's log, loss curve and card are deltamem/card.py. `train(cfg)`
sets the run up, takes steps, evaluates now and then, checkpoints, and ends with a final
evaluation and the adapter folder.

Only the δ-mem parameters train (the runtime freezes the backbone). Data are indexed by
(seed, step, slot), so a resumed run sees exactly the episodes an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import RunLog, plot_curves, run_info, write_card
from .episodes import (
    BetaProbe,
    Encoder,
    after_training,
    before_training,
    episode_loss,
    general_loss,
    general_rows,
    heldout_episodes,
    keep_rows,
    make_batch,
    make_stream_batch,
    periodic_scores,
    training_episodes,
    writes_messages,
)
from .train_config import (
    ConfigError,
    TrainConfig,
    configure_parser,
    lr_at,
    parse_curriculum,
    parse_layers,
    run_progress,
    scheduled_stage,
)

# Every scan of training runs the chunked path, the evaluations' no-grad forwards included.
# "auto" would send those to the compiled CPU kernel, and on this project's 2-core machine,
# once the numba kernel has run in a process, torch's own bf16 forward and backward there run
# 3-4x slower (one training batch: 10 + 15 s before, 31 + 71 s after; thread counts, affinity
# and denormal flushing unchanged; not diagnosed further). The vLLM engine, which calls the
# kernel directly, does not show it.
TRAIN_SCAN_BACKEND = "chunked"

# The CLI's entry points (configure_parser, run) and the loop.
__all__ = ["TRAIN_SCAN_BACKEND", "TrainConfig", "configure_parser", "run", "train"]


def run(args) -> int:
    """`deltamem train`: the config from the flags (and --recipe), then `train`."""
    try:
        cfg = TrainConfig.from_args(args)
    except ConfigError as e:
        print(f"deltamem train: {e}", file=sys.stderr)
        return 2
    return train(cfg)


# --- setup -----------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: what `setup` builds once, and `state`, the trainer state that the
    checkpoints carry (trainer_state.json)."""

    cfg: TrainConfig
    model_dir: Path
    enc: Encoder
    rt: Any  # DeltaMemHF
    opt: Any  # torch.optim.AdamW over `params`
    params: list
    probe: BetaProbe
    stages: list  # a Difficulty per stage
    log: RunLog
    state: dict = field(default_factory=lambda: {
        "step": 0, "stage": 0, "recent": [], "best_score": -1.0, "best_step": None,
        "wall_s": 0.0, "stage_log": [], "before": None, "nomem": None})
    general: list = field(default_factory=list)  # general-ability (ids, answer_start) rows
    copy_words: dict | None = None
    t_start: float = 0.0
    bar: Any = None
    command: str = field(default_factory=lambda: "deltamem train " + " ".join(
        sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]))
    meta: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.cfg.out_dir

    @property
    def stage_sets(self) -> dict:
        return dict(enumerate(self.stages))

    def progress(self) -> float:
        budget_s = None if self.cfg.max_minutes is None else 60.0 * self.cfg.max_minutes
        return run_progress(self.state["step"], self.cfg.steps, time.time() - self.t_start,
                            budget_s)

    def checkpoint_state(self) -> dict:
        return {"trainer": self.state, "meta": self.meta}


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step: the backbone with its adapter (fresh, --init-adapter
    or <out-dir>/last), the optimizer, the curriculum, and on resume the trainer state.
    Raises AdapterError when the adapter cannot start this run."""
    import torch
    from transformers import AutoTokenizer

    from . import data as D
    from .model_fetch import resolve_model

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(cfg.model)
    last = cfg.out_dir / "last"
    resume = cfg.continues_run and (last / "trainer_state.json").is_file()
    rt = build_runtime(cfg, model_dir, last if resume else None)
    params = list(rt.adapter.module.parameters())
    for p in params:
        p.requires_grad_(True)
    run = Run(cfg=cfg, model_dir=Path(model_dir), rt=rt, params=params,
              enc=Encoder(AutoTokenizer.from_pretrained(model_dir)),
              opt=torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0),
              probe=BetaProbe(rt.adapter.module), stages=cfg.stages(), log=RunLog(cfg.out_dir),
              meta={"recipe": "deltamem-train", "system_prompt": D.SYSTEM_PROMPT})
    if resume:
        run.state.update(json.loads((last / "trainer_state.json").read_text())["trainer"])
        ck = torch.load(last / "optimizer.pt", weights_only=True)
        run.opt.load_state_dict(ck["optimizer"])
        run.log.keep_until(run.state["step"])
        print(f"[train] resumed from {last} at step {run.state['step']}", file=sys.stderr)
    else:
        run.log.keep_until(None)
    return run


def build_runtime(cfg: TrainConfig, model_dir, resume_dir: Path | None):
    """The HF runtime on the chunked scan, with the adapter the run starts from."""
    import torch

    from .adapter import backbone_fingerprint
    from .hf_runtime import DeltaMemHF

    common = {"device": cfg.device, "dtype": getattr(torch, cfg.dtype),
              "scan_backend": TRAIN_SCAN_BACKEND}
    init = starting_adapter(cfg, resume_dir, model_dir)
    if init is not None:
        init.check_backbone(backbone_fingerprint(model_dir))
        return DeltaMemHF.from_pretrained(model_dir, adapter=init, **common)
    n_layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    rt = DeltaMemHF.from_pretrained(model_dir, seed=cfg.seed, **common,
                                    target_layers=parse_layers(cfg.layers, n_layers),
                                    num_state_heads=cfg.state_heads or 1,
                                    write_granularity=cfg.write_granularity or "token")
    if cfg.beta_bias_init is not None:
        with torch.no_grad():
            for layer in rt.adapter.module.layers.values():
                layer.w_beta.bias.fill_(cfg.beta_bias_init)
    return rt


def starting_adapter(cfg: TrainConfig, resume_dir: Path | None, model_dir=None):
    """The adapter to resume or to start from (widened by --state-heads), None for fresh.
    --init-adapter may be a reference release folder (imported, checked against the
    backbone's config when `model_dir` is given)."""
    from .adapter import AdapterError, load_adapter, widen_state_heads

    if resume_dir is not None:
        return load_adapter(resume_dir)
    if cfg.init_adapter is None:
        return None
    try:
        hf_config = None
        if model_dir is not None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_dir)
        init = load_adapter(cfg.init_adapter, hf_config)
        if cfg.write_granularity is not None \
                and cfg.write_granularity != init.config.write_granularity:
            raise AdapterError(f"--write-granularity {cfg.write_granularity}: the adapter "
                               f"writes per {init.config.write_granularity!r}")
        widen = cfg.state_heads is not None and cfg.state_heads != init.config.num_state_heads
        if cfg.beta_bias_init is not None and not widen:
            raise AdapterError("--beta-bias-init sets the gates of a fresh adapter or of the "
                               "heads --state-heads adds; this run adds none")
        if widen:
            init = widen_state_heads(init, cfg.state_heads, seed=cfg.seed,
                                     beta_bias=cfg.beta_bias_init)
    except AdapterError as e:
        raise AdapterError(f"--init-adapter {cfg.init_adapter}: {e}") from None
    return init


def prepare_episodes(run: Run) -> None:
    """Copy words (--p-copy) and the general-ability targets (the backbone's own answers)."""
    from .data import copy_word_lists

    cfg, say = run.cfg, run.log.say
    if cfg.p_copy > 0:
        run.copy_words = copy_word_lists(list(run.enc.tok.get_vocab()))
        say(f"copy words: {len(run.copy_words['cap'])} capitalised, "
            f"{len(run.copy_words['low'])} lower case")
    if cfg.general_per_step > 0:
        t0 = time.time()
        run.general = general_rows(run.rt, run.enc.tok, cfg.general_prompts,
                                   run.out / "general_targets.json", 4 if cfg.tiny else None)
        say(f"general-ability targets: {len(run.general)} ({time.time() - t0:.0f} s)")


def evaluate_before(run: Run) -> None:
    """The starting adapter's held-out exact match, and the backbone's alone (once a run)."""
    cfg, state = run.cfg, run.state
    if state["before"] is not None:
        return
    t0 = time.time()
    run.rt.adapter.module.eval()
    sets = heldout_episodes(cfg.eval_episodes, cfg.eval_seed, run.stage_sets)
    state.update(before_training(run.rt, run.enc, sets, cfg.before_episodes or cfg.eval_episodes))
    state["started_from"] = None if cfg.init_adapter is None else str(cfg.init_adapter)
    run.log.say(f"before training: held-out exact {state['before']}, no memory "
                f"{state['nomem']} ({time.time() - t0:.0f} s)")


# --- the loop --------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> int:
    """One training run from a config; 0 when it wrote its adapter, 2 when it could not start."""
    import torch

    from .adapter import AdapterError

    if cfg.tiny:
        cfg = cfg.with_tiny_limits()
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    try:
        run = setup(cfg)
    except AdapterError as e:
        print(f"deltamem train: {e}", file=sys.stderr)
        return 2
    try:
        prepare_episodes(run)
        evaluate_before(run)
        train_loop(run)
        finish(run)
    finally:
        run.log.close()
    return 0


def train_loop(run: Run) -> None:
    """Steps until the steps or the time budget run out: periodic held-out evaluations keep
    the best checkpoint (<out-dir>/best), and <out-dir>/last is where a run resumes."""
    from tqdm import tqdm

    cfg, state = run.cfg, run.state
    run.bar = tqdm(total=cfg.steps, initial=state["step"], disable=cfg.no_progress,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    run.t_start = time.time() - state["wall_s"]
    periodic_sets = heldout_episodes(cfg.eval_periodic_episodes // len(run.stages) or 1,
                                     cfg.eval_seed + 1, run.stage_sets)
    while run.progress() < 1.0 and not cfg.finalize:
        train_step(run)
        done = run.progress() >= 1.0
        if cfg.eval_every and (state["step"] % cfg.eval_every == 0 or done):
            periodic_eval(run, periodic_sets)
        if state["step"] % cfg.ckpt_every == 0 or done:
            save_checkpoint(run.out / "last", run.rt, run.opt, state["step"],
                            run.checkpoint_state())
            plot_curves(run.log.metrics_path, run.out / "loss.png")
    run.bar.close()
    run.probe.remove()


def train_step(run: Run) -> None:
    """One optimizer step on a batch of the current stage (plus general-ability episodes)."""
    import torch

    cfg, state = run.cfg, run.state
    step = state["step"]
    frac = run.progress()
    stage = current_stage(run, step, frac)
    rng = random.Random(f"train-step:{cfg.seed}:{step}")
    eps, write_read, contexts = training_episodes(cfg, run.stages, stage, step, rng,
                                                  run.copy_words)
    if cfg.read_pass == "stream":  # every token is written: write_read has no say
        batch = make_stream_batch(run.enc, eps, contexts, run.rt.device)
    else:
        batch = make_batch(run.enc, eps, write_read, contexts, run.rt.device,
                           message_ids=writes_messages(run.rt))
    if cfg.keep_weight > 0:
        batch["keep"] = keep_rows(eps, contexts)
    lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_frac, frac)
    for g in run.opt.param_groups:
        g["lr"] = lr
    run.rt.adapter.module.train()
    t0 = time.time()
    loss, m = episode_loss(run.rt, batch, run.probe, keep_weight=cfg.keep_weight)
    if run.general and not run.stages[stage].state_only:  # first learn to hold a fact at all
        rows = rng.sample(run.general, min(cfg.general_per_step, len(run.general)))
        g = general_loss(run.rt, rows, run.enc.pad_id, cfg.general_loss)
        loss = loss + cfg.general_weight * g
        m["general"] = float(g.detach())
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.clip))
    run.opt.step()
    record_step(run, {"kind": "train", "step": step + 1, "stage": stage, "lr": lr,
                      "ce": m["ce"], "keep_kl": m["keep_kl"], "beta_reg": m["beta_reg"],
                      "mean_beta": m["mean_beta"],
                      "tok_acc": m["tok_acc"], "exact": m["exact"], "gnorm": gnorm,
                      "s": time.time() - t0, f"general_{cfg.general_loss}": m.get("general"),
                      "hist_tokens": batch["n_hist_tokens"]})


def current_stage(run: Run, step: int, frac: float) -> int:
    """The curriculum's stage at this progress, or a later one the run advanced to early
    (recent train exact match >= --advance-at); noted in the stage log."""
    state, max_stage = run.state, len(run.stages) - 1
    sched = min(scheduled_stage(parse_curriculum(run.cfg.curriculum), frac), max_stage)
    recent = state["recent"][-25:]
    if (len(recent) >= 25 and sum(recent) / len(recent) >= run.cfg.advance_at
            and state["stage"] < max_stage):
        state["stage"] += 1
        state["recent"] = []
        run.log.say(f"step {step}: advancing early to stage {state['stage']}")
    if sched > state["stage"]:
        state["stage"] = sched
        state["recent"] = []
    if not state["stage_log"] or state["stage_log"][-1][1] != state["stage"]:
        state["stage_log"].append([step, state["stage"]])
    return state["stage"]


def record_step(run: Run, rec: dict) -> None:
    """A step's record: into the trainer state, metrics.jsonl, the log and the progress bar."""
    state = run.state
    state["step"] = rec["step"]
    state["recent"].append(rec["exact"])
    state["wall_s"] = time.time() - run.t_start
    run.log.emit(rec)
    run.log.say(json.dumps(rec))
    recent = state["recent"][-25:]
    run.bar.set_postfix(loss=f"{rec['ce']:.3f}", acc=f"{rec['tok_acc']:.2f}",
                        em=f"{sum(recent) / len(recent):.2f}", stage=rec["stage"],
                        refresh=False)
    run.bar.update(1)


def periodic_eval(run: Run, periodic_sets: dict) -> None:
    """Held-out exact match and state margin; a new best is checkpointed to <out-dir>/best."""
    state = run.state
    run.rt.adapter.module.eval()
    ev, margin = periodic_scores(run.rt, run.enc, periodic_sets)
    run.log.emit({"kind": "eval", "step": state["step"], "heldout": ev, "state_margin": margin})
    run.log.say(f"step {state['step']}: periodic held-out exact {ev}, state margin "
                f"{margin:.3f} nats")
    # Ties (all zero, early on) go to the larger margin, then to the later checkpoint.
    if ev["all"] > state["best_score"] or (
            ev["all"] == state["best_score"] and margin >= state.get("best_margin", -math.inf)):
        state["best_score"], state["best_step"] = ev["all"], state["step"]
        state["best_margin"] = margin
        save_checkpoint(run.out / "best", run.rt, run.opt, state["step"], run.checkpoint_state())


def save_checkpoint(path: Path, rt, opt, step: int, extra: dict) -> None:
    """Adapter, optimizer and trainer state, written to a temporary folder then renamed, so
    a run killed while saving leaves the previous checkpoint whole."""
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


# --- the end: final evaluation, adapter folder, card -----------------------------------------


def finish(run: Run) -> None:
    """Evaluate the best checkpoint (the last one when no periodic evaluation ran) and write
    <out-dir>/adapter with its card and loss curve, and final_eval.json."""
    from .adapter import load_adapter, save_adapter

    out, state = run.out, run.state
    if (out / "best").is_dir():
        run.rt.adapter.module.load_state_dict(load_adapter(out / "best").module.state_dict())
    else:
        state["best_step"] = state["step"]
    run.rt.adapter.module.eval()
    info = run_info(run)
    final_evaluation(run, info)
    (out / "final_eval.json").write_text(json.dumps(info, indent=1))
    save_adapter(run.rt.adapter, out / "adapter",
                 {**run.meta, "trained": True, "step": info["best_step"],
                  "heldout_exact_state_only": info["after"]["all"]})
    plot_curves(run.log.metrics_path, out / "loss.png")
    shutil.copy(out / "loss.png", out / "adapter" / "loss.png")
    write_card(out / "adapter" / "TRAINING_CARD.md", info, run.stages)
    print(json.dumps({"before": info["before"], "after": info["after"],
                      "adapter": str(out / "adapter")}))


def final_evaluation(run: Run, info: dict) -> None:
    """The final results (episodes.after_training) into `info`, and into the log."""
    cfg, t0 = run.cfg, time.time()
    info.update(after_training(
        run.rt, run.enc, heldout_episodes(cfg.eval_episodes, cfg.eval_seed, run.stage_sets),
        heldout_episodes(cfg.eval_episodes, cfg.eval_seed, run.stage_sets, "train")))
    run.log.say(f"final (best = step {info['best_step']}): held-out exact {info['after']}; "
                f"question written {info['after_write']}; train split "
                f"{info['after_train_split']} ({time.time() - t0:.0f} s)")
    run.log.say(f"state gain: {info['gain']}")
