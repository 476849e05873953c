"""`benchmarks/peers.py`'s row bookkeeping: a row past its wall-clock limit is recorded as not
finished, every row records when and on which commit it was measured, and `--merge` adds new
rows to an earlier result without losing the measured ones."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("qc_bench_peers", ROOT / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = peers
_spec.loader.exec_module(peers)


def test_row_past_its_limit_is_recorded_as_not_finished():
    def slow():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return {"perplexity": 1.0}

    row = peers.attempt("slow peer", "hqq", slow, limit=0.2, commit="abc")
    assert row["not_finished"] is True
    assert row["error"].startswith("not finished") and "0.2" in row["error"]
    assert row["seconds"] < 4
    assert row["measured"]["commit"] == "abc"


def test_row_within_its_limit_keeps_its_result_and_measured():
    row = peers.attempt("fast peer", "hqq", lambda: {"perplexity": 2.0, "effective_bits": 4.0}, limit=30, commit="def")
    assert row["perplexity"] == 2.0 and "error" not in row
    assert row["family"] == "hqq" and row["measured"]["commit"] == "def" and row["measured"]["date"]


def test_our_rows_have_no_limit():
    class Args:
        row_limit = 60

    assert peers.row_limit(Args, "ours") is None
    assert peers.row_limit(Args, "autoround") == 60


def _run(rows: dict, date: str, commit: str) -> dict:
    return {"command": f"peers.py {date}", "date": date, "complete": False, "options": {"windows": 2, "families": ["x"]},
            "git_at_start": {"commit": commit}, "packages": {"nncf": "1"},
            "models": {peers.LM: {"rows": {"float32": {"family": "float", "perplexity": 10.0, "effective_bits": 32.0}, **rows}}}}


def test_merge_adds_rows_and_keeps_measured_ones(tmp_path):
    old = tmp_path / "old.json"
    new = tmp_path / "new.json"
    old.write_text(json.dumps(_run({"hqq 4-bit g128": {"family": "hqq", "perplexity": 12.0, "effective_bits": 4.5},
                                    "ort GPTQ g32": {"family": "ort", "error": "Boom"}}, "2026-01-01 00:00:00", "aaa")))
    new.write_text(json.dumps(_run({"hqq 4-bit g128": {"family": "hqq", "error": "not finished: ran past", "not_finished": True},
                                    "ort GPTQ g32": {"family": "ort", "perplexity": 11.0, "effective_bits": 5.1,
                                                     "measured": {"date": "2026-02-02 10:00:00", "commit": "bbb", "command": "c"}}},
                                   "2026-02-02 09:00:00", "bbb")))
    out = tmp_path / "merged.json"
    peers.merge([old, new], out)
    body = json.loads(out.read_text())
    rows = body["models"][peers.LM]["rows"]
    assert rows["hqq 4-bit g128"]["perplexity"] == 12.0  # an unfinished rerun does not replace a measured row
    assert rows["hqq 4-bit g128"]["measured"]["commit"] == "aaa"
    assert rows["ort GPTQ g32"]["perplexity"] == 11.0 and rows["ort GPTQ g32"]["ratio_to_float"] == 1.1
    assert rows["ort GPTQ g32"]["measured"]["date"] == "2026-02-02 10:00:00"
    assert [e["commit"] for e in body["merged_from"]] == ["aaa", "bbb"]
    assert not any(u.startswith("hqq 4-bit g128") or u.startswith("ort GPTQ g32") for u in body["unfinished"])
    assert any(u.startswith("hqq 3-bit g64: not measured") for u in body["unfinished"])

    again = tmp_path / "again.json"  # merging the merged file again keeps the run history
    peers.merge([out, new], again)
    assert [e["commit"] for e in json.loads(again.read_text())["merged_from"]] == ["aaa", "bbb", "bbb"]


def test_rows_selects_exact_labels_and_match_a_substring():
    class Args:
        match, rows = "", "ours mixed 4;hqq 4-bit g128"

    assert peers.selected(Args, "ours mixed 4") and peers.selected(Args, "hqq 4-bit g128")
    assert not peers.selected(Args, "ours mixed 4.25")
    Args.match, Args.rows = "g128", ""
    assert peers.selected(Args, "hqq 4-bit g128") and not peers.selected(Args, "hqq 3-bit g64")


def test_calibration_reader_iterates_and_reads():
    feeds = [{"input_ids": 1}, {"input_ids": 2}]
    reader = peers.common.ListReader(feeds)
    assert list(reader) == feeds  # ONNX Runtime's GPTQ iterates the reader
    assert [reader.get_next(), reader.get_next(), reader.get_next()] == [feeds[0], feeds[1], None]


def test_not_finished_row_says_where_it_was():
    def spin():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pass
        return {}

    row = peers.attempt("slow peer", "hqq", spin, limit=0.2)
    assert "in attempt" in row["error"]  # the innermost frame of the benchmark's own code
    assert "tests/test_bench_peers_rows.py" in row["error"].split("inside ")[1]  # and the innermost of all


def test_our_rows_with_options_are_labelled_compiled_and_found_apart_from_the_presets(tmp_path):
    assert peers.ours_mixed(4.25) == ("ours mixed 4.25", "mixed-4.25", "mixed{avg-bits=4.25}")
    label, folder, pipeline = peers.ours_mixed(3.0, "rounding=gptq group-size=64")
    assert (label, folder, pipeline) == ("ours mixed 3 rounding=gptq group-size=64", "mixed-3-rounding-gptq-group-size-64",
                                         "mixed{avg-bits=3 rounding=gptq group-size=64}")
    for name in ("mixed-3", folder):
        (tmp_path / "m" / name).mkdir(parents=True)
        (tmp_path / "m" / name / "model.onnx").write_bytes(b"x")
    assert peers.artifact_of(tmp_path, "m", label, {}) == tmp_path / "m" / folder / "model.onnx"
    assert peers.artifact_of(tmp_path, "m", "ours mixed 3", {}) == tmp_path / "m" / "mixed-3" / "model.onnx"
