"""The release gate: which adapter checkpoint ships, decided by live evaluations.

A candidate is judged on `deltamem eval` results (served protocol, live servers, the bf16
engine) on held-out data it was never trained on:

- real-style conversations (`deltamem eval --generated dialogues`, or a LoCoMo-format file):
  δ-mem@W against backbone@W token F1, categories 1-4, and the answers' length on the same
  questions;
- the fact-recall set (`deltamem eval`, the default generator): δ-mem@W against backbone@W;
- general ability, δ-mem against the backbone, from the real-style run.

The first three targets are the must-haves of the shipped adapter; the goal is the paper's
LoCoMo ratio. A candidate that meets every must and has the best real-style ratio ships; if
none meets them all, the one with the best real-style ratio among those that do no harm
there (ratio >= 1) ships, else the one closest to doing no harm, and the verdict says which
targets it misses. `--card` records the verdict in the shipped adapter's TRAINING_CARD.md.

    deltamem gate --candidate shipped real/results.json recall/results.json \\
                  --candidate one-head real1/results.json recall1/results.json \\
                  --card deltamem/adapters/smollm2-135m-instruct/TRAINING_CARD.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .evaluate import answer_words

# (key, what it measures, must, goal); a pair (low, high) is a range the value must lie in.
TARGETS = [
    ("real_f1_ratio", "real-style F1, δ-mem@W / backbone@W", 1.0, 1.2),
    ("general_ratio", "general ability, δ-mem / backbone", 0.95, None),
    ("answer_length_ratio", "answer words, δ-mem@W / backbone@W", (0.5, 2.0), None),
    ("recall_f1_ratio", "fact-recall F1, δ-mem@W / backbone@W", 2.0, None),
]


class GateError(ValueError):
    """Results that cannot be judged: a mode or the general-ability set is missing."""


def _rows(doc: dict, mode: str) -> dict[tuple, dict]:
    """A mode's scored rows (category 5 apart) by (sample, question)."""
    return {(r["sample"], r["question"]): r for r in doc.get("results", [])
            if r["mode"] == mode and not r.get("adversarial")}


