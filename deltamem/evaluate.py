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
evidence lies outside the window; a JSON result, a markdown table and a bar chart. Category-5
(adversarial) items, which carry `adversarial_answer` instead of `answer`, are asked too and
reported apart: scored 1 when the reply says the conversation does not tell (the reference's
rule), never in the "all" numbers.

`--protocol reference` runs the δ-mem reference's LoCoMo protocol instead, so that its numbers
can be set beside the paper's (docs/training.md §5): per question one sessionless request (a
zero state; the whole prompt written in one prefill) holding the reference's system prompt and
one user message that renders the conversation (DATE / CONVERSATION blocks) and the question
(category 2 with a date hint); the reference's sampling (temperature 0.4, top-p 0.9, top-k 10,
50 tokens) or greedy; Porter-stemmed token F1 with the category rules (1: comma-split answer
parts, the best prediction part each; 3: the answer before ';'). Categories 1-4 make the
headline; category 5 is counted and reported apart (asked only when --categories names it).
Modes: `deltamem` (--server) and `backbone` (--baseline-server).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import string
import sys
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from pathlib import Path

_PUNCT = frozenset(string.punctuation)

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

# LoCoMo's categories as the δ-mem reference names them (deltamem/eval/locomo_protocol.py there).
CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop",
                  5: "adversarial"}
ADVERSARIAL = 5


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


def is_adversarial(q: dict) -> bool:
    """A LoCoMo category-5 item: its `adversarial_answer` (444 of LoCoMo's 446 have no
    `answer`) is the trap, and the right reply is that the conversation does not say."""
    return q.get("category") == ADVERSARIAL or ("answer" not in q and "adversarial_answer" in q)


# --- the reference's LoCoMo scorer ----------------------------------------------------------------
# As the δ-mem reference scores LoCoMo (deltamem/eval/locomo_protocol.py: normalize_answer,
# single_answer_f1, multi_answer_f1, score_locomo_prediction; see the prompt section), which follows
# LoCoMo's own task_eval/evaluation.py (snap-research/locomo: normalize_answer, f1_score, f1,
# eval_question_answering) with NLTK's PorterStemmer. Written here from those rules.

_VOWELS = frozenset("aeiou")
# NLTK's irregular forms (its default NLTK_EXTENSIONS mode): mapped as they are, not stemmed.
_PORTER_IRREGULAR = {
    "sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie",
    "news": "news", "innings": "inning", "inning": "inning", "outings": "outing",
    "outing": "outing", "cannings": "canning", "canning": "canning", "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed"}


