"""The evaluator: scoring, and a tiny LoCoMo-format file through a live server; the reference's
LoCoMo protocol (scorer, prompt, a file with category-5 items) through a mocked API."""

from __future__ import annotations

import argparse
import functools
import json

import httpx
import pytest
from live import InThreadServer
from test_api import settings_for

from deltamem import evaluate
from deltamem.data import Difficulty, write_locomo_json


def test_locomo_style_scores():
    assert evaluate.normalize("The  Cat, sat!") == "cat sat"
    assert evaluate.exact_match("Lisbon.", "lisbon") == 1.0
    assert evaluate.exact_match("It is Lisbon", "Lisbon") == 0.0
    assert evaluate.token_f1("It is Lisbon", "Lisbon") == pytest.approx(0.5)
    assert evaluate.token_f1("Porto", "Lisbon") == 0.0
    assert evaluate.contains("the answer is seven days", "seven|7") == 1.0
    assert evaluate.contains("sevenfold", "seven|7") == 0.0


def test_evaluator_on_a_tiny_file_through_a_live_server(engine_host, redis_server, tmp_path):
    data = write_locomo_json(tmp_path / "tiny.json", 2, diff=Difficulty(
        n_facts=(2, 2), n_chatter=(1, 2), n_sessions=2))
    samples = json.loads(data.read_text())
    assert all({"conversation", "qa"} <= set(s) for s in samples)
    assert "session_2_date_time" in samples[0]["conversation"]
    srv = InThreadServer(engine_host, settings_for(engine_host, tmp_path / "srv"))
    try:
        p = argparse.ArgumentParser()
        evaluate.configure_parser(p)
        out = tmp_path / "eval"
        args = p.parse_args(["--data", str(data), "--server", srv.url, "--modes",
                             "deltamem@W,deltamem@0,deltamem@full", "--window", "48",
                             "--max-tokens", "8", "--out", str(out)])
        assert evaluate.run(args) == 0
    finally:
        srv.stop()
    doc = json.loads((out / "results.json").read_text())
    n_q = sum(len(s["qa"]) for s in samples)
    assert doc["questions"] == n_q and len(doc["results"]) == 3 * n_q
    for mode in ("deltamem@W", "deltamem@0", "deltamem@full"):
        s = doc["summary"][mode]["all"]
        assert s["n"] == n_q and 0.0 <= s["f1"] <= 1.0 and 0.0 <= s["em"] <= 1.0
    rows = doc["general_answers"]["deltamem"]
    assert len(rows) == len(evaluate.GENERAL_SET)
    assert doc["general_ability"]["deltamem"] == sum(r["ok"] for r in rows) / len(rows)
    assert all(r["evidence_distance"] and r["evidence_distance"] > 0 for r in doc["results"])
    assert (out / "table.md").read_text().startswith("| mode |")
    assert (out / "chart.png").stat().st_size > 1000


# --- the reference's LoCoMo protocol ------------------------------------------------------------


def test_porter_stem_as_nltk():
    # Outputs of NLTK's PorterStemmer().stem (the reference's stemmer; checked against nltk
    # 3.10 on 30,928 words when this was written).
    cases = {"running": "run", "runs": "run", "run": "run", "flies": "fli", "dies": "die",
             "happily": "happili", "relational": "relat", "conditional": "condit",
             "agreed": "agre", "hopping": "hop", "hoping": "hope", "skies": "sky",
             "lying": "lie", "libraries": "librari", "library": "librari", "paris": "pari",
             "is": "is", "caresses": "caress", "ponies": "poni", "generously": "gener",
             "geology": "geolog", "Painting": "paint"}
    assert {w: evaluate.porter_stem(w) for w in cases} == cases