def _load(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("protocol", "served") != "served":
        raise GateError(f"{path}: the gate reads served-protocol results, not "
                        f"{doc.get('protocol')!r}")
    return doc


def measures(real: dict, recall: dict | None = None, baseline: dict | None = None,
             recall_baseline: dict | None = None) -> dict:
    """A candidate's numbers: F1 of both modes on the questions both answered and their
    ratio (real-style and fact-recall), answer words (real-style), general ability.
    `baseline` / `recall_baseline`: results holding backbone@W (and the backbone's general
    ability) for a candidate whose own results lack them, measured in the same session."""
    out: dict = {}
    for name, doc, base_doc in (("real", real, baseline), ("recall", recall, recall_baseline)):
        if doc is None:
            continue
        mem = _rows(doc, "deltamem@W")
        base = _rows(doc, "backbone@W") or (_rows(base_doc, "backbone@W") if base_doc else {})
        keys = sorted(set(mem) & set(base))
        if not keys:
            raise GateError(f"the {name} results need deltamem@W and backbone@W rows on the "
                            "same questions")
        f1m = sum(mem[k]["f1"] for k in keys) / len(keys)
        f1b = sum(base[k]["f1"] for k in keys) / len(keys)
        out[f"{name}_f1"] = {"deltamem": f1m, "backbone": f1b, "n": len(keys)}
        out[f"{name}_f1_ratio"] = f1m / f1b if f1b else float("inf" if f1m else "nan")
        if name == "real":
            wm = sum(answer_words(mem[k]["prediction"]) for k in keys) / len(keys)
            wb = sum(answer_words(base[k]["prediction"]) for k in keys) / len(keys)
            out["answer_words"] = {"deltamem": wm, "backbone": wb}
            out["answer_length_ratio"] = wm / wb if wb else float("nan")
    general = dict((baseline or {}).get("general_ability", {}))
    general.update(real.get("general_ability", {}))
    if "deltamem" in general and "backbone" in general:
        out["general"] = {"deltamem": general["deltamem"], "backbone": general["backbone"]}
        out["general_ratio"] = (general["deltamem"] / general["backbone"]
                                if general["backbone"] else float("nan"))
    return out


def _meets(value, bound) -> bool:
    if value is None or value != value:  # missing or nan
        return False
    if isinstance(bound, tuple):
        return bound[0] <= value <= bound[1]
    return value >= bound


def verdict(m: dict) -> dict:
    """Each target met or not (None: not measured), the goal, and whether all musts hold."""
    checks = {key: (_meets(m[key], must) if key in m else None) for key, _, must, _ in TARGETS}
    goals = {key: _meets(m.get(key), goal) for key, _, _, goal in TARGETS if goal is not None}
    return {"targets": checks, "goals": goals,
            "passes": all(v is True for v in checks.values())}


def choose(candidates: dict[str, dict]) -> str:
    """The candidate that ships (see the module's docstring)."""
    def real(name):
        r = candidates[name].get("real_f1_ratio", float("-inf"))
        return r if r == r else float("-inf")

    passing = [n for n, m in candidates.items() if verdict(m)["passes"]]
    if passing:
        return max(passing, key=real)
    harmless = [n for n in candidates if real(n) >= 1.0]
    return max(harmless or list(candidates), key=real)


def _fmt(x, digits=2) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def table(candidates: dict[str, dict], chosen: str) -> str:
    head = "| candidate | " + " | ".join(desc for _, desc, _, _ in TARGETS) + " | all musts |"
    lines = [head, "|---|" + "---|" * (len(TARGETS) + 1)]
    bounds = "| target | " + " | ".join(
        (f"{must[0]}–{must[1]}×" if isinstance(must, tuple) else f"≥ {must}×")
        + (f" (goal ≥ {goal}×)" if goal else "") for _, _, must, goal in TARGETS) + " | |"
    lines.append(bounds)
    for name, m in candidates.items():
        v = verdict(m)
        cells = []
        for key, _, _, _ in TARGETS:
            ok = v["targets"][key]
            cells.append("not measured" if ok is None else
                         f"{_fmt(m[key])}× {'met' if ok else 'missed'}")
        mark = " **(ships)**" if name == chosen else ""
        lines.append(f"| {name}{mark} | " + " | ".join(cells) +
                     f" | {'yes' if v['passes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def card_section(candidates: dict[str, dict], chosen: str, sources: dict[str, list[str]]
                 ) -> str:
    m = candidates[chosen]
    lines = ["## Release gate", "",
             f"Chosen by `deltamem gate` from {len(candidates)} candidate(s): **{chosen}**. "
             + ("It meets every must." if verdict(m)["passes"] else
                "No candidate met every must; this one has the best real-style ratio among "
                "those that do no harm there (or, if none, the closest to it), and the table "
                "says what it misses."), "",
             table(candidates, chosen)]
    rows = []
    for key in ("real_f1", "recall_f1"):
        if key in m:
            rows.append(f"- {key.replace('_', ' ')}: δ-mem@W {m[key]['deltamem']:.3f}, "
                        f"backbone@W {m[key]['backbone']:.3f} ({m[key]['n']} questions)")
    if "answer_words" in m:
        rows.append(f"- mean answer words: δ-mem@W {m['answer_words']['deltamem']:.1f}, "
                    f"backbone@W {m['answer_words']['backbone']:.1f}")
    if "general" in m:
        rows.append(f"- general ability: δ-mem {m['general']['deltamem']:.3f}, "
                    f"backbone {m['general']['backbone']:.3f}")
    rows.append("- results: " + ", ".join(f"`{s}`" for s in sources[chosen]))
    return "\n".join(lines + rows) + "\n"


def record_in_card(card: Path, section: str) -> None:
    """Put `section` in the card, replacing an earlier release gate section: at the end of
    the card's own part, before the first later top-level heading (a base adapter's card)."""
    text = card.read_text() if card.is_file() else ""
    text = re.sub(r"\n## Release gate\n.*?(?=\n## |\n# |\Z)", "", text, flags=re.S)
    later = re.search(r"\n# ", text[1:])
    cut = later.start() + 1 if later else len(text)
    head, tail = text[:cut].rstrip(), text[cut:].lstrip("\n")
    card.write_text((head + "\n\n" if head else "") + section + ("\n" + tail if tail else ""))


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidate", nargs="+", action="append", required=True,
                   metavar=("NAME REAL_RESULTS", "RECALL_RESULTS"),
                   help="a candidate: its name, the results.json of `deltamem eval` on "
                        "real-style conversations, and optionally that of the fact-recall "
                        "set (repeat for each candidate)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="results.json holding backbone@W and the backbone's general ability "
                        "for candidates whose results lack them (same session)")
    p.add_argument("--recall-baseline", type=Path, default=None,
                   help="the same for the fact-recall results")
    p.add_argument("--card", type=Path, default=None,
                   help="record the verdict in this TRAINING_CARD.md (the chosen adapter's)")
    p.add_argument("--out", type=Path, default=None, help="write the verdict as JSON here")


def run(args) -> int:
    baseline = _load(args.baseline) if args.baseline else None
    recall_base = _load(args.recall_baseline) if args.recall_baseline else None
    candidates, sources = {}, {}
    try:
        for spec in args.candidate:
            if len(spec) not in (2, 3):
                raise GateError(f"--candidate {' '.join(spec)}: give NAME REAL_RESULTS "
                                "[RECALL_RESULTS]")
            name, paths = spec[0], [Path(x) for x in spec[1:]]
            recall = _load(paths[1]) if len(paths) > 1 else None
            m = measures(_load(paths[0]), recall, baseline, recall_base)
            candidates[name], sources[name] = m, [str(x) for x in paths]
    except (GateError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = choose(candidates)
    print(table(candidates, chosen))
    v = verdict(candidates[chosen])
    print(f"ships: {chosen} ({'meets every must' if v['passes'] else 'misses a must'})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"chosen": chosen, "candidates": {
            n: {"measures": m, "verdict": verdict(m), "sources": sources[n]}
            for n, m in candidates.items()}}, indent=1))
    if args.card:
        record_in_card(args.card, card_section(candidates, chosen, sources))
        print(f"recorded in {args.card}")
    return 0 if v["passes"] else 1