def _consonant(w: str, i: int) -> bool:
    if w[i] in _VOWELS:
        return False
    if w[i] == "y":  # y is a consonant at the start and after a vowel
        return i == 0 or not _consonant(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant sequences in [C](VC)^m[V]."""
    pattern = "".join("c" if _consonant(stem, i) else "v" for i in range(len(stem)))
    return pattern.count("vc")


def _has_vowel(stem: str) -> bool:
    return any(not _consonant(stem, i) for i in range(len(stem)))


def _double_consonant(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _consonant(w, len(w) - 1)


def _cvc(w: str) -> bool:
    """Ends consonant-vowel-consonant, the last not w, x or y; or (NLTK) is vowel-consonant."""
    n = len(w)
    if n >= 3 and (_consonant(w, n - 3) and not _consonant(w, n - 2) and _consonant(w, n - 1)
                   and w[-1] not in "wxy"):
        return True
    return n == 2 and not _consonant(w, 0) and _consonant(w, 1)


def _first_rule(w: str, rules) -> str:
    """Porter's rule lists: the first rule whose suffix matches decides, whether or not its
    condition holds (condition None: always)."""
    for suffix, repl, cond in rules:
        if w.endswith(suffix):
            stem = w[:len(w) - len(suffix)]
            return stem + repl if cond is None or cond(stem) else w
    return w


def _m_pos(stem: str) -> bool:
    return _measure(stem) > 0


def _m_gt1(stem: str) -> bool:
    return _measure(stem) > 1


_STEP2 = [("ational", "ate", _m_pos), ("tional", "tion", _m_pos), ("enci", "ence", _m_pos),
          ("anci", "ance", _m_pos), ("izer", "ize", _m_pos), ("bli", "ble", _m_pos),
          ("alli", "al", _m_pos), ("entli", "ent", _m_pos), ("eli", "e", _m_pos),
          ("ousli", "ous", _m_pos), ("ization", "ize", _m_pos), ("ation", "ate", _m_pos),
          ("ator", "ate", _m_pos), ("alism", "al", _m_pos), ("iveness", "ive", _m_pos),
          ("fulness", "ful", _m_pos), ("ousness", "ous", _m_pos), ("aliti", "al", _m_pos),
          ("iviti", "ive", _m_pos), ("biliti", "ble", _m_pos), ("fulli", "ful", _m_pos),
          # the l of -logi stays with the stem, so geo-logi works like archaeo-logi
          ("logi", "log", lambda stem: _measure(stem + "l") > 0)]
_STEP3 = [("icate", "ic", _m_pos), ("ative", "", _m_pos), ("alize", "al", _m_pos),
          ("iciti", "ic", _m_pos), ("ical", "ic", _m_pos), ("ful", "", _m_pos),
          ("ness", "", _m_pos)]
_STEP4 = [(s, "", _m_gt1) for s in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant",
                                      "ement", "ment", "ent")] + [
    ("ion", "", lambda stem: _measure(stem) > 1 and stem[-1:] in ("s", "t"))] + [
    (s, "", _m_gt1) for s in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")]


def _step2(w: str) -> str:
    if w.endswith("alli") and _m_pos(w[:-4]):  # NLTK: -alli -> -al first, then step 2 again
        return _step2(w[:-4] + "al")
    return _first_rule(w, _STEP2)


def porter_stem(word: str) -> str:
    """One word's Porter stem, as NLTK's `PorterStemmer().stem` gives it (its default
    NLTK_EXTENSIONS mode, which the reference's scorer uses): lower-cased; its irregular
    forms; words of one or two letters as they are; steps 1a-5b with NLTK's departures
    ('ies'/'ied' of four letters -> 'ie', y -> i only after a consonant, -alli, -fulli,
    -logi, the cvc test on two-letter stems). E.g. running, runs -> run; flies -> fli;
    dies -> die; happily -> happili; relational -> relat."""
    w = word.lower()
    if w in _PORTER_IRREGULAR:
        return _PORTER_IRREGULAR[w]
    if len(w) <= 2:
        return w
    # step 1a: plurals
    if w.endswith("ies") and len(w) == 4:
        w = w[:-3] + "ie"
    else:
        w = _first_rule(w, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None),
                            ("s", "", None)])
    # step 1b: -eed, -ed, -ing
    if w.endswith("ied"):
        w = w[:-3] + ("ie" if len(w) == 4 else "i")
    elif w.endswith("eed"):
        if _m_pos(w[:-3]):
            w = w[:-1]
    else:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and _has_vowel(w[:-len(suffix)]):
                w = w[:-len(suffix)]
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif _double_consonant(w):
                    if w[-1] not in "lsz":
                        w = w[:-1]
                elif _measure(w) == 1 and _cvc(w):
                    w += "e"
                break
    # step 1c: y -> i after a consonant that is not the whole stem
    if w.endswith("y") and len(w) > 2 and _consonant(w, len(w) - 2):
        w = w[:-1] + "i"
    w = _step2(w)
    w = _first_rule(w, _STEP3)
    w = _first_rule(w, _STEP4)
    # step 5a: a final e
    if w.endswith("e"):
        stem = w[:-1]
        if _measure(stem) > 1 or (_measure(stem) == 1 and not _cvc(stem)):
            w = stem
    # step 5b: -ll -> -l
    if w.endswith("ll") and _measure(w[:-1]) > 1:
        w = w[:-1]
    return w


def ref_normalize(text: str) -> str:
    """The reference's answer normalisation: commas dropped, Unicode NFD, lower case, ASCII
    punctuation dropped, the words a, an, the and `and` dropped, whitespace collapsed.
    "The cat, and a DOG!" -> "cat dog"."""
    text = unicodedata.normalize("NFD", str(text).replace(",", "")).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the|and)\b", " ", text)
    return " ".join(text.split())


def ref_tokens(text: str) -> list[str]:
    """The normalised text's words, each Porter-stemmed."""
    return [porter_stem(t) for t in ref_normalize(text).split()]


def ref_f1(prediction: str, answer: str) -> float:
    """Token F1 over stemmed tokens (a multiset overlap); 0 when either side is empty."""
    p, a = ref_tokens(prediction), ref_tokens(answer)
    same = sum((Counter(p) & Counter(a)).values())
    if not p or not a or same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(a)
    return 2 * precision * recall / (precision + recall)


def ref_multi_f1(prediction: str, answer: str) -> float:
    """Category 1 (multi-hop): the answer and the prediction split on commas; for each answer
    part the best F1 over the prediction parts; the mean over the answer parts."""
    preds = [x.strip() for x in prediction.split(",") if x.strip()]
    parts = [x.strip() for x in str(answer).split(",") if x.strip()]
    if not preds or not parts:
        return 0.0
    return sum(max(ref_f1(p, a) for p in preds) for a in parts) / len(parts)


def ref_adversarial_score(prediction: str) -> float:
    """Category 5: 1 when the reply says the conversation does not tell."""
    low = prediction.lower()
    return float("no information available" in low or "not mentioned" in low)


def ref_scored_answer(q: dict) -> str | None:
    """The answer the reference scores against: category 3 keeps the part before ';';
    None for category 5 (scored without an answer)."""
    if is_adversarial(q):
        return None
    answer = str(q["answer"])
    if q.get("category") == 3:
        answer = answer.split(";")[0].strip()
    return answer


def ref_score(q: dict, prediction: str) -> float:
    """One question's score under the reference's category rules."""
    prediction = prediction.strip()
    if is_adversarial(q):
        return ref_adversarial_score(prediction)
    answer = ref_scored_answer(q)
    if q.get("category") == 1:
        return ref_multi_f1(prediction, answer)
    return ref_f1(prediction, answer)


# --- data -----------------------------------------------------------------------------------------

def load_conversations(path: Path | None, n: int, seed: int, generated: str = "facts"
                       ) -> list[dict]:
    """A LoCoMo-format file's samples, or n conversations of a generator's held-out split:
    "facts" (deltamem.data: fact-recall chats) or "dialogues" (deltamem.dialogues:
    real-style conversations). Every question needs `question`, and `answer` or
    (category 5) `adversarial_answer`."""
    if path is not None:
        data = json.loads(Path(path).read_text())
        data = data if isinstance(data, list) else [data]
        for sample in data:
            for i, q in enumerate(sample.get("qa", [])):
                if "question" not in q or not ("answer" in q or is_adversarial(q)):
                    raise ValueError(f"{path}: sample {sample.get('sample_id')!r} question {i}"
                                     " has no question or no answer")
        return data
    if generated == "dialogues":
        from .dialogues import locomo_dialogue

        return [locomo_dialogue("heldout", seed, i) for i in range(n)]
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


# --- the reference's LoCoMo prompt ------------------------------------------------------------
# Wording and rendering as the δ-mem reference's `official_prompt` LoCoMo path:
# deltamem/eval/locomo_protocol.py of declare-lab/delta-Mem (OFFICIAL_SYSTEM_PROMPT,
# OFFICIAL_QA_PROMPT, OFFICIAL_CONV_START_PROMPT, render_locomo_turn,
# build_official_context_text, build_official_full_history_messages, prepare_locomo_question,
# canonicalize_locomo_prediction), read from the copy in its fork
# xiaol/Multi-state-RWKV-online-memory at 1e4367de with that fork's
# deltamem/tests/test_locomo_eval.py (declare-lab's own copy was not at hand); run by
# deltamem/eval/locomo_delta.py with --categories 1 2 3 4 --max-new-tokens 50
# --answer-reserve-tokens 50 --seed 42 --full-history-mode official_prompt in declare-lab's
# scripts/run_qasper_multimodel_write8192_benchmark_suite.sh. The wording comes from LoCoMo's
# own task_eval/evaluate_llama2.py (snap-research/locomo; "wriiten" is theirs).
# Quirks kept: each turn ends in a blank line; the sessions come out latest first (the loop
# walks them in order but prepends each block); the context budget counts turns only.

REF_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant whose job is to understand "
    "the following conversation and answer questions based on the conversation. "
    "If you don't know the answer to a question, please don't share false information.")
REF_QA_PROMPT = (
    "Based on the above conversations, write a short answer for the following question "
    "in a few words. Do not write complete and lengthy sentences. "
    "Answer with exact words from the conversations whenever possible.\n\n"
    "Question: {}")
REF_CONV_START = (
    "Below is a conversation between two people: {} and {}. "
    "The conversation takes place over multiple days and the date of each conversation "
    "is wriiten at the beginning of the conversation.\n\n")
REF_DATE_HINT = " Use DATE of CONVERSATION to answer with an approximate date."
REF_NO_INFO = "No information available"
REF_SAMPLING = {"temperature": 0.4, "top_p": 0.9, "top_k": 10}
REF_MAX_TOKENS = 50  # the reference's max_new_tokens and answer_reserve_tokens
REF_SEED = 42
REF_CATEGORIES = (1, 2, 3, 4)


def ref_question(q: dict, sample_id: str, index: int, seed: int = REF_SEED
                 ) -> tuple[str, dict | None]:
    """The question as the reference asks it, and for category 5 its two options.

    Category 2 gets the date hint. Category 5 becomes a choice between its (adversarial)
    answer and "No information available", in an order fixed by sha256 of
    "seed|sample_id|index|cat5" as the reference draws it; `index` is the question's place
    among the sample's evaluated questions."""
    if is_adversarial(q):
        trap = q.get("answer", q.get("adversarial_answer"))
        trap = REF_NO_INFO if trap is None else str(trap)
        digest = hashlib.sha256(f"{seed}|{sample_id}|{index}|cat5".encode()).digest()
        if int.from_bytes(digest[:8], "big") % 2 == 0:
            options = {"a": REF_NO_INFO, "b": trap}
        else:
            options = {"a": trap, "b": REF_NO_INFO}
        return (f"{q['question']} (a) {options['a']} (b) {options['b']}. "
                "Select the correct answer by writing (a) or (b)."), options
    if q.get("category") == 2:
        return q["question"] + REF_DATE_HINT, None
    return q["question"], None


def ref_turn(turn: dict) -> str:
    """One utterance: `Speaker said, "text"`, a shared image's caption, then a blank line."""
    out = f'{turn["speaker"]} said, "{turn["text"]}"\n'
    if turn.get("blip_caption"):
        out += f' and shared {turn["blip_caption"]}.'
    return out + "\n"


def ref_session_numbers(conv: dict) -> list[int]:
    return sorted(int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k)))