def test_reference_scorer_by_hand():
    ev = evaluate
    # normalise: commas and punctuation out, lower case, a/an/the/and out
    assert ev.ref_normalize("The cat, and a DOG!") == "cat dog"
    # stemming: "running" and "runs" both stem to "run", so one token each, F1 1; the
    # served protocol's unstemmed F1 gives 0
    assert ev.ref_score({"category": 4, "answer": "running"}, "runs") == 1.0
    assert ev.token_f1("runs", "running") == 0.0
    # multiset F1: prediction "the cat sat on the mat" -> cat sat on mat (4 tokens), answer
    # "a cat on a mat" -> cat on mat (3); 3 shared: P 3/4, R 1, F1 = 2·(3/4)/(7/4) = 6/7
    assert ev.ref_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert ev.ref_f1("", "cat") == 0.0
    # category 1, answer "Paris, Rome": two parts, [pari] and [rome]. The prediction has no
    # comma: one part "I went to Rome and Paris" -> i went to rome pari (5 tokens). Each
    # answer part is found: P 1/5, R 1, F1 = 2·(1/5)/(6/5) = 1/3; the mean is 1/3.
    q1 = {"category": 1, "answer": "Paris, Rome"}
    assert ev.ref_score(q1, "I went to Rome and Paris") == pytest.approx(1 / 3)
    # split the same way, each answer part meets its own prediction part: (1 + 1)/2
    assert ev.ref_score(q1, "Rome, Paris") == 1.0
    # one part only: Paris 0, Rome 1 -> 1/2
    assert ev.ref_score(q1, "Rome") == 0.5
    # category 3: only the answer before ';' is scored: "blue"
    q3 = {"category": 3, "answer": "blue; the sky"}
    assert ev.ref_scored_answer(q3) == "blue"
    assert ev.ref_score(q3, "blue") == 1.0
    assert ev.ref_score(q3, "the sky") == 0.0
    # "blue sky" vs "blue": P 1/2, R 1 -> 2/3
    assert ev.ref_score(q3, "blue sky") == pytest.approx(2 / 3)
    # category 2: "7 May, 2023" and "7 May 2023" are the same tokens
    assert ev.ref_score({"category": 2, "answer": "7 May 2023"}, "7 May, 2023") == 1.0
    # category 5: no answer; 1 when the reply says the conversation does not tell
    q5 = {"category": 5, "adversarial_answer": "a red bike"}
    assert ev.ref_scored_answer(q5) is None
    assert ev.ref_score(q5, "Not mentioned in the conversation") == 1.0
    assert ev.ref_score(q5, "a red bike") == 0.0


def test_reference_reply_canonicalisation():
    ev = evaluate
    assert ev.ref_canonicalize("\n Answer: Lisbon\nbecause she said so") == "lisbon"
    options = {"a": "a red bike", "b": ev.REF_NO_INFO}
    assert ev.ref_canonicalize("(b) No information available", options) == ev.REF_NO_INFO
    assert ev.ref_canonicalize("A", options) == "a red bike"
    assert ev.ref_canonicalize("It is not mentioned.", options) == ev.REF_NO_INFO


def small_sample() -> dict:
    return {
        "sample_id": "hand-1",
        "conversation": {
            "speaker_a": "Alice", "speaker_b": "Bob",
            "session_1_date_time": "1:00 pm on 1 May, 2023",
            "session_1": [
                {"speaker": "Alice", "dia_id": "D1:1", "text": "I moved to Lisbon."},
                {"speaker": "Bob", "dia_id": "D1:2", "text": "Nice!"}],
            "session_2_date_time": "2:00 pm on 8 May, 2023",
            "session_2": [
                {"speaker": "Alice", "dia_id": "D2:1", "text": "I adopted a cat.",
                 "blip_caption": "a cat on a sofa"}],
        },
        "qa": [
            {"question": "When did Alice move to Lisbon?", "answer": "1 May 2023",
             "evidence": ["D1:1"], "category": 2},
            {"question": "Where does Alice live, and with whom?", "answer": "Lisbon, a cat",
             "evidence": ["D1:1", "D2:1"], "category": 1},
            {"question": "What bike did Bob buy?", "adversarial_answer": "a red bike",
             "evidence": [], "category": 5},
            {"question": "What pet might Alice like?", "answer": "cats; she adopted one",
             "evidence": ["D2:1"], "category": 3},
        ],
    }


# The reference's rendering of small_sample's category-2 question, written out by hand:
# the opening line (with LoCoMo's "wriiten"), the sessions latest first, each under
# "\nDATE: ...\nCONVERSATION:\n", each turn `X said, "..."` and a blank line (an image's
# caption as " and shared ...."), then a blank line, the QA instruction and the question
# with the date hint.
EXPECTED_USER = (
    "Below is a conversation between two people: Alice and Bob. The conversation takes "
    "place over multiple days and the date of each conversation is wriiten at the beginning "
    "of the conversation.\n\n"
    "\nDATE: 2:00 pm on 8 May, 2023\nCONVERSATION:\n"
    'Alice said, "I adopted a cat."\n and shared a cat on a sofa.\n'
    "\nDATE: 1:00 pm on 1 May, 2023\nCONVERSATION:\n"
    'Alice said, "I moved to Lisbon."\n\n'
    'Bob said, "Nice!"\n\n'
    "\n\n"
    "Based on the above conversations, write a short answer for the following question in "
    "a few words. Do not write complete and lengthy sentences. Answer with exact words from "
    "the conversations whenever possible.\n\n"
    "Question: When did Alice move to Lisbon? Use DATE of CONVERSATION to answer with an "
    "approximate date.")
