"""Attempt 26: would sharp keys make the copy heads answer? (a replay with a patched layer)

The fitted keys name their role by argmax in 0.76-0.93 of held-out value tokens but put only
a third to two thirds of their energy on it (README.md), and under the rule's row decay the
overlap costs reads. The format's key is normalize(tanh(W_k x)); here, in the HF replay only,
the copy heads' key (heads 4-5 of role_keys.py's rank-16 adapter) becomes
normalize(softmax(W_k x / T)) over its 15 role dimensions (the 16th, the queries' rest, stays
0), so a key is close to one-hot wherever the ridge's score has a margin of a few T. With
--sharp-queries the queries too: softmax over all 16 dimensions (the rest included). With
--gate-beta B the copy heads' gate becomes B wherever the fitted β exceeds --gate-threshold
and 0 elsewhere (a gate that cannot spread; --temperature 0 leaves the keys as fitted).
Then attempt 22's diagnose.py runs as it is.

    PYTHONPATH=.:.dev/scripts .venv/bin/python docs/training-attempt-26/sharp_keys.py \
        --temperature 0.03 [--sharp-queries] [--gate-beta 0.2 --gate-threshold 0.02] -- \
        --adapter ADAPTER --seed 1234 --out OUT.json

A one-off (not project code): the engine knows no softmax key.
"""

import argparse
import sys

import diagnose
import torch
import torch.nn.functional as F
from program_copy import BASE_HEADS

from deltamem.layer import DeltaMemLayer, MemoryProjections

ROLES = 15


def patch(temperature: float, sharp_queries: bool, gate_beta: float = 0.0,
          gate_threshold: float = 0.02):
    plain = DeltaMemLayer.project

    def project(self, x):
        p = plain(self, x)
        if self.cfg.rank != ROLES + 1:
            return p
        shape = (*x.shape[:-1], self.cfg.num_state_heads, self.cfg.rank)
        xs = x.to(self.w_k.weight.dtype)
        k, q, beta = p.k.clone(), p.q.clone(), p.beta.clone()
        if temperature > 0:
            zk = self.w_k(xs).view(shape)[..., BASE_HEADS:, :ROLES]
            k[..., BASE_HEADS:, :ROLES] = F.normalize(torch.softmax(zk / temperature, -1), dim=-1)
            k[..., BASE_HEADS:, ROLES:] = 0
        if sharp_queries:
            zq = self.w_q(xs).view(shape)[..., BASE_HEADS:, :]
            q[..., BASE_HEADS:, :] = F.normalize(torch.softmax(zq / temperature, -1), dim=-1)
        if gate_beta > 0:
            b = beta[..., BASE_HEADS:, :]
            beta[..., BASE_HEADS:, :] = gate_beta * (b > gate_threshold).to(b.dtype)
        return MemoryProjections(q, k, p.v, beta)

    DeltaMemLayer.project = project


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperature", type=float, default=0.03)
    ap.add_argument("--sharp-queries", action="store_true")
    ap.add_argument("--gate-beta", type=float, default=0.0)
    ap.add_argument("--gate-threshold", type=float, default=0.02)
    own, rest = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) \
        if "--" in sys.argv else (sys.argv[1:], [])
    args = ap.parse_args(own)
    patch(args.temperature, args.sharp_queries, args.gate_beta, args.gate_threshold)
    sys.argv = [sys.argv[0], *rest]
    diagnose.main()