def ref_context(conv: dict, question_prompt: str, count_tokens, max_context_tokens: int,
                answer_reserve: int = REF_MAX_TOKENS) -> tuple[str, bool]:
    """The conversation block of the prompt, and whether it was cut to fit.

    The reference's estimate: the opening line, the question prompt and the turns kept so
    far, plus the next turn under its DATE header, must stay below the context minus the
    answer reserve; at the first turn that does not fit, the rest is dropped (the budget is
    the model's context there, 262,144 tokens for Qwen3-4B-Instruct-2507, so LoCoMo is never
    cut)."""
    start = REF_CONV_START.format(conv["speaker_a"], conv["speaker_b"])
    fixed = count_tokens(start) + count_tokens(question_prompt)
    text, total, cut = "", 0, False
    for n in ref_session_numbers(conv):
        date = conv.get(f"session_{n}_date_time", "")
        for turn in reversed(conv[f"session_{n}"]):
            t = ref_turn(turn)
            if fixed + count_tokens(f"DATE: {date}\nCONVERSATION:\n{t}") + total \
                    < max_context_tokens - answer_reserve:
                text = t + text
                total += count_tokens(t)
            else:
                cut = True
                break
        text = f"\nDATE: {date}\nCONVERSATION:\n" + text
        if cut:
            break
    return start + text, cut


