"""What a training run leaves for people to read: its record (metrics.jsonl, log.txt), the
loss curve (loss.png) and the training card (TRAINING_CARD.md of the trained adapter).

`write_card` renders the run's `info` (what deltamem/train.py measured and recorded in
final_eval.json) as a sequence of sections: header, recipe, data, results tables, lineage
(which checkpoint ships, from where) and run (machine, time).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

from .episodes import BETA_TARGET, BETA_WEIGHT

# --- the run's record: metrics.jsonl and log.txt ---------------------------------------------


class RunLog:
    """A run's metrics.jsonl (a JSON record per step and per evaluation, what plot_curves
    reads) and log.txt (time-stamped lines for people)."""

    def __init__(self, out: Path):
        self.metrics_path = out / "metrics.jsonl"
        self._log = open(out / "log.txt", "a")  # noqa: SIM115 (open for the whole run)

    def emit(self, rec: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def say(self, msg: str) -> None:
        self._log.write(time.strftime("%H:%M:%S ") + msg + "\n")
        self._log.flush()

    def keep_until(self, step: int | None) -> None:
        """Drop the records after `step` (all of them for None): a killed run's steps after
        its last checkpoint are taken again on resume, and recorded once."""
        kept = []
        if step is not None and self.metrics_path.is_file():
            kept = [x for x in self.metrics_path.read_text().splitlines()
                    if x.strip() and json.loads(x).get("step", 0) <= step]
        self.metrics_path.write_text("".join(x + "\n" for x in kept))

    def close(self) -> None:
        self._log.close()


# --- the loss curve --------------------------------------------------------------------------


def _read_metrics(metrics_path: Path) -> dict[str, list]:
    """The train records' (step, answer CE, exact) and the periodic evaluations' (step,
    held-out exact) of a metrics.jsonl."""
    out = {"steps": [], "loss": [], "acc": [], "ev_steps": [], "ev": []}
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out["steps"].append(r["step"])
            out["loss"].append(r["ce"])
            out["acc"].append(r["exact"])
        elif r.get("kind") == "eval":
            out["ev_steps"].append(r["step"])
            out["ev"].append(r["heldout"]["all"])
    return out


def _smooth(xs: list[float], k: int = 20) -> list[float]:
    """A running mean over the first k values, then an exponential one of span k."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc = x if i == 0 else acc + (x - acc) / min(i + 1, k)
        out.append(acc)
    return out


def plot_curves(metrics_path: Path, png: Path) -> None:
    """loss.png: the answer CE (log scale) and the train / held-out exact match by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _read_metrics(metrics_path)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(m["steps"], m["loss"], alpha=0.3, label="answer CE")
    ax[0].plot(m["steps"], _smooth(m["loss"]), label="answer CE (smoothed)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].plot(m["steps"], _smooth(m["acc"]), label="train exact match (smoothed)")
    if m["ev_steps"]:
        ax[1].plot(m["ev_steps"], m["ev"], "o-", label="held-out exact match, state only")
    ax[1].set_xlabel("step")
    ax[1].set_ylim(-0.02, 1.02)
    ax[1].legend()
    fig.suptitle("δ-mem training, SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --- what the card says about the machine and the adapter ------------------------------------


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


# --- what the card records ---------------------------------------------------------------


def run_info(run) -> dict:
    """What the card and final_eval.json record of a run (a deltamem.train.Run), before
    the final evaluation adds its results."""
    cfg, state = run.cfg, run.state
    return {
        "command": run.command, "flags": " ".join(cfg.as_flags()),
        "adapter_desc": _describe(run.rt.adapter.config, run.model_dir.name),
        "n_params": sum(p.numel() for p in run.params), "lr": cfg.lr, "warmup": cfg.warmup,
        "clip": cfg.clip, "batch": cfg.batch, "steps": cfg.steps,
        "steps_done": state["step"], "seed": cfg.seed, "curriculum": cfg.curriculum,
        "advance_at": cfg.advance_at, "p_earlier": cfg.p_earlier,
        "read_write_prob": cfg.read_write_prob, "read_pass": cfg.read_pass,
        "dialogues": cfg.dialogues, "keep_weight": cfg.keep_weight,
        "stages": list(run.stage_sets),
        "context_prob": cfg.context_prob, "outside_window": cfg.outside_window,
        "p_copy": cfg.p_copy, "p_multi": cfg.p_multi,
        "probe_values": cfg.probe_values, "max_minutes": cfg.max_minutes,
        "general_per_step": cfg.general_per_step, "general_loss": cfg.general_loss,
        "beta_bias_init": cfg.beta_bias_init,
        "stage_log": ", ".join(f"stage {s} from step {t}" for t, s in state["stage_log"]),
        "eval_n": cfg.eval_episodes, "before": state["before"], "nomem": state["nomem"],
        "started_from": state.get("started_from"),
        "best_step": state["best_step"] or state["step"],
        "best_score": state["best_score"] if state["best_score"] >= 0 else float("nan"),
        "best_margin": state.get("best_margin", float("nan")),
        "machine": _machine(cfg.device), "device": cfg.device, "threads": cfg.threads,
        "dtype": cfg.dtype, "wall_s": state["wall_s"],
        "s_per_step": state["wall_s"] / max(1, state["step"]),
    }


# --- the card, section by section ------------------------------------------------------------


def write_card(path: Path, info: dict, stages: list) -> None:
    """The training card; `stages` is the run's curriculum (its Difficulty per stage)."""
    sections = (_header(info), _recipe(info), _data(info, stages), _results(info),
                _lineage(info), _run(info))
    path.write_text("\n".join(line for section in sections for line in section) + "\n")


