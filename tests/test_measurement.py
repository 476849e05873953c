"""Honest measurement: drift, the report's errors and the output-cosine gate run on real data
(`qcompiler.analysis.probe.choose`) in ONNX Runtime, and a measurement that fails is a warning."""

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import qcompiler
from qcompiler.analysis import execute, probe
from qcompiler.tools.cli import main


def _dead_on_noise() -> onnx.ModelProto:
    """MatMul -> Add(-40) -> Relu -> MatMul: zero output on standard normal inputs (the synthetic
    probe), not on the real inputs around 20."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.uniform(0, 0.5, (16, 32)).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array(np.full(32, -40.0, np.float32), "b1"),
        onnx.numpy_helper.from_array(rng.normal(0, 0.3, (32, 8)).astype(np.float32), "w2"),
    ]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        oh.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        oh.make_node("Relu", ["hb"], ["r"], name="relu"),
        oh.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = oh.make_graph(nodes, "dead_on_noise", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)


def _rows(seed: int, n: int) -> np.ndarray:
    return (20 + 3 * np.random.default_rng(seed).standard_normal((n, 16))).astype(np.float32)


@pytest.fixture()
def files(tmp_path):
    path = tmp_path / "dead.onnx"
    onnx.save(_dead_on_noise(), str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_rows(1, 12))
    return path, calib


def _cosine_on(model_path, artifact, rows) -> float:
    want = execute.ort_session(str(model_path)).run(None, {"x": rows})[0]
    got = execute.ort_session(str(artifact / "model.onnx")).run(None, {"x": rows})[0]
    return execute.drift({"y": want}, {"y": got})["cosine"]


def test_synthetic_probe_really_is_all_zero():
    session = execute.ort_session(_dead_on_noise())
    assert not session.run(None, {"x": np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)})[0].any()
    assert session.run(None, {"x": _rows(1, 2)})[0].any()


def test_report_cosine_is_measured_on_held_apart_calibration_rows(files, tmp_path):
    path, calib = files
    out = tmp_path / "out"
    assert main(["-q", "compile", str(path), "-o", str(out), "--pipeline", "w8a8", "--calib", str(calib),
                 "--no-cache", "--report", str(out / "report.json")]) == 0
    body = json.loads((out / "report.json").read_text())
    assert body["probe"]["source"] == probe.CALIBRATION_HELD_APART
    assert body["probe"]["inputs"]["x"]["shape"] == [3, 16]  # the last quarter of 12 samples
    assert body["warnings"] == []
    reported = body["summary"]["output"]["cosine"]
    assert reported < 1.0
    assert reported == pytest.approx(_cosine_on(path, out, _rows(1, 12)[9:]), abs=1e-5)
    assert body["passes"][-1]["drift"]["cosine"] == reported
    assert all(layer["error"] is not None for layer in body["layers"])


def test_eval_data_is_measured_on(files, tmp_path):
    path, calib = files
    eval_npz = tmp_path / "eval.npz"
    np.savez(eval_npz, x=_rows(7, 6))
    out = tmp_path / "out"
    result = qcompiler.compile(str(path), out, pipeline="w8a8", calibration=str(calib), eval_data=str(eval_npz),
                               report=out / "report.json")
    body = json.loads((out / "report.json").read_text())
    assert result.probe.source == body["probe"]["source"] == probe.EVAL_DATA
    assert body["summary"]["output"]["cosine"] == pytest.approx(_cosine_on(path, out, _rows(7, 6)[: probe.PROBE_SAMPLES]), abs=1e-5)


def test_output_cosine_gate_is_measured_on_data(files, tmp_path):
    path, calib = files
    args = ["-q", "compile", str(path), "--pipeline", "w8a8", "--calib", str(calib), "--no-cache"]
    assert main(args + ["-o", str(tmp_path / "a"), "--fail-under", "output-cosine=0.5"]) == 0
    # the synthetic probe would call this exact (cosine 1); the data does not
    assert main(args + ["-o", str(tmp_path / "b"), "--fail-under", "output-cosine=0.999999999"]) == 3


def test_synthetic_probe_is_named_and_refuses_the_gate(files, tmp_path, capsys):
    path, _ = files
    out = tmp_path / "out"
    result = qcompiler.compile(str(path), out, pipeline="default", report=out / "report.json")
    body = json.loads((out / "report.json").read_text())
    assert result.probe.source == body["probe"]["source"] == probe.SYNTHETIC
    assert "synthetic" in body["probe"]["note"]
    gated = tmp_path / "gated"
    assert main(["-q", "compile", str(path), "-o", str(gated), "--fail-under", "output-cosine=0.99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output-cosine" in err[0] and "--eval-data" in err[0]
    assert not gated.exists()


def test_failed_measurement_is_a_warning_naming_the_pass(files, tmp_path, monkeypatch):
    path, calib = files
    real = execute.run_expanded

    def fails_when_quantized(model, feeds, threads=None, **streaming):
        if any(n.domain == "qc" for n in model.graph):
            raise execute.MeasurementError("ONNX Runtime could not run it (made to fail)")
        return real(model, feeds, threads, **streaming)

    monkeypatch.setattr(execute, "run_expanded", fails_when_quantized)
    out = tmp_path / "out"
    result = qcompiler.compile(str(path), out, pipeline="w8a8", calibration=str(calib), report=out / "report.html")
    body = json.loads((out / "report.json").read_text())
    quantize = next(r for r in result.records if r.name == "quantize")
    assert quantize.drift is None and "made to fail" in quantize.measure_error
    assert any("after pass 'quantize'" in w and "made to fail" in w for w in body["warnings"])
    assert result.records[-1].drift is not None  # the lowered artifact runs
    assert "made to fail" in (out / "report.html").read_text()


def test_a_small_output_that_moved_is_not_hidden_by_a_large_one_that_did_not():
    """An encoder's token features [8, 128, 64] unchanged beside its pooled vectors [8, 64], one of them
    moved: cosine over both together stays near 1, the lowest of the outputs (what the output-cosine
    gate reads) does not, and names the output."""
    rng = np.random.default_rng(0)
    tokens, pooled = rng.normal(size=(8, 128, 64)), rng.normal(size=(8, 64))
    moved = pooled.copy()
    moved[0] = rng.normal(size=64)
    drift = execute.drift({"last_hidden_state": tokens, "pooler_output": pooled},
                          {"last_hidden_state": tokens, "pooler_output": moved})
    assert drift["cosine"] > 0.998
    assert drift["lowest_cosine"] < 0.95 and drift["lowest_cosine_output"] == "pooler_output"
    one = execute.drift({"y": pooled}, {"y": moved})
    assert one["lowest_cosine"] == one["cosine"] and "lowest_cosine_output" not in one


def test_an_artifact_far_from_float_is_warned_about_naming_the_output():
    from qcompiler.driver.compiler import far_from_float
    from qcompiler.pipeline.pass_manager import PassRecord

    def records(drift):
        return [PassRecord(1, "quantize", "quantize"), PassRecord(2, "lower-ort", "lower-ort", drift=drift)]

    far = far_from_float(records({"cosine": 0.99, "lowest_cosine": 0.66, "lowest_cosine_output": "mask"}))
    assert "cosine 0.6600 (output 'mask')" in far and "qcompiler doctor" in far
    assert far_from_float(records({"cosine": 0.95, "lowest_cosine": 0.95})) is None
    assert far_from_float(records(None)) is None  # not measured: nothing is claimed


def test_an_output_that_is_not_finite_is_not_close_to_float():
    reference = {"a": np.ones((2, 4)), "b": np.ones((2, 4))}
    drift = execute.drift(reference, {"a": np.ones((2, 4)), "b": np.full((2, 4), np.nan)})
    assert np.isnan(drift["cosine"]) and np.isnan(drift["lowest_cosine"]) and drift["lowest_cosine_output"] == "b"
    from qcompiler.driver.compiler import far_from_float
    from qcompiler.pipeline.pass_manager import PassRecord

    assert "far from float" in far_from_float([PassRecord(1, "quantize", "quantize", drift=drift)])
