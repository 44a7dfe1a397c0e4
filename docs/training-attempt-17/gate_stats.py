"""Write gates of adapters on 12 held-out stage-5 histories (10-20 chatter turns): per state
head, mean β, β on the asked answer's tokens (its last statement), and how much of a write
at that point each row keeps to the history's end, ∏(1 − β). A one-off (not project code),
the source of attempts 16 and 17's gate tables.

    PYTHONPATH=. .venv/bin/python docs/training-attempt-17/gate_stats.py ADAPTER [ADAPTER...]
"""

import dataclasses
import sys

import torch
from transformers import AutoTokenizer

from deltamem import data as D
from deltamem.adapter import load_adapter
from deltamem.hf_runtime import DeltaMemHF
from deltamem.model_fetch import resolve_model
from deltamem.train import Encoder


def main(paths: list[str], episodes: int = 12) -> None:
    torch.set_num_threads(1)
    md = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(md)
    enc = Encoder(tok)
    diff = dataclasses.replace(D.STAGES[5], n_chatter=(10, 20))
    for path in paths:
        ad = load_adapter(path)
        rt = DeltaMemHF.from_pretrained(md, adapter=ad, dtype=torch.bfloat16)
        H = ad.config.num_state_heads
        outs: list[torch.Tensor] = []
        for layer in rt.adapter.module.layers.values():
            layer.w_beta.register_forward_hook(
                lambda m, i, o, outs=outs: outs.append(torch.sigmoid(o.float())))
        mean_b, ans_b, keeps = ([[] for _ in range(H)] for _ in range(3))
        after = []
        for e in range(episodes):
            ep = D.make_episode("heldout", 99, e, diff)
            ids = enc.history(ep)
            ans = tok(" " + ep.answer, add_special_tokens=False).input_ids
            pos = [j for j in range(len(ids) - len(ans) + 1) if ids[j:j + len(ans)] == ans]
            if not pos:
                continue
            p0, p1 = pos[-1], pos[-1] + len(ans)
            after.append(len(ids) - p1)
            outs.clear()
            with torch.no_grad():
                rt.forward(torch.tensor([ids]), None, torch.ones(1, len(ids), dtype=torch.bool))
            for o in outs:  # one per layer, (1, T, H·r)
                b = o[0].view(len(ids), H, -1)
                for h in range(H):
                    mean_b[h].append(b[:, h].mean())
                    ans_b[h].append(b[p0:p1, h].mean())
                    keeps[h].append(torch.log1p(-b[p1:, h]).sum(0).exp())
        print(f"{path} ({len(after)} histories, {sum(after) / len(after):.0f} tokens after "
              "the fact on average)")
        for h in range(H):
            k = torch.cat([x.flatten() for x in keeps[h]])
            print(f"  head {h}: mean β {torch.stack(mean_b[h]).mean():.4f}, on the answer "
                  f"{torch.stack(ans_b[h]).mean():.4f}, row keeps: median {k.median():.2e}, "
                  f"> 0.1 in {(k > 0.1).float().mean():.0%} of rows")


if __name__ == "__main__":
    main(sys.argv[1:])
