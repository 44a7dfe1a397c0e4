"""Attempt 29: an adapter served in the HF runtime on what issue 6 measures, without a server:
outside-window exact matches of the evaluation's δ-mem@W mode per held-out seed (as
e2e_grouped.replay_exact), and the general-ability set asked sessionless as the evaluator
does (the server's path for a request without a session: zero state, every token written).
The runtime is float32 and the engine bf16: general answers differed by 1 (shipped) to 4
(attempt 29's run A) of 54 between the two, so a candidate's general ability is measured
live. A one-off (not project code).

    PYTHONPATH=<as e2e_grouped.py> .venv/bin/python docs/training-attempt-29/replay_check.py \\
        --adapter A --seeds 1234 1235 1236 [--general]
"""

import argparse

import torch
from diagnose import keep_inputs, replay_runtime
from e2e_copy import LAYERS
from e2e_grouped import replay_exact

from deltamem import evaluate as E
from memory_store import SessionRecord
from server.sessions import plan_turn


class SessionlessReplay:
    """The evaluator's client (deltamem.evaluate.Client) for sessionless requests, served by
    the HF runtime the way the server serves them (zero state, every token written), so that
    evaluate.general_ability asks and scores as it does live."""

    def __init__(self, rt, fmt, ident):
        self.rt, self.fmt, self.ident = rt, fmt, ident

    @torch.no_grad()
    def chat(self, messages, session_id=None, window=None, max_tokens=32) -> str:
        assert session_id is None, "sessionless requests only"
        plan = plan_turn(self.fmt, SessionRecord("ephemeral", "t", self.ident), messages, -1,
                         8192, max_tokens)
        r = self.rt.run(plan.prompt, plan.initial_state, 0, max_tokens,
                        [self.fmt.im_end, self.fmt.tok.eos_token_id])
        return self.fmt.decode(r.tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="deltamem/adapters/smollm2-135m-instruct")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1234, 1235, 1236])
    ap.add_argument("--general", action="store_true")
    args = ap.parse_args()
    _, rt, fmt, ident = replay_runtime(args.adapter)
    xs = keep_inputs(rt, LAYERS)
    total = 0
    for seed in args.seeds:
        ok, n = replay_exact(rt, fmt, ident, xs, [seed])
        total += ok
        print(f"{args.adapter} seed {seed}: outside W exact {ok} of {n}", flush=True)
    print(f"{args.adapter}: outside W exact {total} over seeds {args.seeds}", flush=True)
    if args.general:
        rows = E.general_ability(SessionlessReplay(rt, fmt, ident))
        print(f"{args.adapter}: general ability {int(sum(r['ok'] for r in rows))} of {len(rows)}",
              flush=True)


if __name__ == "__main__":
    main()