def ref_messages(context: str, question_prompt: str) -> list[dict]:
    """The request's messages: the reference's system prompt, then one user message."""
    return [{"role": "system", "content": REF_SYSTEM_PROMPT},
            {"role": "user", "content": context + "\n\n" + question_prompt}]


def ref_canonicalize(raw: str, options: dict | None = None) -> str:
    """The reply as the reference scores it: its first non-empty line, lower-cased, without
    "(a)", "(b)", "a)", "b)" and "answer:"; for category 5 the option it picked."""
    text = raw.replace('\\"', "'").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        text = lines[0]
    low = text.lower()
    if options is not None:
        if "(a)" in low or low == "a" or low.startswith("a)"):
            return options["a"]
        if "(b)" in low or low == "b" or low.startswith("b)"):
            return options["b"]
        if "no information available" in low or "not mentioned" in low:
            return REF_NO_INFO
    for junk in ("(a)", "(b)", "a)", "b)", "answer:"):
        low = low.replace(junk, "")
    return low.strip()


# --- running --------------------------------------------------------------------------------------

class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 300, transport=None):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout, transport=transport, headers=(
            {"Authorization": f"Bearer {api_key}"} if api_key else {}))
        card = self.http.get(self.url + "/v1/models").json()["data"][0]
        self.model = card["id"]
        self.max_model_len = card.get("max_model_len")  # where the server says it

    def chat(self, messages, session_id=None, window=None, max_tokens=32, **sampling) -> str:
        """One completion; greedy unless `sampling` (temperature, top_p, top_k, seed) says
        otherwise."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, **sampling}
        if session_id:
            body["session_id"] = session_id
        if window is not None:
            body["memory_window_tokens"] = window
        r = self.http.post(self.url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            hint = (" (the server does not take top_k: run --sampling greedy, or a server "
                    "whose request model has top_k)") if "top_k" in r.text else ""
            raise RuntimeError(f"{r.status_code} from {self.url}: {r.text[:300]}{hint}")
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
            dist = evidence_distance(tokenizer, turns, q.get("evidence", []))
            row = {"mode": mode, "sample": sample.get("sample_id"), "question": q["question"],
                   "answer": q.get("answer"), "prediction": pred,
                   "category": q.get("category"), "adversarial": is_adversarial(q),
                   "evidence_distance": dist}
            if row["adversarial"]:  # no answer to match: did it say it cannot tell?
                row["adversarial_answer"] = q.get("adversarial_answer")
                score = ref_adversarial_score(pred)
                row |= {"f1": score, "em": score, "contains": score}
            else:
                answer = str(q["answer"])
                row |= {"f1": token_f1(pred, answer), "em": exact_match(pred, answer),
                        "contains": contains(pred, answer)}
            results.append(row)
            progress.update(1)
        client.delete(sid)
    return results


def ref_evaluated(sample: dict, categories) -> list[dict]:
    """The sample's questions in `categories`, in order (their places are the reference's
    question indices)."""
    return [q for q in sample["qa"] if q.get("category") in categories
            or (ADVERSARIAL in categories and is_adversarial(q))]


def token_counters(tokenizer):
    """(count(text), prompt_len(messages)): tokens of a text as the reference counts them
    (`tokenizer.encode`, memoised: every question re-counts the same turns), and of a chat
    prompt with its generation prompt."""
    memo: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in memo:
            memo[text] = len(tokenizer.encode(text))
        return memo[text]

    def prompt_len(messages) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True,
                                            add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return count, prompt_len


def ref_prompt(sample: dict, q: dict, index: int, counters, context_tokens: int,
               max_tokens: int, seed: int = REF_SEED) -> dict:
    """Everything the reference protocol sends for one question: messages, category-5
    options, whether the conversation was cut and the prompt's token count. The budget is
    the server's context less the chat template around the two messages; should the
    reference's estimate still overshoot, it shrinks by the excess (only ever when cut)."""
    count, prompt_len = counters
    text, options = ref_question(q, str(sample.get("sample_id")), index, seed)
    question_prompt = REF_QA_PROMPT.format(text)
    budget = context_tokens - prompt_len(ref_messages("", ""))
    for _ in range(8):
        context, cut = ref_context(sample["conversation"], question_prompt, count, budget,
                                   max_tokens)
        messages = ref_messages(context, question_prompt)
        n = prompt_len(messages)
        if n + max_tokens <= context_tokens or not cut:
            break
        budget -= n + max_tokens - context_tokens
    return {"messages": messages, "options": options, "truncated": cut, "prompt_tokens": n}


