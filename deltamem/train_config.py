"""The configuration of `deltamem train`: one dataclass field per command-line flag, and
what it means as the run goes (learning-rate schedule, curriculum stages).

`TrainConfig` is the single place a training knob is declared: its default, its help text
(`field(metadata={"help": ...})`) and its checks. The argparse parser is generated from the
fields, so `deltamem train --help` lists every flag with its help and default. A recipe
(`recipes/*.toml`, `deltamem train --recipe FILE`) is a flat TOML table of field values keyed
by field name (`max_minutes = 7`); flags given on the command line override it.

Nothing here imports torch: `deltamem --help` builds this parser without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_OUT = Path("results/train")
Span = tuple[int, int]  # 'min,max' of a count


class ConfigError(ValueError):
    """A training configuration that cannot run, with a message that says why."""


def _flag(default, help: str, *, default_text: str | None = None, **argparse_kw):
    """A config field. `default_text` says in words what a None default means (--help shows
    it); the other keywords go to argparse (choices, metavar) or the span check (least)."""
    meta = {"help": help, "default_text": default_text, **argparse_kw}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every knob of a training run. Field order is the order of `deltamem train --help`."""

    model: str | None = _flag(None, "backbone folder", default_text="the default model")
    out_dir: Path = _flag(DEFAULT_OUT, "checkpoints, log, metrics, loss curve, card")
    init_adapter: Path | None = _flag(
        None, "start from this adapter folder instead of a fresh initialisation",
        default_text="a fresh adapter")
    layers: str = _flag(
        "all", "layers a fresh adapter wraps: 'all', 'last:N' or 'i,j,...' (--tiny uses "
        "last:4, whose backward stays shallow)")
    state_heads: int | None = _flag(
        None, "state heads per layer: 1 = TSW, 4 = the reference's MSW (four 8×8 states, "
        "reads of rank 32). A new adapter gets this many; with --init-adapter, more heads than "
        "the adapter has widens it: the new heads start silent (zero read-out), so training "
        "starts from the same function",
        default_text="1 for a new adapter, the adapter's own with --init-adapter")
    write_granularity: str | None = _flag(
        None, "how the memory is written: 'token' (TSW, every token) or 'message_mean' (SSW, "
        "one write per chat message of its tokens' mean, as the reference's SSW: the write "
        "passes give the messages' ids)", choices=("token", "message_mean"),
        default_text="token for a new adapter, the adapter's own with --init-adapter")
    resume: bool = _flag(False, "continue from <out-dir>/last (weights, optimizer, step, "
                                "metrics)")
    steps: int = _flag(1000, "optimizer steps")
    batch: int = _flag(4, "episodes per step")
    lr: float = _flag(2e-3, "peak learning rate")
    warmup: float = _flag(0.1, "warm-up fraction")
    min_lr_frac: float = _flag(0.05, "cosine floor as a fraction of the peak lr")
    clip: float = _flag(1.0, "gradient-norm clip")
    seed: int = _flag(0, "seed of init and data")
    threads: int = _flag(1, "torch CPU threads")
    device: str = _flag("cpu", "torch device of the backbone and the adapter: cpu, cuda, "
                               "cuda:N")
    dtype: str = _flag(
        "float32", "dtype of the frozen backbone; the adapter and the state stay float32 "
        "(bfloat16 is what the engine serves, and faster where the CPU has bf16 "
        "instructions)", choices=("float32", "bfloat16"))
    max_minutes: float | None = _flag(
        None, "wall-clock budget of the training loop: the learning-rate schedule and the "
        "curriculum follow max(step/steps, elapsed/budget), and training stops at whichever "
        "ends first", default_text="steps only")
    curriculum: str = _flag(
        "0:0,0.3:1,0.45:2,0.6:3,0.75:4,0.9:5",
        "frac:stage,... the stage reached at each fraction of the run (stages in "
        "deltamem.data.STAGES)")
    advance_at: float = _flag(
        0.7, "move to the next stage early when the recent train exact match reaches this "
        "(>1 disables)")
    p_earlier: float = _flag(0.3, "chance an episode comes from an earlier stage")
    max_stage: int | None = _flag(None, "never go beyond this stage", default_text="the last")
    facts: Span | None = _flag(
        None, "override facts per episode for every stage, 'min,max' (e.g. 1,1)",
        default_text="each stage's own", least=1)
    chatter: Span | None = _flag(
        None, "override chatter turns per episode for every stage but the probe (stage 0), "
        "'min,max': longer histories ask the state to carry a fact across more text than a "
        "window holds (e.g. 20,40)", default_text="each stage's own", least=0)
    sessions: int | None = _flag(
        None, "override sessions per episode (1-10) for every stage but the probe",
        default_text="each stage's own", choices=range(1, 11), metavar="N")
    probe_values: int | None = _flag(
        None, "values per kind in stage 0, the probe setting; 0 = the whole pools plus copy "
        "words (--p-copy), which asks the state to carry values it cannot memorise",
        default_text="the stage's own, 6")
    read_write_prob: float = _flag(
        1.0, "chance that the read pass writes its question and answer tokens, as a server "
        "does with every question turn (0 is the reference recipe's read pass without writes)")
    context_prob: float = _flag(
        0.5, "chance that the read pass re-sends a window of the history (the last 1..all "
        "messages, not written) before the question, as a served turn with a window does "
        "(otherwise the state only)")
    outside_window: float = _flag(
        0.0, "chance that a served episode's read pass re-sends every history message after "
        "the asked fact and none before it, so the answer is in the state only, behind a "
        "window of text, as the evaluation's questions outside W are (it takes precedence "
        "over --context-prob)")
    p_copy: float = _flag(
        0.5, "chance that an open-class value (pet, city, job ...) is a random word of the "
        "vocabulary (one token, unless --p-multi) instead of a pool value, so the state learns "
        "to carry values rather than memorise a pool")
    p_multi: float = _flag(
        0.0, "chance that a copy value (--p-copy) is a multi-token pseudo-word (a vocabulary "
        "word plus one or two word pieces), as most held-out values are several tokens; above "
        "0, events get copy phrases too")
    read_pass: str = _flag(
        "reread", "how an episode's question is read: 'reread', the reference recipe's second "
        "pass over [system, window, question, answer] from the history's final state (the "
        "window recomputed under it); 'stream', as a session is served since turn continuity: "
        "history, question and answer in one stream, each token written under the state of "
        "its time and the history's K/V kept, the question attending to the system prompt "
        "and the window only (token writes only)", choices=("reread", "stream"))
    dialogues: float = _flag(
        0.0, "share of served episodes drawn from real-style conversations (deltamem.dialogues, "
        "train split: dated sessions of two people's lives, questions of LoCoMo's kinds) "
        "instead of the curriculum's fact-recall chats")
    keep_weight: float = _flag(
        0.0, "the keep term: on read passes whose window shows the answer's evidence, "
        "KL(backbone || δ-mem) over the answer's tokens, weighted by this, replaces the "
        "cross-entropy to the reference answer, so the memory leaves alone what the backbone "
        "can already see and answers in its form (0 = the reference recipe)")
    general_per_step: int = _flag(
        2, "general-ability episodes per step: a sessionless question whose target is the "
        "backbone's own answer, so δ-mem leaves such answers alone (0 = none)")
    general_prompts: int = _flag(
        0, "templated prompts added to the 48 fixed general-ability questions "
        "(deltamem.data.general_prompts; the evaluator's are left out); a long run fits a "
        "small set and drifts elsewhere")
    general_weight: float = _flag(1.0, "weight of the general-ability loss")
    general_loss: str = _flag(
        "ce", "general-ability loss on the answer tokens: 'ce', cross-entropy of the "
        "backbone's greedy answer; 'kl', KL(backbone || δ-mem) over the whole next-token "
        "distribution, which pins more than the top token", choices=("ce", "kl"))
    beta_bias_init: float | None = _flag(
        None, "initial b_beta of a fresh adapter, or of the new state heads when "
        "--state-heads widens --init-adapter; lower values forget less over long histories "
        "at the start", default_text="the reference's -1.5")
    eval_episodes: int = _flag(64, "held-out episodes of the final evaluation, per stage")
    eval_every: int = _flag(100, "periodic held-out evaluation every N steps, 0 = never")
    eval_periodic_episodes: int = _flag(32, "held-out episodes of each periodic evaluation")
    eval_seed: int = _flag(7, "seed of the held-out episodes")
    before_episodes: int | None = _flag(
        None, "held-out episodes per stage of the before-training evaluation",
        default_text="--eval-episodes")
    ckpt_every: int = _flag(50, "checkpoint every N steps")
    tiny: bool = _flag(False, "a fast smoke configuration: 4 steps, 2 episodes, stages 0-1, "
                              "tiny eval")
    no_progress: bool = _flag(False, "no progress bar")
    finalize: bool = _flag(False, "train no further: resume <out-dir>/last, evaluate the best "
                                  "checkpoint, write the adapter folder with its card and "
                                  "loss curve")

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _coerce(f, _FIELD_TYPES[f.name], getattr(self, f.name)))
        self.validate()

    # --- checks ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Ranges and combinations that no run can use; raises ConfigError naming the flag."""
        if self.read_pass == "stream" and self.write_granularity == "message_mean":
            raise ConfigError("--read-pass stream writes per token: it cannot train an SSW "
                              "(--write-granularity message_mean) adapter")
        for name in ("steps", "batch", "ckpt_every", "eval_episodes", "eval_periodic_episodes"):
            _at_least(name, getattr(self, name), 1)
        for name in ("eval_every", "general_per_step", "general_prompts", "probe_values",
                     "max_stage", "before_episodes", "general_weight", "keep_weight"):
            _at_least(name, getattr(self, name), 0)
        _at_least("state_heads", self.state_heads, 1)
        for name in ("p_earlier", "read_write_prob", "context_prob", "outside_window", "p_copy",
                     "p_multi", "warmup", "min_lr_frac", "dialogues"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{_flag_name(name)} is a fraction in [0, 1], got {value}")
        for name in ("lr", "clip", "max_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{_flag_name(name)} must be positive, got {value}")
        for f in fields(self):  # choices, and the spans' least value
            _check_choice(f, getattr(self, f.name))
        try:
            parse_curriculum(self.curriculum)
            parse_layers(self.layers, 1)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.beta_bias_init is not None and self.init_adapter is not None \
                and self.state_heads is None:
            raise ConfigError("--beta-bias-init sets the gates of a fresh adapter or of the "
                              "heads --state-heads adds; with --init-adapter and no "
                              "--state-heads this run adds none")

    # --- derived settings --------------------------------------------------------------------

    @property
    def continues_run(self) -> bool:
        """Whether the run picks up <out-dir>/last when it is there (--finalize resumes)."""
        return self.resume or self.finalize

    def with_tiny_limits(self) -> TrainConfig:
        """--tiny: the fast smoke configuration, as a new config (this one is left alone)."""
        return dataclasses.replace(
            self, steps=min(self.steps, 4), batch=min(self.batch, 2),
            max_stage=1,  # stage 0 (state only) and stage 1 (windows, written questions)
            eval_episodes=min(self.eval_episodes, 2),
            eval_periodic_episodes=min(self.eval_periodic_episodes, 4),
            eval_every=2, ckpt_every=2, general_per_step=min(self.general_per_step, 1),
            layers="last:4" if self.layers == "all" else self.layers)

    def stages(self) -> list:
        """The run's own copy of the curriculum (deltamem.data.STAGES, a Difficulty per
        stage) with this config's overrides: --max-stage, --facts, --chatter, --sessions,
        --probe-values."""
        from . import data as D

        stages = list(D.STAGES)
        if self.max_stage is not None:
            stages = stages[:self.max_stage + 1]
        every = {"n_facts": self.facts} if self.facts else {}
        served = dict(every)  # the probe (state-only) stage keeps its own history size
        if self.chatter:
            served["n_chatter"] = self.chatter
        if self.sessions:
            served["n_sessions"] = self.sessions
        stages = [dataclasses.replace(d, **(every if d.state_only else served)) for d in stages]
        if self.probe_values is not None:
            stages[0] = dataclasses.replace(stages[0], value_subset=self.probe_values)
        return stages

    def as_flags(self) -> list[str]:
        """The command-line flags that give this config (fields that differ from defaults)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, bool):
                out.append(_flag_name(f.name))
            else:
                text = f"{value[0]},{value[1]}" if isinstance(value, tuple) else str(value)
                out += [_flag_name(f.name), text]
        return out

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, path: Path | str, **overrides) -> TrainConfig:
        """A config from a recipe file, with `overrides` (field values) on top."""
        values = load_recipe(path)
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as e:
            where = f"recipe {path}" + (" and the flags given" if overrides else "")
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """A config from `configure_parser`'s arguments: the recipe's values (--recipe), then
        the flags given on the command line. A namespace built some other way (without the
        record of given flags) counts every field it has as given."""
        names = [f.name for f in fields(cls)]
        given = getattr(args, _GIVEN, None)
        if given is None:
            given = set(names)
        flags = {n: getattr(args, n) for n in names if n in given and hasattr(args, n)}
        recipe = getattr(args, "recipe", None)
        return cls.from_recipe(recipe, **flags) if recipe is not None else cls(**flags)


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value, least) -> None:
    if value is not None and value < least:
        raise ConfigError(f"{_flag_name(name)} must be at least {least}, got {value}")


def _check_choice(f: dataclasses.Field, value) -> None:
    choices = f.metadata.get("choices")
    if value is not None and choices is not None and value not in choices:
        shown = (f"{choices.start}-{choices.stop - 1}" if isinstance(choices, range)
                 else ", ".join(choices))
        raise ConfigError(f"{_flag_name(f.name)} must be one of {shown}, got {value!r}")
    least = f.metadata.get("least")
    if value is not None and least is not None and not least <= value[0] <= value[1]:
        raise ConfigError(f"{_flag_name(f.name)}: expected {least} <= min <= max, got "
                          f"{value[0]},{value[1]}")


def _base_type(hint):
    """int for `int | None`, tuple for `Span | None`, and so on."""
    if typing.get_origin(hint) is tuple:
        return tuple
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if args else hint


def _coerce(f: dataclasses.Field, hint, value):
    """A field's value in its own type: what argparse gives and what TOML gives (a path as a
    string, a span as [min, max] or "min,max", a whole number for a float) end up alike."""
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{_flag_name(f.name)} cannot be empty")
    kind = _base_type(hint)
    wrong = ConfigError(f"{_flag_name(f.name)}: expected {kind.__name__}, got {value!r}")
    if kind is bool or isinstance(value, bool):
        if kind is not bool or not isinstance(value, bool):
            raise wrong
        return value
    if kind is float and isinstance(value, int | float):
        return float(value)
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    if kind is tuple:
        try:
            return _span(value, f.metadata["least"])
        except ValueError as e:
            raise ConfigError(f"{_flag_name(f.name)}: {e}") from None
    if not isinstance(value, kind):
        raise wrong
    return value


def _span(value, least: int) -> Span:
    """'min,max' (or a pair, as TOML writes it) of a count, least <= min <= max."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        if len(parts) != 2 or any(isinstance(x, bool | float) for x in parts):
            raise ValueError
        lo, hi = (int(x) for x in parts)
    except (TypeError, ValueError):
        raise ValueError(f"expected 'min,max', got {value!r}") from None
    if not least <= lo <= hi:
        raise ValueError(f"expected {least} <= min <= max, got {value!r}")
    return lo, hi


