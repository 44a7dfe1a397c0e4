"""Can the state learn to carry a fact at all? The probe of docs/training.md, as a script.

One fact (favourite colour or dog's name, 12 values each) in a user message among filler;
write pass over it (gradients through the state); read pass with writes off over only the
question and the answer; loss on the answer. State-only exact match on fresh episodes is
printed every --eval-every steps. It measured 0% → 90% at step 300 on 2 cores.
A sanity check of the trainer's machinery (runtime, chunked scan gradients), not the task of
issue 6: the values here are few and seen in training.

--open-values asks the question issue 6 turns on: dog names are drawn from thousands of
single-token vocabulary words, half of which are never trained on; exact match is printed for
trained names and for unseen ones. A state that carries the value (rather than recognising
one of a few) scores on both.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

COLOURS = "red blue green yellow purple orange pink brown black white grey violet".split()
DOGS = "Rex Bella Max Luna Charlie Daisy Rocky Molly Buddy Coco Toby Ruby".split()
FILLER = ["The weather was nice today.", "I went to the market in the morning.",
          "My neighbour is painting his fence.", "We watched a film last night.",
          "Work has been busy this week.", "I need to buy some bread."]
FACTS = [("My favourite colour is {}.", "What is my favourite colour?", COLOURS),
         ("My dog's name is {}.", "What is my dog's name?", DOGS)]


def episode(rng: random.Random, names: list[str] | None = None):
    fact, question, values = FACTS[1] if names else rng.choice(FACTS)
    value = rng.choice(names or values)
    lines = rng.sample(FILLER, 2)
    lines.insert(rng.randint(0, 2), fact.format(value))
    return " ".join(lines), question, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-episodes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--open-values", action="store_true",
                    help="dog names from thousands of vocabulary words, half never trained on")
    ap.add_argument("--json", type=Path, default=Path("results/memory_probe.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from deltamem.hf_runtime import DeltaMemHF
    from deltamem.model_fetch import resolve_model

    model_dir = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rt = DeltaMemHF.from_pretrained(model_dir, seed=0)
    params = list(rt.adapter.module.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    train_names = unseen_names = None
    if a.open_values:
        from deltamem.data import copy_word_lists

        words = copy_word_lists(list(tok.get_vocab()))["cap"]
        train_names, unseen_names = words[0::2], words[1::2]

    def ids(msgs, gen=False):
        return tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                       return_dict=True)["input_ids"]

    def loss_and_exact(ep):
        history, question, value = ep
        h = torch.tensor([ids([{"role": "user", "content": history}])])
        _, state, _ = rt.forward(h)
        prompt = ids([{"role": "user", "content": question}], gen=True)
        answer = tok(value, add_special_tokens=False).input_ids + [end]
        r = torch.tensor([prompt + answer])
        logits, _, _ = rt.forward(r, state, torch.zeros(r.shape, dtype=torch.bool))
        pred = logits[0, len(prompt) - 1:-1]
        target = torch.tensor(answer)
        loss = torch.nn.functional.cross_entropy(pred.float(), target)
        return loss, bool((pred.argmax(-1) == target).all())

    def evaluate(seed, names=train_names):
        rng = random.Random(seed)
        with torch.no_grad():
            return sum(loss_and_exact(episode(rng, names))[1]
                       for _ in range(a.eval_episodes)) / a.eval_episodes

    def scores(seed):
        out = {"exact": evaluate(seed)}
        if unseen_names:
            out["exact_unseen"] = evaluate(seed, unseen_names)
        return out

    def show(rec):
        unseen = f", unseen values {rec['exact_unseen']:.2f}" if "exact_unseen" in rec else ""
        return f"state-only exact {rec['exact']:.2f}{unseen}"

    rng = random.Random(0)
    log = [{"step": 0, **scores(123)}]
    print(f"step 0: {show(log[-1])}", flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        opt.zero_grad()
        total = 0.0
        for _ in range(a.batch):
            loss, _ = loss_and_exact(episode(rng, train_names))
            (loss / a.batch).backward()
            total += float(loss.detach()) / a.batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            log.append({"step": step, "loss": total, **scores(123 + step),
                        "seconds": round(time.time() - t0)})
            print(f"step {step}: loss {total:.3f}, {show(log[-1])} ({log[-1]['seconds']} s)",
                  flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
