"""The evaluator: scoring, and a tiny LoCoMo-format file through a live server."""

from __future__ import annotations

import argparse
import json

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