# --- schedule and curriculum: what a config means at each point of a run -----------------


def parse_curriculum(spec: str) -> list[tuple[float, int]]:
    """'frac:stage,...' -> [(frac, stage)] sorted by fraction."""
    out = []
    for part in spec.split(","):
        try:
            frac, stage = part.split(":")
            out.append((float(frac), int(stage)))
        except ValueError:
            raise ValueError(f"--curriculum: expected 'frac:stage,...', got {spec!r}") from None
        if not 0.0 <= out[-1][0] <= 1.0 or out[-1][1] < 0:
            raise ValueError(f"--curriculum: fractions in [0, 1] and stages >= 0, got {part!r}")
    return sorted(out)


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """'all' -> None (every layer), 'last:N' -> the last N, 'i,j,...' -> those."""
    try:
        if spec == "all":
            return None
        if spec.startswith("last:"):
            n = int(spec.split(":", 1)[1])
            if n < 1:
                raise ValueError
            return list(range(max(0, num_layers - n), num_layers))
        return sorted(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--layers: expected 'all', 'last:N' or 'i,j,...', got {spec!r}") \
            from None


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


def scheduled_stage(curriculum: list[tuple[float, int]], progress: float) -> int:
    stage = curriculum[0][1]
    for f, s in curriculum:
        if progress >= f:
            stage = s
    return stage


# --- recipes ---------------------------------------------------------------------------------


def load_recipe(path: Path | str) -> dict:
    """A recipe's field values. Keys are field names (underscores, as in the dataclass); an
    unknown key is an error naming it, so that a typo never silently trains with a default."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML: {e}") from None
    known = {f.name for f in fields(TrainConfig)}
    for key, value in table.items():
        if key in known:
            continue
        hint = (f" (did you mean {key.replace('-', '_')}?)"
                if key.replace("-", "_") in known else "")
        what = "a table" if isinstance(value, dict) else "an unknown key"
        raise ConfigError(f"recipe {path}: {what} {key!r}{hint}; recipes are flat tables of "
                          "TrainConfig fields")
    return dict(table)


# --- the command line ------------------------------------------------------------------------

# The namespace attribute that records the flags given explicitly. The parser's default is an
# empty frozenset, replaced (never mutated: argparse shares defaults between parses) by a new
# set as flags arrive; a namespace without it was not built by this parser.
_GIVEN = "_given_flags"


def _record_given(namespace, dest: str) -> None:
    setattr(namespace, _GIVEN, frozenset(getattr(namespace, _GIVEN, None) or ()) | {dest})


class _Store(argparse.Action):
    """argparse's store, noting that the flag was given (so that it overrides a recipe)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record_given(namespace, self.dest)


class _StoreTrue(argparse.Action):
    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, required=required,
                         help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        _record_given(namespace, self.dest)


def _argparse_span(least: int):
    """An argparse type for 'min,max' (a usage error, not a traceback, when it is wrong)."""
    def parse(text: str) -> Span:
        try:
            return _span(text, least)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if isinstance(f.default, bool):
        return text.replace("%", "%%")
    shown = f.metadata["default_text"] or f.default
    return f"{text} (default: {shown})".replace("%", "%%")


def configure_parser(p: argparse.ArgumentParser) -> None:
    """`deltamem train`'s flags: --recipe, then one per TrainConfig field."""
    p.add_argument("--recipe", type=Path, default=None,
                   help="a TOML file of TrainConfig field values (see recipes/); flags given "
                        "on the command line override it (default: none)")
    p.set_defaults(**{_GIVEN: frozenset()})
    for f in fields(TrainConfig):
        kind = _base_type(_FIELD_TYPES[f.name])
        if kind is bool:
            p.add_argument(_flag_name(f.name), action=_StoreTrue, help=_help_text(f))
            continue
        kw = {"type": _argparse_span(f.metadata["least"]) if kind is tuple else kind}
        for key in ("choices", "metavar"):
            if f.metadata.get(key) is not None:
                kw[key] = f.metadata[key]
        p.add_argument(_flag_name(f.name), action=_Store, default=f.default,
                       help=_help_text(f), **kw)