EXPECTED_SYSTEM = (
    "You are a helpful, respectful and honest assistant whose job is to understand the "
    "following conversation and answer questions based on the conversation. If you don't "
    "know the answer to a question, please don't share false information.")


def test_reference_prompt_renders_exactly():
    from chatml_tokenizer import chatml_tokenizer

    sample = small_sample()
    counters = evaluate.token_counters(chatml_tokenizer(None))
    p = evaluate.ref_prompt(sample, sample["qa"][0], 0, counters, 8192, 50)
    assert p["messages"] == [{"role": "system", "content": EXPECTED_SYSTEM},
                             {"role": "user", "content": EXPECTED_USER}]
    assert not p["truncated"] and p["options"] is None
    # byte-level tokenizer: the two messages' bytes, plus the ChatML framing: 3 <|im_start|>
    # and 2 <|im_end|> (one token each) and the bytes of "system\n", "\n", "user\n", "\n",
    # "assistant\n" (7 + 1 + 5 + 1 + 10 = 24)
    assert p["prompt_tokens"] == (len(EXPECTED_SYSTEM.encode()) + len(EXPECTED_USER.encode())
                                  + 5 + 24)
    # category 5: a choice between the trap and "No information available", the order from
    # sha256("42|hand-1|2|cat5")
    text, options = evaluate.ref_question(sample["qa"][2], "hand-1", 2)
    assert sorted(options.values()) == sorted(["a red bike", "No information available"])
    assert text == (f"What bike did Bob buy? (a) {options['a']} (b) {options['b']}. "
                    "Select the correct answer by writing (a) or (b).")
    assert evaluate.ref_question(sample["qa"][1], "hand-1", 1) == (
        "Where does Alice live, and with whom?", None)


def test_reference_context_cut_where_the_estimate_overflows():
    conv = small_sample()["conversation"]
    qp = "Q"
    # count = characters. Fixed part: the opening line + "Q". Session 1 (walked first, its
    # turns last to first) fits; session 2's one turn under its DATE header does not when the
    # budget (context − reserve) equals exactly fixed + session 1's turns + that header and
    # turn: the reference's test is a strict "<".
    start = evaluate.REF_CONV_START.format("Alice", "Bob")
    s1 = ['Alice said, "I moved to Lisbon."\n\n', 'Bob said, "Nice!"\n\n']
    s2 = 'Alice said, "I adopted a cat."\n and shared a cat on a sofa.\n'
    need = len(start) + len(qp) + sum(map(len, s1)) + len(
        "DATE: 2:00 pm on 8 May, 2023\nCONVERSATION:\n" + s2)
    text, cut = evaluate.ref_context(conv, qp, len, need + 50, 50)
    assert cut
    assert text == (start + "\nDATE: 2:00 pm on 8 May, 2023\nCONVERSATION:\n"
                    + "\nDATE: 1:00 pm on 1 May, 2023\nCONVERSATION:\n" + "".join(s1))
    text, cut = evaluate.ref_context(conv, qp, len, need + 51, 50)
    assert not cut and s2 in text


class MockAPI:
    """/v1/models, sessionless and session chat, fork and delete; records the chat bodies."""

    def __init__(self):
        self.bodies = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "mock"}]})
        if request.url.path.endswith("/fork") or request.method == "DELETE":
            return httpx.Response(200, json={})
        body = json.loads(request.content)
        self.bodies.append(body)
        text = body["messages"][-1]["content"]
        if "(a)" in text:  # category 5: pick "No information available"
            reply = "(a)" if "(a) No information" in text else "(b)"
        elif "Lisbon?" in text:
            reply = "1 May 2023\nmore words"
        elif "with whom" in text:
            reply = "Lisbon, a cat"
        else:
            reply = "cats"
        return httpx.Response(200, json={"choices": [{"message": {"content": reply}}]})