def run_reference_mode(client: Client, conversations, mode: str, tokenizer, progress, *,
                       categories, sampling: str, max_tokens: int, context_tokens: int,
                       seed: int = REF_SEED) -> list[dict]:
    """The reference's protocol, one sessionless request per question: the server starts it
    from a zero state and writes the whole prompt in one prefill (and the reply as it goes),
    as the reference resets the state and generates from the full prompt."""
    rows, counters = [], token_counters(tokenizer)
    for sample in conversations:
        for index, q in enumerate(ref_evaluated(sample, categories)):
            p = ref_prompt(sample, q, index, counters, context_tokens, max_tokens, seed)
            kw = ({**REF_SAMPLING, "seed": seed + index} if sampling == "reference" else {})
            raw = client.chat(p["messages"], max_tokens=max_tokens, **kw)
            pred = ref_canonicalize(raw, p["options"])
            rows.append({
                "mode": mode, "protocol": "reference", "sample": sample.get("sample_id"),
                "question_index": index, "question": q["question"],
                "category": q.get("category"), "adversarial": is_adversarial(q),
                "answer": q.get("answer"), "adversarial_answer": q.get("adversarial_answer"),
                "scored_answer": ref_scored_answer(q), "options": p["options"],
                "raw_prediction": raw, "prediction": pred, "score": ref_score(q, pred),
                "truncated": p["truncated"], "prompt_tokens": p["prompt_tokens"]})
            progress.update(1)
    return rows


