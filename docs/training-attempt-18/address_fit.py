"""Attempt 18, step 3: fit keys and queries (program_memory's ridge regressions onto slot
codes) on address_data.py's train inputs and check them on its held-out episodes. Per layer:
"pick", how often the asked fact's value has the highest mean k̂·q̂ among the chat's facts at
the position that starts the answer (chance ≈ 0.2, as address_stats.py of attempt 17), and
"slot", how often that query's nearest code is the asked slot (chance 0.1).
A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18 .venv/bin/python \
        docs/training-attempt-18/address_fit.py DATA.pt LAMBDA...
"""

import sys

import program_memory as P
import torch
from torch.nn.functional import normalize

from deltamem import data as D


def main(path: str, lambdas: list[float]) -> None:
    d = torch.load(path, weights_only=False)
    hx, hslot, _, rx, rslot = d["train"]
    held = [h for h in d["held"] if h["spans"][h["asked"]] is not None]
    slots = list(D.SLOTS)
    codes = P.slot_codes(len(slots), 8).double()
    target = torch.atanh(0.9 * codes / codes.abs().max(1, keepdim=True).values)
    val = hslot >= 0
    for lam in lambdas:
        picks, slot_hits = [], []
        for li in range(len(hx)):
            wk = P.ridge(hx[li][val], target[hslot[val]], lam)
            wq = P.ridge(rx[li], target[rslot], lam)
            pick = slot_hit = 0
            for h in held:
                q = normalize(torch.tanh(h["read"][li][-1].double() @ wq.T), dim=0)
                scores = torch.tensor([
                    -9.0 if s is None
                    else float(normalize(torch.tanh(s[li].double() @ wk.T), dim=-1).mean(0) @ q)
                    for s in h["spans"]])
                pick += int(scores.argmax() == h["asked"])
                slot_hit += int((q @ codes.T).argmax() == slots.index(h["slots"][h["asked"]]))
            picks.append(pick / len(held))
            slot_hits.append(slot_hit / len(held))
        print(f"lambda {lam} ({len(held)} questions), layers 0-29")
        print("  pick " + " ".join(f"{p:.2f}" for p in picks))
        print("  slot " + " ".join(f"{p:.2f}" for p in slot_hits), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [float(x) for x in sys.argv[2:]])