def run_mocked(monkeypatch, tmp_path, extra: list[str]) -> tuple[dict, MockAPI]:
    from chatml_tokenizer import chatml_tokenizer

    api = MockAPI()
    monkeypatch.setattr(evaluate, "Client", functools.partial(
        evaluate.Client, transport=httpx.MockTransport(api)))
    monkeypatch.setattr(evaluate, "load_tokenizer", lambda model: chatml_tokenizer(None))
    data = tmp_path / "locomo.json"
    data.write_text(json.dumps([small_sample()]))
    p = argparse.ArgumentParser()
    evaluate.configure_parser(p)
    out = tmp_path / "out"
    assert evaluate.run(p.parse_args(["--data", str(data), "--server", "http://mock",
                                      "--no-general", "--out", str(out), *extra])) == 0
    assert (out / "table.md").exists() and (out / "chart.png").stat().st_size > 1000
    return json.loads((out / "results.json").read_text()), api


def test_reference_protocol_on_a_file_with_category_5(monkeypatch, tmp_path):
    # default: categories 1-4 asked; the category-5 item (no `answer`) loads, is counted and
    # left out, reported apart
    doc, api = run_mocked(monkeypatch, tmp_path, ["--protocol", "reference"])
    assert len(api.bodies) == 3
    for i, body in enumerate(api.bodies):  # sessionless, the reference's sampling, seed 42+i
        assert "session_id" not in body and "memory_window_tokens" not in body
        assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"],
                body["seed"]) == (0.4, 0.9, 10, 50, 42 + i)
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert api.bodies[0]["messages"][1]["content"] == EXPECTED_USER
    s = doc["summary"]["deltamem"]
    # scores: cat 2 first line "1 May 2023" = 1; cat 1 "Lisbon, a cat" = 1; cat 3 "cats"
    # vs "cats" (before ';') = 1
    assert s["headline"] == {"f1": 1.0, "n": 3}
    assert s["adversarial"] == {"asked": False, "n": 1} and doc["category_5_left_out"] == 1
    assert set(s["categories"]) == {"1", "2", "3"} and s["truncated"] == 0

    # asked too (greedy): in the reference's (a)/(b) form, scored by its rule, kept apart
    doc, api = run_mocked(monkeypatch, tmp_path, [
        "--protocol", "reference", "--categories", "1,2,3,4,5", "--sampling", "greedy"])
    assert len(api.bodies) == 4
    assert all(b["temperature"] == 0 and "top_k" not in b for b in api.bodies)
    s = doc["summary"]["deltamem"]
    assert s["headline"]["n"] == 3
    assert s["adversarial"] == {"asked": True, "score": 1.0, "n": 1}
    adv = [r for r in doc["results"] if r["adversarial"]]
    assert adv[0]["prediction"] == "No information available" and adv[0]["answer"] is None


def test_served_protocol_reports_category_5_apart(monkeypatch, tmp_path):
    doc, api = run_mocked(monkeypatch, tmp_path, ["--modes", "deltamem@W"])
    s = doc["summary"]["deltamem@W"]
    assert s["all"]["n"] == 3 and s["adversarial"]["n"] == 1
    assert "5" not in s["categories"]
    assert all(b["temperature"] == 0 for b in api.bodies)


# --- the release gate ---------------------------------------------------------------------------


def _results(rows: dict[str, list[tuple[float, str]]], general: dict | None = None) -> dict:
    """A served-protocol results.json: per mode, (f1, prediction) for questions q0, q1, ..."""
    return {"protocol": "served", "general_ability": general or {}, "results": [
        {"mode": mode, "sample": "s", "question": f"q{i}", "f1": f1, "prediction": pred,
         "adversarial": False} for mode, rs in rows.items() for i, (f1, pred) in enumerate(rs)]
        + [{"mode": "deltamem@W", "sample": "s", "question": "trap", "f1": 0.0,
            "prediction": "a very long answer that the gate must not count", "adversarial": True}]}


