"""Attempt 26: what a fitted write side loses, keys against gate.

On the held-out chats' served inputs, each layer's copy state is written through the real
rule by the group's value tokens only, with the fitted keys or with one-hot keys of the true
(kind, place) role, and with the fitted gate or with β = --beta on every such token. Then
each asked value is read back with the key it was written with (the own-key read of
attempts 24-25) and must point at its own token against every written token of the chat
(fit_gates.token_logits). Overall and for first tokens that lie outside the window.

    PYTHONPATH=.:.dev/scripts .venv/bin/python docs/training-attempt-26/own_key_read.py \
        FIT.fit.pt --cache PREFIX [--layers 16 17]

(.dev/scripts: the scripts of attempts 18-26 side by side.) A one-off (not project code).
"""

import argparse
import glob

import fit_address as FA
import fit_gates as FG
import fit_groups as FGR
import fit_served as FS
import role_keys as RK
import slot_codes as SC
import torch
import torch.nn.functional as F
from program_copy import copy_runtime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fit", help="role_keys.py's DST.fit.pt")
    ap.add_argument("--cache", default="/tmp/att26c")
    ap.add_argument("--layers", type=int, nargs="*", default=[16, 17])
    ap.add_argument("--beta", type=float, default=0.2)
    ap.add_argument("--src", default=".dev/base4", help="any adapter of the backbone (the "
                    "tokenizer and copy words come with it)")
    args = ap.parse_args()
    SC.R, SC.REST, SC.PLACES = RK.R, RK.REST, RK.PLACES
    FGR.configure(RK.R, SC.GROUPS, RK.HEADS)
    tok, _, words, _, _ = copy_runtime(args.src)
    held = []
    for path in glob.glob(f"{args.cache}_*_heldout_*.pt"):
        held += FGR.add_kinds(torch.load(path), tok, words, "heldout", 0)
    fit = torch.load(args.fit)
    for li in args.layers:
        f, g = fit["layers"][li], RK.layer_group(li)
        b = FGR.BatchG(held, li)
        place = torch.stack([SC.places(h) for h in b.hkind])
        role = RK.role_codes(b.hkind.flatten(), place.flatten(), g).view(b.hkind.shape)
        own = (role >= 0) & b.hmask
        one_hot = F.one_hot(role.clamp_min(0), RK.R).float() * own[..., None]
        ar = torch.arange(len(b.target))
        asked = b.tgroup == g
        tpos = b.cand_q[ar, b.target]
        far = asked & ((b.hmask.sum(1)[b.chat] - tpos) > FS.WINDOW) & b.first
        with torch.no_grad():  # how one-hot the fitted keys are
            k = FA.Addressing(f["wk"], f["wq"], f["wb"], f["bb"],
                              torch.eye(f["wk"].shape[1])).keys(b.hx[own])
            r = role[own]
            on = k[torch.arange(len(k)), r].pow(2)
            cos2, same = (k @ k.T).pow(2), r[:, None] == r[None, :]
        print(f"layer {li} (group {g}): fitted keys' energy on their role {float(on.mean()):.2f}"
              f"; mean cos² of keys of different roles {float(cos2[~same].mean()):.3f}, of the "
              f"same role {float(cos2[same].mean()):.3f}; written tokens a chat "
              f"{float(b.hmask.sum(1).float().mean()):.0f}", flush=True)
        for keys in ("fitted", "one-hot"):
            for gate in ("fitted", f"{args.beta}"):
                addr = FA.Addressing(f["wk"], f["wq"], f["wb"], f["bb"],
                                     torch.eye(f["wk"].shape[1]))
                fitted_beta = addr.beta
                addr.beta = ((lambda x, fb=fitted_beta, m=own: fb(x) * m) if gate == "fitted"
                             else (lambda x, m=own: args.beta * m.float()))
                if keys == "one-hot":
                    addr.keys = lambda x, oh=one_hot: oh
                with torch.no_grad():
                    k, _, v, state = FA.write(addr, f["wv"], b)
                    mk = torch.einsum("qkr,qr->qk", state[b.chat], k[b.chat, tpos])
                    hit = FG.token_logits(mk, v, b, tpos, 0.1).argmax(1) == tpos
                print(f"layer {li} (group {g}), {keys} keys, gate {gate}: own-key read at its "
                      f"token {float(hit[asked].float().mean()):.3f}, far first tokens "
                      f"{float(hit[far].float().mean()):.3f} (of {int(far.sum())})", flush=True)


if __name__ == "__main__":
    FS.ANSWER_TOKENS = 3
    main()
