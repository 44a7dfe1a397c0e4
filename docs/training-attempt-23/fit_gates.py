"""Attempt 23: the copy heads' gates learned, against every written token.

Attempt 22's replay found the served reads to be mixtures: the asked value's gate ranks
12th-16th among a conversation's written tokens, chatter nouns ("regards", "umbrella") are
written about as strongly, and a read that points at the right value has a median cosine of
0.41-0.60 with it. Attempt 19's oracle needs a clean read (a full copy of the value at gain
0.5 names 46 of 48 held-out values); at the served cosines, a gain above ~0.1 garbles answers.
The fits so far could not see the chatter: their contrast was among the conversation's values
only, and the gate's direction was a fixed value-token probe. Here, on attempt 22's served
inputs (fit_served.collect_served) and loss per answer token (--answer-tokens):

- the contrast is against every written token of the conversation (its v̂), except those
  with the target token's id, so chatter that leaks into the read costs as much as another
  value does;
- the gate's direction is learned too (from the probe, a step scaled to the probe's own
  size), with its scale and offset, W_k and W_q as before.

Values and read-out are attempt 19's, as in attempts 20 and 22. A one-off (not project code).

    PYTHONPATH=.:docs/training-attempt-18:docs/training-attempt-19:docs/training-attempt-20:docs/training-attempt-21:docs/training-attempt-22:docs/training-attempt-23 \
        .venv/bin/python docs/training-attempt-23/fit_gates.py IN OUT --cache /tmp/att23 \
        --answer-tokens 3 [fit_address flags]

IN is the shipped adapter (attempt 20). The runs of the record (README.md): --chats 240 --held 32
--steps 1000 --answer-tokens 3 --fit-only (fit_gates.log), the same with --fixed-gate
(fit_fixed.log); adapters from the first by --from-fit OUT.fit.pt --save-gain 0.1, 0.15 and 0.5.
The inputs were cached by --collect-block 0, 2 and -1 in three processes of one thread and
block 1 as chats 80-119 and 120-159 by two more (fit_served.collect_served, merged in order:
chats are seeded by index, so the block is the same).
"""

import sys

import fit_address as FA
import fit_served as FS
import torch
import torch.nn.functional as F


class BatchIds(FS.BatchJ):
    """fit_served.BatchJ with the history's token ids (B, T)."""

    def __init__(self, chats, li, first_only: bool = False):
        super().__init__(chats, li, first_only)
        self.ids = FA.pad_stack([c["ids"] for c in chats])


class GateAddressing(FA.Addressing):
    """fit_address.Addressing with the gate's direction learned: the probe + |probe|_mean · dwb,
    so that Adam's steps are on the probe's scale."""

    def __init__(self, wk, wq, wb, bb, proj):
        super().__init__(wk, wq, wb, bb, proj)
        self.dwb = torch.nn.Parameter(torch.zeros_like(wb))
        self.step_size = float(wb.abs().mean())

    def gate(self):
        return self.wb + self.step_size * self.dwb


def token_logits(m, v, b: BatchIds, tpos, tau: float):
    """Cosine logits (Q, T) of reads m (Q, 64) against every written token's value v
    (B, T, 64) of their chat; tokens with the target's id are left out, the target kept."""
    ar = torch.arange(len(m), device=m.device)
    tid = b.ids[b.chat, tpos]
    logits = torch.einsum("qd,btd->qbt", F.normalize(m, dim=-1),
                          F.normalize(v, dim=-1))[ar, b.chat] / tau
    ok = b.hmask[b.chat] & (b.ids[b.chat] != tid[:, None])
    ok[ar, tpos] = True
    return logits.masked_fill(~ok, -1e9)


def losses_all(addr, wv, b, tau):
    """The read at each answer token must point at the asked value's token, against every
    other written token of the conversation (tokens with the target's id excepted)."""
    reads, qh, qr, v = FA.run(addr, wv, b)
    Q = len(b.target)
    ar = torch.arange(Q, device=reads.device)
    tpos = b.cand_q[ar, b.target]
    logits = token_logits(reads[ar, b.ans], v, b, tpos, tau)
    ce = F.cross_entropy(logits, tpos)
    acc = (logits.argmax(1) == tpos).float()
    if not torch.is_grad_enabled():
        # the fit's earlier measure: among the values' tokens only
        cq = b.cand_q
        lv = torch.gather(logits, 1, cq.clamp_min(0)).masked_fill(cq < 0, -1e9)
        acc_v = (lv.argmax(1) == b.target).float()
        far = (b.hmask.sum(1)[b.chat] - tpos) > FS.WINDOW
        beta = addr.beta(b.hx) * b.hmask
        ranks = (beta[b.chat] > beta[b.chat, tpos][:, None]).sum(1).float()
        print(f"    all tokens: acc {float(acc.mean()):.3f} (far first tokens "
              f"{float(acc[far & b.first].mean()):.3f}) | among values {float(acc_v.mean()):.3f}"
              f" | cos with target median {float((logits[ar, tpos] * tau).median()):.2f}"
              f" | target gate rank median {float(ranks.median()):.0f}", flush=True)
    rel = (reads[ar, b.ans].norm(dim=1) / v[b.chat, tpos].norm(dim=1)).mean()
    return ce, FA.rest_loss(qh, qr, b), acc, rel


if __name__ == "__main__":
    FS.ANSWER_TOKENS = int(FS.flag("--answer-tokens", FS.ANSWER_TOKENS))
    if "--fixed-gate" in sys.argv:  # the probe's direction, as attempts 20 and 22
        sys.argv.remove("--fixed-gate")
    else:
        FA.Addressing = GateAddressing
    FA.collect, FA.Batch, FA.losses = FS.collect_served, BatchIds, losses_all
    FA.main()