def test_gate_measures_and_decides(tmp_path):
    from deltamem import gate

    base = [(0.5, "It is in Lisbon."), (0.2, "She is a nurse now.")]
    real = {"good": _results({"backbone@W": base,
                              "deltamem@W": [(0.6, "Lisbon, I think."), (0.3, "A nurse.")]},
                             {"backbone": 0.8, "deltamem": 0.78}),
            "terse": _results({"backbone@W": base, "deltamem@W": [(0.9, "Lisbon"), (0.9, "x")]},
                              {"backbone": 0.8, "deltamem": 0.8})}
    recall = _results({"backbone@W": [(0.1, "a"), (0.1, "b")],
                       "deltamem@W": [(0.3, "a"), (0.2, "b")]})
    m = gate.measures(real["good"], recall)
    # worked out by hand: F1 0.45 vs 0.35; words (3 + 2) / 2 vs (4 + 5) / 2; recall 0.25/0.1
    assert m["real_f1_ratio"] == pytest.approx(0.45 / 0.35)
    assert m["answer_length_ratio"] == pytest.approx(2.5 / 4.5)
    assert m["recall_f1_ratio"] == pytest.approx(2.5)
    assert m["general_ratio"] == pytest.approx(0.78 / 0.8)
    assert gate.verdict(m)["passes"] and gate.verdict(m)["goals"]["real_f1_ratio"]
    # one word where the backbone says a sentence: better F1, but not the backbone's form
    t = gate.measures(real["terse"], recall)
    assert t["answer_length_ratio"] == pytest.approx(1 / 4.5)
    assert gate.verdict(t)["targets"]["answer_length_ratio"] is False
    assert gate.choose({"good": m, "terse": t}) == "good"

    paths = {}
    for name, doc in [*real.items(), ("recall", recall)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    card = tmp_path / "TRAINING_CARD.md"
    card.write_text("# Card\n\n## Results\n\nsome numbers\n\n# Base\n\n## Recipe\n")
    args = ["gate", "--candidate", "good", str(paths["good"]), str(paths["recall"]),
            "--candidate", "terse", str(paths["terse"]), str(paths["recall"]),
            "--card", str(card), "--out", str(tmp_path / "gate.json")]
    from deltamem import cli

    assert cli.main(args) == 0
    assert cli.main(args) == 0  # a second verdict replaces the first in the card
    text = card.read_text()
    assert text.count("## Release gate") == 1 and "## Results\n\nsome numbers" in text
    # in the card's own part, before its base's
    assert text.index("## Release gate") < text.index("# Base\n") < text.index("## Recipe")
    assert "**good**" in text and "every must" in text
    assert json.loads((tmp_path / "gate.json").read_text())["chosen"] == "good"


def test_gate_without_a_passing_candidate_ships_the_closest_and_says_so(tmp_path, capsys):
    from deltamem import cli, gate

    base = [(0.4, "It was Lisbon."), (0.4, "She works as a nurse.")]
    worse = _results({"backbone@W": base, "deltamem@W": [(0.2, "Porto, I think."),
                                                         (0.2, "She is a chef.")]},
                     {"backbone": 0.8, "deltamem": 0.8})
    even = _results({"backbone@W": base, "deltamem@W": base}, {"backbone": 0.8, "deltamem": 0.8})
    # no fact-recall results: that target is not measured, so no candidate passes
    ms = {"worse": gate.measures(worse), "even": gate.measures(even)}
    assert gate.verdict(ms["even"])["targets"]["recall_f1_ratio"] is None
    assert gate.choose(ms) == "even"
    for name, doc in (("worse", worse), ("even", even)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    assert cli.main(["gate", "--candidate", "worse", str(tmp_path / "worse.json"),
                     "--candidate", "even", str(tmp_path / "even.json")]) == 1
    out = capsys.readouterr().out
    assert "ships: even (misses a must)" in out and "not measured" in out


def test_gate_refuses_results_it_cannot_judge(tmp_path, capsys):
    from deltamem import cli

    only_mem = _results({"deltamem@W": [(0.5, "Lisbon")]}, {"deltamem": 0.8})
    (tmp_path / "m.json").write_text(json.dumps(only_mem))
    assert cli.main(["gate", "--candidate", "c", str(tmp_path / "m.json")]) == 2
    assert "backbone@W" in capsys.readouterr().err
    # the backbone's rows and general ability from the same session's other results
    base = _results({"backbone@W": [(0.25, "It is Lisbon")]}, {"backbone": 0.8})
    (tmp_path / "b.json").write_text(json.dumps(base))
    assert cli.main(["gate", "--candidate", "c", str(tmp_path / "m.json"),
                     "--baseline", str(tmp_path / "b.json")]) == 1  # recall not measured
    assert "2.00× met" in capsys.readouterr().out  # F1 0.5 / 0.25
    ref = {"protocol": "reference", "results": []}
    (tmp_path / "r.json").write_text(json.dumps(ref))
    assert cli.main(["gate", "--candidate", "c", str(tmp_path / "r.json")]) == 2
    assert "served-protocol" in capsys.readouterr().err
