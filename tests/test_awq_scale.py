"""`awq-scale`: activation-aware weight scaling, folded into the producer (exact before
quantization), and what it buys once the weights are quantized."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from qcompiler.analysis import execute
from qcompiler.errors import UserError
from qcompiler.ir import to_text
from qcompiler.passes.awq_scale import choose_alpha, quantize_as_allocated
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import parse_pipeline


def _gated_block(seed=0, spread=1.5, residual=False, hidden=256, inner=192):
    """An RMSNorm-style Mul by gamma (channels of very different sizes), a gate/up pair reading it,
    and a down projection reading sigmoid(gate) * up; with `residual`, the normalised tensor is
    also added to the output (a second reader)."""
    rng = np.random.default_rng(seed)
    gamma = np.exp(rng.normal(0, spread, hidden)).astype(np.float32)
    wg, wu = (rng.normal(0, 0.1, (hidden, inner)).astype(np.float32) for _ in range(2))
    wd = rng.normal(0, 0.1, (inner, hidden)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["X", "gamma"], ["H"]), helper.make_node("MatMul", ["H", "Wg"], ["G"]),
             helper.make_node("MatMul", ["H", "Wu"], ["U"]), helper.make_node("Sigmoid", ["G"], ["S"]),
             helper.make_node("Mul", ["S", "U"], ["P"]), helper.make_node("MatMul", ["P", "Wd"], ["D"]),
             helper.make_node("Add", ["D", "H"], ["Y"]) if residual else helper.make_node("Identity", ["D"], ["Y"])]
    weights = {"gamma": gamma, "Wg": wg, "Wu": wu, "Wd": wd}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["M", hidden])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", hidden])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _single_linear(seed=0, k=256, n=256):
    """A Mul by gamma (8 input channels 20 times the others) feeding one linear."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(k, np.float32)
    gamma[rng.choice(k, 8, replace=False)] = 20.0
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["X", "gamma"], ["H"]), helper.make_node("MatMul", ["H", "W"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(w, "W")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _batches(model, seed, count=4, rows=64):
    rng = np.random.default_rng(seed)
    width = model.graph.inputs[0].shape[1]
    return [{"X": rng.standard_normal((rows, width)).astype(np.float32)} for _ in range(count)]


def _compile(model, pipeline, seed=0):
    with using(CompileContext(calibration=_batches(model, seed))):
        return run_pipeline(model, parse_pipeline(pipeline))


def _stats(records, name):
    return next(r.stats for r in records if r.name == name)


def test_scaled_and_folded_model_equals_the_original():
    original, model = _gated_block(seed=1), _gated_block(seed=1)
    records = _compile(model, "calibrate,awq-scale{avg-bits=5.1 candidates=4 outliers-act=0 group-size=32},fold-scales")
    searched = _stats(records, "awq-scale")["searched"]
    assert sorted(searched) == ["H", "P"]  # gate/up share one scale; the down projection has its own
    assert all(entry["alpha"] > 0 for entry in searched.values()), searched
    folded = _stats(records, "fold-scales")
    assert folded["smoothing_folded"] == 2 and folded["smoothing_kept"] == 0
    assert not any(node.domain == "qc" for node in model.graph)
    feeds = _batches(model, 99, count=1)[0]
    expected, actual = execute.run(original, feeds)["Y"], execute.run(model, feeds)["Y"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_quantized_output_error_drops_on_outlier_input_channels():
    """4-bit groups (one width, no fp16 channels): scaling protects the 8 salient channels; measured
    on rows the search never saw."""
    bits = "avg-bits=5.1 candidates=4 outliers-act=0 group-size=32"
    errors = []
    for scale in ("", f"awq-scale{{{bits}}},fold-scales,"):
        model, reference = _single_linear(), _single_linear()
        records = _compile(model, f"calibrate,{scale}allocate-bits{{{bits}}},quantize-weights")
        feeds = _batches(model, 99, count=1)[0]
        errors.append(float(np.mean((execute.run(model, feeds)["Y"] - execute.run(reference, feeds)["Y"]) ** 2)))
    assert _stats(records, "awq-scale")["searched"]["H"]["alpha"] > 0
    assert errors[1] < 0.85 * errors[0], errors


def test_search_on_a_layer_with_outlier_input_channels():
    """The search's own objective: the error at the chosen alpha against alpha = 0."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (256, 128)).astype(np.float32)
    x[:, rng.choice(128, 6, replace=False)] *= 25
    w = rng.normal(0, 0.05, (128, 96)).astype(np.float32)

    def stored(w_, energy, spans):
        return quantize_as_allocated(w_, energy, spans, 5.1, (4,), 32, 0.0)

    alpha, errors = choose_alpha(x, [w], np.abs(x).mean(0), np.mean(x.astype(np.float64) ** 2, 0), stored)
    assert alpha > 0
    assert errors[alpha] < 0.8 * errors[0.0], errors


def test_skips_an_input_with_other_readers():
    model = _gated_block(residual=True)
    stats = _stats(_compile(model, "calibrate,awq-scale{avg-bits=4.25 group-size=32}"), "awq-scale")
    assert "H" in stats["skipped"] and "residual" in stats["skipped"]["H"]
    assert "H" not in stats["searched"] and "P" in stats["searched"]


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="group-size"):
        parse_pipeline("awq-scale{group-size=48}")
    with pytest.raises(UserError, match="avg-bits"):
        parse_pipeline("awq-scale{avg-bits=1}")


def test_same_inputs_give_the_same_bytes():
    texts = []
    for _ in range(2):
        model = _single_linear(seed=2, k=128, n=128)
        bits = "avg-bits=5.5 candidates=4 outliers-act=0 group-size=32"
        _compile(model, f"calibrate,awq-scale{{{bits}}},fold-scales,allocate-bits{{{bits}}},quantize-weights")
        texts.append(to_text(model, elide_over=None))
    assert texts[0] == texts[1]
