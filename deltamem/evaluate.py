"""`deltamem eval`: memory evaluation through the live server API.

Reads conversations in the LoCoMo format (a list of samples with `conversation` holding
`speaker_a`, `speaker_b`, `session_N` lists of {speaker, dia_id, text} and
`session_N_date_time`, and `qa` with question, answer, evidence, category) or generates the
held-out split of deltamem.data. Each conversation becomes one API session; its LoCoMo
sessions are fed in order, one API turn each (all utterances of a session as user messages,
a one-token reply); then each question is asked in a fork of the session, so questions do not
write into each other.

Modes (the first two share the window W):
  backbone@W       the bare backbone (a --no-memory server), recent W tokens in the prompt
  deltamem@W       δ-mem with the same window
  deltamem@0       δ-mem, state only
  backbone@full    the bare backbone with the whole history (as far as the context allows)
  deltamem@full    δ-mem with the whole history too (the paper's context + state protocol)

Metrics: LoCoMo-style token F1 and exact match, per category and for the questions whose
evidence lies outside the window; a JSON result, a markdown table and a bar chart.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

GENERAL_SET = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("How many days are in a week?", "seven|7"),
    ("How many legs does a spider have?", "eight|8"),
    ("What is 2 plus 2?", "four|4"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What gas do plants absorb from the air?", "carbon dioxide|CO2"),
    ("What is the freezing point of water in Celsius?", "0|zero"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the opposite of hot?", "cold"),
    ("What animal is known as man's best friend?", "dog"),
    ("How many continents are there?", "seven|7"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the chemical symbol for gold?", "Au"),
    # Added for resolution (20 questions moved the score 5 points a question): candidates
    # the backbone answers right with its greedy 24 tokens in the HF runtime (bf16, memory
    # off), kept as found; the served bf16 engine misses 3 of these 34.
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of India?", "Delhi"),
    ("What is the capital of Argentina?", "Buenos Aires"),
    ("What is the capital of Poland?", "Warsaw"),
    ("How many seconds are in a minute?", "sixty|60"),
    ("How many sides does a square have?", "four|4"),
    ("What is half of 10?", "five|5"),
    ("What is the name of our galaxy?", "Milky Way"),
    ("What is the hottest planet in the solar system?", "Venus"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("Who discovered penicillin?", "Fleming"),
    ("Who painted the Starry Night?", "Van Gogh"),
    ("What is the largest desert in the world?", "Sahara|Antarctic"),
    ("What is the longest river in South America?", "Amazon"),
    ("What is the opposite of day?", "night"),
    ("What is the opposite of fast?", "slow"),
    ("What is the opposite of old?", "young|new"),
    ("What is the plural of mouse?", "mice"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is H2O commonly called?", "water"),
    ("What organ pumps blood through the body?", "heart"),
    ("What language is spoken in Italy?", "Italian"),
    ("What language is spoken in Japan?", "Japanese"),
    ("What currency is used in Japan?", "yen"),
    ("In which city is the Eiffel Tower?", "Paris"),
    ("In which country is the Great Wall?", "China"),
    ("What is the first month of the year?", "January"),
    ("What gas do humans need to breathe?", "oxygen"),
    ("What is the largest bone in the human body?", "femur"),
]

CATEGORY_NAMES = {1: "single fact", 2: "updated fact", 3: "multi-session", 4: "other",
                  5: "adversarial"}


# --- scoring (LoCoMo style) ---------------------------------------------------------------------

def normalize(text: str) -> str:
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the|and)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answer: str) -> float:
    p, a = normalize(prediction).split(), normalize(answer).split()
    common = Counter(p) & Counter(a)
    same = sum(common.values())
    if not p or not a or same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(a)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def contains(prediction: str, answer: str) -> float:
    """Answer (any of `a|b`) appears in the prediction as whole words."""
    pred = f" {normalize(prediction)} "
    return float(any(f" {normalize(a)} " in pred for a in answer.split("|")))


# --- data -----------------------------------------------------------------------------------------

def load_conversations(path: Path | None, n: int, seed: int) -> list[dict]:
    if path is not None:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, list) else [data]
    from .data import locomo_conversation

    return [locomo_conversation("heldout", seed, i) for i in range(n)]


def session_turns(sample: dict) -> list[tuple[list[dict], list[str]]]:
    """[(messages of one LoCoMo session, their dia_ids)] in order."""
    conv = sample["conversation"]
    n, sessions = 1, []
    while f"session_{n}" in conv:
        sessions.append(n)
        n += 1
    turns = []
    for s in sessions:
        msgs, ids = [], []
        if len(sessions) > 1:
            msgs.append({"role": "user", "content":
                         f"[Session {s}, {conv.get(f'session_{s}_date_time', '')}]"})
            ids.append(None)
        for t in conv[f"session_{s}"]:
            msgs.append({"role": "user", "content": f"{t['speaker']}: {t['text']}"})
            ids.append(t.get("dia_id"))
        if msgs:
            turns.append((msgs, ids))
    return turns


# --- running --------------------------------------------------------------------------------------

class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 300):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout, headers=(
            {"Authorization": f"Bearer {api_key}"} if api_key else {}))
        self.model = self.http.get(self.url + "/v1/models").json()["data"][0]["id"]

    def chat(self, messages, session_id=None, window=None, max_tokens=32) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0}
        if session_id:
            body["session_id"] = session_id
        if window is not None:
            body["memory_window_tokens"] = window
        r = self.http.post(self.url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} from {self.url}: {r.text[:300]}")
        return r.json()["choices"][0]["message"]["content"]

    def fork(self, sid: str, new_id: str) -> None:
        r = self.http.post(f"{self.url}/v1/sessions/{sid}/fork", json={"new_session_id": new_id})
        r.raise_for_status()

    def delete(self, sid: str) -> None:
        self.http.delete(f"{self.url}/v1/sessions/{sid}")


def evidence_distance(tokenizer, sample_turns, evidence: list[str]) -> int | None:
    """Tokens between the start of the earliest evidence utterance and the end of the
    conversation, as the server renders it (ChatML per message)."""
    per_msg = []
    for msgs, ids in sample_turns:
        for m, i in zip(msgs, ids, strict=True):
            n = len(tokenizer.encode(f"<|im_start|>user\n{m['content']}<|im_end|>\n",
                                     add_special_tokens=False))
            per_msg.append((i, n))
        per_msg.append((None, 3))  # the one-token reply and its delimiters
    total, dist = 0, None
    for i, n in reversed(per_msg):
        total += n
        if i is not None and i in evidence:
            dist = total
    return dist


def run_mode(client: Client, conversations, mode: str, window: int, max_tokens: int,
             tokenizer, progress, system_prompt: str | None = None) -> list[dict]:
    results = []
    for sample in conversations:
        sid = f"eval-{mode.replace('@', '-')}-{uuid.uuid4().hex[:10]}"
        turns = session_turns(sample)
        for i, (msgs, _) in enumerate(turns):
            if i == 0 and system_prompt:  # the first turn sets the session's system prompt
                msgs = [{"role": "system", "content": system_prompt}, *msgs]
            client.chat(msgs, session_id=sid, window=window, max_tokens=1)
        for q in sample["qa"]:
            fork = f"{sid}-q{uuid.uuid4().hex[:6]}"
            client.fork(sid, fork)
            pred = client.chat([{"role": "user", "content": q["question"]}], session_id=fork,
                               window=window, max_tokens=max_tokens)
            client.delete(fork)
            answer = str(q["answer"])
            dist = evidence_distance(tokenizer, turns, q.get("evidence", []))
            results.append({
                "mode": mode, "sample": sample.get("sample_id"), "question": q["question"],
                "answer": answer, "prediction": pred, "category": q.get("category"),
                "f1": token_f1(pred, answer), "em": exact_match(pred, answer),
                "contains": contains(pred, answer), "evidence_distance": dist})
            progress.update(1)
        client.delete(sid)
    return results


def general_ability(client: Client) -> list[dict]:
    """Each general question, sessionless, with the reply and whether it holds the answer."""
    rows = []
    for q, a in GENERAL_SET:
        pred = client.chat([{"role": "user", "content": q}], max_tokens=24)
        rows.append({"question": q, "answer": a, "prediction": pred, "ok": contains(pred, a)})
    return rows


def summarize(results: list[dict], window: int) -> dict:
    by_mode = defaultdict(list)
    for r in results:
        by_mode[r["mode"]].append(r)
    out = {}
    for mode, rs in by_mode.items():
        def agg(sel):
            sel = list(sel)
            if not sel:
                return None
            return {k: sum(r[k] for r in sel) / len(sel) for k in ("f1", "em", "contains")} | {
                "n": len(sel)}
        cats = sorted({r["category"] for r in rs if r["category"] is not None})
        out[mode] = {
            "all": agg(rs),
            "outside_window": agg(r for r in rs if r["evidence_distance"] is not None
                                  and r["evidence_distance"] > window),
            "inside_window": agg(r for r in rs if r["evidence_distance"] is not None
                                 and r["evidence_distance"] <= window),
            "categories": {str(c): agg(r for r in rs if r["category"] == c) for c in cats},
        }
    return out


def category_names(conversations: list[dict]) -> dict:
    """LoCoMo's category names, or the generator's for its own conversations."""
    if conversations and all(str(c.get("sample_id", "")).startswith("deltamem-")
                             for c in conversations):
        from .data import CATEGORY_NAMES as GENERATED

        return GENERATED
    return CATEGORY_NAMES


def markdown_table(summary: dict, general: dict, window: int,
                   names: dict | None = None) -> str:
    lines = [f"| mode | F1 all | EM all | contains all | EM outside W={window} (n) | n | "
             f"general ability ({len(GENERAL_SET)} q.) |", "|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        a, o = s["all"], s["outside_window"]
        g = general.get(mode.split("@")[0])
        lines.append(f"| {mode} | {a['f1']:.3f} | {a['em']:.3f} | {a['contains']:.3f} | "
                     f"{o['em'] if o else float('nan'):.3f} ({o['n'] if o else 0}) | {a['n']} | "
                     f"{'' if g is None else f'{g:.3f}'} |")
    cats = sorted({c for s in summary.values() for c in s["categories"]})
    if cats:
        lines += ["", "| mode | " + " | ".join(
            f"F1 cat {c} ({(names or CATEGORY_NAMES).get(int(c), c)})" for c in cats) + " |",
            "|---|" + "---|" * len(cats)]
        for mode, s in summary.items():
            cells = [s["categories"].get(c) for c in cats]
            lines.append(f"| {mode} | " + " | ".join(
                "" if x is None else f"{x['f1']:.3f}" for x in cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    f1 = [summary[m]["all"]["f1"] for m in modes]
    em = [summary[m]["all"]["em"] for m in modes]
    out = [(summary[m]["outside_window"] or {"em": 0})["em"] for m in modes]
    x = range(len(modes))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.27
    ax.bar([i - w for i in x], f1, w, label="F1 (all)")
    ax.bar(list(x), em, w, label="EM (all)")
    ax.bar([i + w for i in x], out, w, label="EM (evidence outside window)")
    ax.set_xticks(list(x), modes, rotation=15)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("δ-mem memory evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="LoCoMo-format JSON (default: generate the held-out split)")
    p.add_argument("--conversations", type=int, default=20,
                   help="generated conversations when --data is not given (default 20)")
    p.add_argument("--seed", type=int, default=1234, help="held-out generator seed")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many "
                   "conversations")
    p.add_argument("--server", default="http://127.0.0.1:8000",
                   help="URL of a δ-mem server (modes deltamem@*)")
    p.add_argument("--baseline-server", default=None,
                   help="URL of a --no-memory server (modes backbone@*)")
    p.add_argument("--api-key", default=None, help="API key for both servers")
    p.add_argument("--window", type=int, default=256, help="window W in tokens (default 256)")
    p.add_argument("--modes", default="backbone@W,deltamem@W,deltamem@0,backbone@full,"
                   "deltamem@full", help="comma-separated modes to run")
    p.add_argument("--max-tokens", type=int, default=24, help="answer length limit")
    p.add_argument("--model", default=None, help="backbone folder for token counting "
                   "(default: the fetched default model)")
    p.add_argument("--out", type=Path, default=Path("results/eval"),
                   help="output folder: results.json, table.md, chart.png")
    p.add_argument("--no-general", action="store_true", help="skip the general-ability set")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt of every evaluated session (default: the one the "
                        "adapters are trained with, deltamem.data.SYSTEM_PROMPT; '' for the "
                        "model's own)")


def run(args) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from .model_fetch import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    convs = load_conversations(args.data, args.conversations, args.seed)[:args.limit]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    clients = {"deltamem": Client(args.server, args.api_key)}
    if any(m.startswith("backbone") for m in modes):
        if not args.baseline_server:
            print("error: backbone modes need --baseline-server (a `deltamem serve "
                  "--no-memory` URL)", file=sys.stderr)
            return 2
        clients["backbone"] = Client(args.baseline_server, args.api_key)
    windows = {"W": args.window, "0": 0, "full": -1}
    if args.system_prompt is None:
        from .data import SYSTEM_PROMPT

        args.system_prompt = SYSTEM_PROMPT
    n_q = sum(len(c["qa"]) for c in convs)
    results = []
    t0 = time.time()
    with tqdm(total=n_q * len(modes), desc="eval", unit="q") as bar:
        for mode in modes:
            kind, w = mode.split("@")
            results += run_mode(clients[kind], convs, mode, windows[w], args.max_tokens, tok,
                                bar, args.system_prompt or None)
    general_rows = {} if args.no_general else {k: general_ability(c)
                                               for k, c in clients.items()}
    general = {k: sum(r["ok"] for r in rows) / len(rows) for k, rows in general_rows.items()}
    summary = summarize(results, args.window)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"window": args.window, "conversations": len(convs), "questions": n_q,
           "seconds": time.time() - t0, "summary": summary, "general_ability": general,
           "general_answers": general_rows, "results": results}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    table = markdown_table(summary, general, args.window, category_names(convs))
    (args.out / "table.md").write_text(table)
    bar_chart(summary, args.out / "chart.png")
    print(table)
    print(f"wrote {args.out}/results.json, table.md, chart.png")
    return 0