def general_ability(client: Client) -> list[dict]:
    """Each general question, sessionless, with the reply and whether it holds the answer."""
    rows = []
    for q, a in GENERAL_SET:
        pred = client.chat([{"role": "user", "content": q}], max_tokens=24)
        rows.append({"question": q, "answer": a, "prediction": pred, "ok": contains(pred, a)})
    return rows


def answer_words(prediction: str) -> int:
    """An answer's length in words: how the release gate compares answer forms (a one-word
    reply against the backbone's sentence)."""
    return len(prediction.split())


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
                "words": sum(answer_words(r["prediction"]) for r in sel) / len(sel),
                "n": len(sel)}
        adversarial = [r for r in rs if r.get("adversarial")]
        rs = [r for r in rs if not r.get("adversarial")]  # category 5 stays apart
        cats = sorted({r["category"] for r in rs if r["category"] is not None})
        out[mode] = {
            "all": agg(rs),
            "outside_window": agg(r for r in rs if r["evidence_distance"] is not None
                                  and r["evidence_distance"] > window),
            "inside_window": agg(r for r in rs if r["evidence_distance"] is not None
                                 and r["evidence_distance"] <= window),
            "categories": {str(c): agg(r for r in rs if r["category"] == c) for c in cats},
            # category 5: the share of replies saying the conversation does not tell
            "adversarial": agg(adversarial),
        }
    return out