def _header(info: dict) -> list[str]:
    lines = [f"# δ-mem adapter: {info['adapter_desc']}", "",
             f"Trained with `deltamem train` ({info['command']})."]
    if "--recipe" in info["command"] and info.get("flags"):  # the recipe file may change
        lines[-1] += f" As flags: `deltamem train {info['flags']}`."
    return [*lines, ""]


def _recipe(info: dict) -> list[str]:
    from .data import SYSTEM_PROMPT

    written = (f" (the question and answer written in {100 * info['read_write_prob']:.0f}% "
               "of episodes, as a served question turn is)" if info["read_write_prob"] else "")
    loss = (f"loss = cross-entropy on the answer tokens and the closing `<|im_end|>`, + "
            f"{BETA_WEIGHT}·mean((mean β − {BETA_TARGET})²).")
    if info.get("read_pass") == "stream":
        episode = ("- Episode, as a session is served: history, question and answer in one "
                   "stream (chat template, every token written under the state of its time, "
                   "gradients through the state, the history's K/V kept); the question and "
                   "the answer attend to the system prompt and the window only; " + loss)
    else:
        episode = ("- Episode: write pass over the history (chat template, writes on, gradients "
                   "through the state) → read pass over only [system, question, answer] from "
                   f"the write pass's final state, writes off{written}; " + loss)
    extra = []
    if info.get("dialogues"):
        extra.append(f"- Real-style conversations (`deltamem/dialogues.py`, train split): "
                     f"{info['dialogues']:.0%} of the served episodes.")
    if info.get("keep_weight"):
        extra.append("- Keep term: where the window shows the answer's evidence, "
                     f"{info['keep_weight']} · KL(backbone ‖ δ-mem) over the answer's tokens "
                     "replaces the cross-entropy to the reference answer.")
    return [
        "## Recipe",
        "- Frozen backbone; only the δ-mem parameters train "
        f"({info['n_params']:,} parameters).",
        episode,
        *extra,
        _episode_mix(info),
        f"- AdamW (weight decay 0), peak lr {info['lr']}, cosine with {info['warmup']:.0%} "
        f"warm-up, gradient clip {info['clip']}, {info['batch']} episodes per step, "
        f"{info['steps_done']} steps (of {info['steps']} planned"
        + (f", or {info['max_minutes']} minutes" if info.get("max_minutes") else "")
        + f"), seed {info['seed']}.",
        f"- System prompt (use the same when serving): `{SYSTEM_PROMPT}`",
        "",
    ]


def _episode_mix(info: dict) -> str:
    """The recipe's bullet on how read passes, values and general-ability episodes vary."""
    if info.get("outside_window"):
        text = ("- Read passes that re-send every history message after the asked fact and "
                "none before it (the answer is in the state only): "
                f"{100 * info['outside_window']:.0f}%; of the rest, read passes")
    else:
        text = "- Read passes"
    kl = (", loss = KL(backbone ‖ δ-mem) over the vocabulary"
          if info.get("general_loss") == "kl" else "")
    beta = ("the reference's −1.5" if info.get("beta_bias_init") is None
            else str(info["beta_bias_init"]))
    text += (
        " that re-send a window of the history first (read, not written): "
        f"{100 * info.get('context_prob', 0):.0f}%; open-class values replaced by random "
        f"vocabulary words: {100 * info.get('p_copy', 0):.0f}%, of those multi-token "
        f"pseudo-words: {100 * info.get('p_multi', 0):.0f}%; general-ability episodes (a "
        f"sessionless question, target = the backbone's own greedy answer{kl}): "
        f"{info.get('general_per_step', 0)} per step. State-only stages (the probe setting) "
        "re-send no window, write no question and add no general-ability episodes. "
        f"Initial b_β (of a fresh adapter, or of the heads a widening adds): {beta}.")
    if info.get("probe_values") is not None:
        text += f" Stage 0 values per kind: {info['probe_values'] or 'all, with copy words'}."
    return text


def _data(info: dict, stages: list) -> list[str]:
    lines = [
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
    return lines + [
        "",
        f"Stage schedule: `{info['curriculum']}` (advance early at recent train exact match ≥ "
        f"{info['advance_at']}); {info['p_earlier']:.0%} of episodes replay earlier stages. "
        f"Stages reached: {info.get('stage_log', '')}.",
        "",
    ]


def _results(info: dict) -> list[str]:
    """The state-only exact match table, then the state-gain table when it was measured."""
    def row(name, d):
        cells = " | ".join(f"{100 * d.get(str(s), float('nan')):.1f}" for s in info["stages"])
        return f"| {name} | {cells} | {100 * d.get('all', float('nan')):.1f} |"

    head = " | ".join(f"stage {s}" for s in info["stages"])
    lines = [
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
    return lines + _gain_table(info)


def _gain_table(info: dict) -> list[str]:
    if not info.get("gain"):
        return []
    lines = [
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
    return lines


def _lineage(info: dict) -> list[str]:
    """Which checkpoint ships and why (where the run started is in the results table)."""
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
    return ["", shipped, ""]


def _run(info: dict) -> list[str]:
    from .data import CATEGORY_NAMES

    return [
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
