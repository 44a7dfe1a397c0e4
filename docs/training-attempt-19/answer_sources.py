"""Attempt 19: where do the answers to questions whose fact lies outside the window come from?
For each live-evaluation result file, the questions with evidence outside W = 256 tokens: how
often the δ-mem answer is one of the conversation's asked values (a fact's value, right or
wrong), with the window (deltamem@W) and from the state alone (deltamem@0). A one-off.

    .venv/bin/python docs/training-attempt-19/answer_sources.py RESULTS.json...
"""

import json
import sys
from pathlib import Path

from deltamem.evaluate import load_conversations


def main(paths: list[str], n: int = 12, seed: int = 1234) -> None:
    values = {c["sample_id"]: {str(q["answer"]).strip().lower() for q in c["qa"]}
              for c in load_conversations(None, n, seed)}
    for path in paths:
        res = json.loads(Path(path).read_text())
        for mode in ("deltamem@W", "deltamem@0"):
            rs = [x for x in res["results"] if x["mode"] == mode
                  and x["evidence_distance"] and x["evidence_distance"] > res["window"]]
            hits = sum(x["prediction"].strip().lower() in values[x["sample"]] for x in rs)
            right = sum(bool(x["em"]) for x in rs)
            print(f"{path} {mode}: answer is one of the conversation's values {hits}/{len(rs)}"
                  f" (right {right})")


if __name__ == "__main__":
    main(sys.argv[1:])