_NO_ROWS = {"f1": 0.0, "em": 0.0, "contains": 0.0, "words": 0.0, "n": 0}  # a mode with only category 5


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
             f"answer words | general ability ({len(GENERAL_SET)} q.) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        a, o = s["all"] or _NO_ROWS, s["outside_window"]
        g = general.get(mode.split("@")[0])
        lines.append(f"| {mode} | {a['f1']:.3f} | {a['em']:.3f} | {a['contains']:.3f} | "
                     f"{o['em'] if o else float('nan'):.3f} ({o['n'] if o else 0}) | {a['n']} | "
                     f"{a['words']:.1f} | {'' if g is None else f'{g:.3f}'} |")
    cats = sorted({c for s in summary.values() for c in s["categories"]})
    if cats:
        lines += ["", "| mode | " + " | ".join(
            f"F1 cat {c} ({(names or CATEGORY_NAMES).get(int(c), c)})" for c in cats) + " |",
            "|---|" + "---|" * len(cats)]
        for mode, s in summary.items():
            cells = [s["categories"].get(c) for c in cats]
            lines.append(f"| {mode} | " + " | ".join(
                "" if x is None else f"{x['f1']:.3f}" for x in cells) + " |")
    if any(s.get("adversarial") for s in summary.values()):
        lines += ["", "| mode | category 5 (adversarial, apart): says it cannot tell | n |",
                  "|---|---|---|"]
        for mode, s in summary.items():
            adv = s.get("adversarial")
            lines.append(f"| {mode} | {adv['f1']:.3f} | {adv['n']} |" if adv
                         else f"| {mode} | | 0 |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    f1 = [(summary[m]["all"] or _NO_ROWS)["f1"] for m in modes]
    em = [(summary[m]["all"] or _NO_ROWS)["em"] for m in modes]
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


def summarize_reference(rows: list[dict], skipped: int) -> dict:
    """Per mode: the headline (mean score over categories 1-4, the reference's F1 rules), each
    category, category 5 apart (asked: its score; else the count left out), prompts cut."""
    by_mode = defaultdict(list)
    for r in rows:
        by_mode[r["mode"]].append(r)
    out = {}
    for mode, rs in by_mode.items():
        def agg(sel):
            sel = list(sel)
            return {"f1": sum(r["score"] for r in sel) / len(sel), "n": len(sel)} if sel \
                else None
        main = [r for r in rs if not r["adversarial"]]
        adv = [r for r in rs if r["adversarial"]]
        cats = sorted({r["category"] for r in main})
        out[mode] = {
            "headline": agg(main),
            "categories": {str(c): agg(r for r in main if r["category"] == c) for c in cats},
            # category 5: the share of replies picking "No information available"
            "adversarial": {"asked": True, "score": agg(adv)["f1"], "n": len(adv)} if adv
            else {"asked": False, "n": skipped},
            "truncated": sum(r["truncated"] for r in rs),
        }
    return out


def reference_table(summary: dict, general: dict, settings: dict) -> str:
    cats = sorted({int(c) for s in summary.values() for c in s["categories"]})
    head = ["mode", "F1 cat 1-4 (headline)", "n"] + [
        f"F1 cat {c} ({CATEGORY_NAMES.get(c, c)})" for c in cats] + [
        "cat 5 (adversarial, apart)", "prompts cut", f"general ability ({len(GENERAL_SET)} q.)"]
    lines = [f"Reference LoCoMo protocol: sampling {settings['sampling']}, "
             f"{settings['max_tokens']} tokens, context {settings['context_tokens']}.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for mode, s in summary.items():
        h, adv = s["headline"], s["adversarial"]
        cells = [s["categories"].get(str(c)) for c in cats]
        g = general.get(mode)
        lines.append("| " + " | ".join(
            [mode, "" if h is None else f"{h['f1']:.4f}", str(0 if h is None else h["n"])]
            + ["" if x is None else f"{x['f1']:.4f} ({x['n']})" for x in cells]
            + [f"{adv['score']:.4f} ({adv['n']})" if adv["asked"]
               else f"not asked ({adv['n']})", str(s["truncated"]),
               "" if g is None else f"{g:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def reference_chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    cats = sorted({c for s in summary.values() for c in s["categories"]}, key=int)
    groups = ["1-4"] + cats
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        s = summary[m]
        vals = [(s["headline"] or {"f1": 0})["f1"]] + [
            (s["categories"].get(c) or {"f1": 0})["f1"] for c in cats]
        ax.bar([i + (j - (len(modes) - 1) / 2) * w for i in range(len(groups))], vals, w,
               label=m)
    ax.set_xticks(range(len(groups)), [f"cat {g}" for g in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (reference rules)")
    ax.legend()
    ax.set_title("δ-mem on LoCoMo, the reference's protocol")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SERVED_MODES = "backbone@W,deltamem@W,deltamem@0,backbone@full,deltamem@full"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="LoCoMo-format JSON (default: generate the held-out split)")
    p.add_argument("--conversations", type=int, default=20,
                   help="generated conversations when --data is not given (default 20)")
    p.add_argument("--generated", choices=("facts", "dialogues"), default="facts",
                   help="without --data, the generator whose held-out split is evaluated: "
                        "facts (fact-recall chats, deltamem.data) or dialogues (real-style "
                        "conversations, deltamem.dialogues); default facts")
    p.add_argument("--seed", type=int, default=1234, help="held-out generator seed")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many "
                   "conversations")
    p.add_argument("--server", default="http://127.0.0.1:8000",
                   help="URL of a δ-mem server (modes deltamem@*)")
    p.add_argument("--baseline-server", default=None,
                   help="URL of a --no-memory server (modes backbone@*)")
    p.add_argument("--api-key", default=None, help="API key for both servers")
    p.add_argument("--window", type=int, default=256, help="window W in tokens (default 256)")
    p.add_argument("--protocol", choices=("served", "reference"), default="served",
                   help="served: sessions through the API, the modes below (default); "
                        "reference: the δ-mem reference's LoCoMo protocol, one sessionless "
                        "request per question with the whole conversation in its prompt")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated modes to run (served default: {SERVED_MODES}; "
                        "reference: deltamem and backbone, default deltamem plus backbone "
                        "when --baseline-server is given)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"answer length limit (default 24; reference {REF_MAX_TOKENS})")
    p.add_argument("--sampling", choices=("reference", "greedy"), default="reference",
                   help="reference protocol: temperature 0.4, top-p 0.9, top-k 10 with a seed "
                        "per question (default), or greedy")
    p.add_argument("--sample-seed", type=int, default=REF_SEED,
                   help=f"reference protocol: question i of a sample is sampled with seed "
                        f"SEED + i (default {REF_SEED}, the reference's); it also orders "
                        "category 5's options")
    p.add_argument("--categories", default=None,
                   help="comma-separated categories to ask (served default: all; reference "
                        "default 1,2,3,4 with category 5 counted and left out; add 5 to ask "
                        "it as the reference would, reported apart)")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="reference protocol: the servers' context length, the budget the "
                        "conversation is cut to (default: what /v1/models says, else 8192, "
                        "the server's default --max-model-len)")
    p.add_argument("--model", default=None, help="backbone folder for token counting "
                   "(default: the fetched default model)")
    p.add_argument("--out", type=Path, default=Path("results/eval"),
                   help="output folder: results.json, table.md, chart.png")
    p.add_argument("--no-general", action="store_true", help="skip the general-ability set")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt of every evaluated session (default: the one the "
                        "adapters are trained with, deltamem.data.SYSTEM_PROMPT; '' for the "
                        "model's own)")


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    from .model_fetch import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def run(args) -> int:
    from tqdm import tqdm

    tok = load_tokenizer(args.model)
    convs = load_conversations(args.data, args.conversations, args.seed,
                               args.generated)[:args.limit]
    reference = args.protocol == "reference"
    if args.modes is None:
        args.modes = ("deltamem,backbone" if args.baseline_server else "deltamem") \
            if reference else SERVED_MODES
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    kinds = {m.split("@")[0] for m in modes}
    if reference and not set(modes) <= {"deltamem", "backbone"}:
        print("error: the reference protocol's modes are deltamem and backbone",
              file=sys.stderr)
        return 2
    clients = {"deltamem": Client(args.server, args.api_key)}
    if "backbone" in kinds:
        if not args.baseline_server:
            print("error: backbone modes need --baseline-server (a `deltamem serve "
                  "--no-memory` URL)", file=sys.stderr)
            return 2
        clients["backbone"] = Client(args.baseline_server, args.api_key)
    if args.max_tokens is None:
        args.max_tokens = REF_MAX_TOKENS if reference else 24
    if args.categories is not None:
        categories = {int(c) for c in args.categories.split(",") if c.strip()}
    else:
        categories = set(REF_CATEGORIES) if reference else None
    if categories is not None:  # category 5 left out is still counted
        convs = [{**c, "qa": ref_evaluated(c, categories),
                  "qa_left_out": sum(is_adversarial(q) and ADVERSARIAL not in categories
                                     for q in c["qa"])} for c in convs]
    n_q = sum(len(c["qa"]) for c in convs)
    t0 = time.time()
    results = []
    if reference:
        context = args.context_tokens or min(
            (c.max_model_len for c in clients.values() if c.max_model_len), default=8192)
        with tqdm(total=n_q * len(modes), desc="eval (reference)", unit="q") as bar:
            for mode in modes:
                results += run_reference_mode(
                    clients[mode], convs, mode, tok, bar, categories=categories,
                    sampling=args.sampling, max_tokens=args.max_tokens,
                    context_tokens=context, seed=args.sample_seed)
    else:
        windows = {"W": args.window, "0": 0, "full": -1}
        if args.system_prompt is None:
            from .data import SYSTEM_PROMPT

            args.system_prompt = SYSTEM_PROMPT
        with tqdm(total=n_q * len(modes), desc="eval", unit="q") as bar:
            for mode in modes:
                kind, w = mode.split("@")
                results += run_mode(clients[kind], convs, mode, windows[w], args.max_tokens,
                                    tok, bar, args.system_prompt or None)
    general_rows = {} if args.no_general else {k: general_ability(c)
                                               for k, c in clients.items()}
    general = {k: sum(r["ok"] for r in rows) / len(rows) for k, rows in general_rows.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"protocol": args.protocol, "conversations": len(convs), "questions": n_q,
           "seconds": time.time() - t0}
    if reference:
        left_out = sum(c.get("qa_left_out", 0) for c in convs)
        settings = {"sampling": args.sampling, "max_tokens": args.max_tokens,
                    "context_tokens": context, "sample_seed": args.sample_seed,
                    "categories": sorted(categories)}
        summary = summarize_reference(results, left_out)
        table = reference_table(summary, general, settings)
        doc |= {"settings": settings, "category_5_left_out": left_out}
    else:
        summary = summarize(results, args.window)
        table = markdown_table(summary, general, args.window, category_names(convs))
        doc |= {"window": args.window}
    doc |= {"summary": summary, "general_ability": general, "general_answers": general_rows,
            "results": results}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    (args.out / "table.md").write_text(table)
    if reference and any(s["truncated"] for s in summary.values()):
        print(f"warning: conversations were cut to fit a context of {context} tokens, so "
              "these numbers are not the reference's (give servers with a longer "
              "--max-model-len and --context-tokens)", file=sys.stderr)
    (reference_chart if reference else bar_chart)(summary, args.out / "chart.png")
    print(table)
    print(f"wrote {args.out}/results.json, table.md, chart.png")
    return 0
