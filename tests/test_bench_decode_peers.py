"""`benchmarks/decode.py`'s peer rows without the peers: an absent package is a skipped row with one
line, and a peer's perplexity follows `qcompiler eval`'s cached protocol (a prefill of half the
window, then one token per step) on the same windows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


decode_peers = _load("qc_bench_decode_peers", "decode_peers.py")
decode = _load("qc_bench_decode", "decode.py")


def test_absent_peer_package_is_skipped_with_one_line(monkeypatch):
    monkeypatch.setattr(decode_peers.importlib.util, "find_spec", lambda name: None)
    present, lines = decode_peers.available(["genai", "llamacpp"])
    assert present == []
    assert len(lines) == 2
    assert "onnxruntime-genai" in lines[0] and "not installed" in lines[0]
    assert "llama-cpp-python" in lines[1] and "\n" not in lines[1]


def test_unknown_peer_family_is_refused():
    with pytest.raises(SystemExit, match="unknown peer families"):
        decode_peers.available(["vllm"])


class RecordingSession:
    """Uniform logits over `vocab` tokens except `boost` on the true next token; records step sizes."""

    def __init__(self, row: np.ndarray, vocab: int, boost: float):
        self.row, self.vocab, self.boost = row, vocab, boost
        self.steps: list[int] = []
        self.seen = 0

    def reset(self, capacity: int = 0) -> None:
        self.seen = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        self.steps.append(len(ids))
        logits = np.zeros((len(ids), self.vocab), np.float32)
        for i in range(len(ids)):
            position = self.seen + i
            if position + 1 < len(self.row):
                logits[i, self.row[position + 1]] = self.boost
        self.seen += len(ids)
        return logits


def test_peer_perplexity_runs_the_cached_protocol_on_the_eval_windows(monkeypatch):
    from qcompiler.models import smollm2

    rows = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]], np.int64)
    monkeypatch.setattr(smollm2, "windows", lambda text, window: rows[:, :window])
    session = RecordingSession(rows[0], vocab=10, boost=0.0)
    assert decode.peer_perplexity(session, "text", 1, 8) == pytest.approx(10.0)  # uniform over 10 tokens
    assert session.steps == [4, 1, 1, 1, 1]  # half the window, then one token per step

    sharp = RecordingSession(rows[0], vocab=10, boost=np.log(91.0))  # p(next) = 91 / 100
    assert decode.peer_perplexity(sharp, "text", 1, 8) == pytest.approx(100 / 91, rel=1e-4)


def test_ours_in_genai_links_the_artifact_and_sets_threads(tmp_path):
    """`--in-genai`: our artifact's files linked into a folder ONNX Runtime GenAI loads, its
    genai_config.json setting the run's threads; a recompiled artifact's files replace the links."""
    import json

    artifact = tmp_path / "int4"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"first")
    (artifact / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"session_options": {"log_id": "x"}}}}))
    out = tmp_path / "int4-in-genai"
    facts = decode_peers.ours_in_genai(artifact, out, threads=2)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"] == {"log_id": "x", "intra_op_num_threads": 2, "inter_op_num_threads": 1}
    assert (out / "model.onnx").stat().st_ino == (artifact / "model.onnx").stat().st_ino and facts["file_bytes"] == 5
    assert json.loads((artifact / "genai_config.json").read_text())["model"]["decoder"]["session_options"] == {"log_id": "x"}
    (artifact / "model.onnx").unlink()
    (artifact / "model.onnx").write_bytes(b"second!")  # a recompile
    decode_peers.ours_in_genai(artifact, out, threads=2)
    assert (out / "model.onnx").read_bytes() == b"second!"
