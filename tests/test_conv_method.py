"""`quantize{conv-method=...}`: the clipping rule of the activations Conv layers read and write,
apart from calibrate's method for the rest (the `w8a8` preset clips Conv activations by MSE)."""

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.errors import UserError
from qcompiler.pipeline.spec import parse_pipeline


def _net(tmp_path):
    """Conv -> Relu -> Conv -> Relu -> global pool -> MatMul: two Conv inputs, two Conv outputs, one MatMul input."""
    rng = np.random.default_rng(5)
    arrays = {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.3, (8, 8, 3, 3)),
              "b2": rng.normal(0, 0.1, 8), "fc": rng.normal(0, 0.3, (8, 4)), "shape": np.array([-1, 8])}
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="c2", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             oh.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             oh.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
             oh.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.int64 if k == "shape" else np.float32), k) for k, v in arrays.items()]
    graph = oh.make_graph(nodes, "convs", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 64, 64])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])], inits)
    path = tmp_path / "convs.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _batches(seed, count=4):
    """Gaussian images, the first batch with one spike of 40: min-max spends the grid on it, while at 8 bits
    clipping pays only for outliers rarer than about 1 in 10^6 of the values (here 1 in 4 x 196608)."""
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(count):
        x = rng.normal(0, 1, (16, 3, 64, 64))
        if index == 0:
            x.flat[rng.integers(x.size)] = 40.0
        batches.append({"x": x.astype(np.float32)})
    return batches


def _compile(tmp_path, path, pipeline):
    out = tmp_path / pipeline.replace("{", "-").replace("}", "").replace(" ", "-").replace("=", "-")
    result = qcompiler.compile(str(path), out, pipeline=pipeline, calibration=_batches(0), drift=False, cache_dir=None)
    return out / "model.onnx", next(r.stats for r in result.records if r.name == "quantize")


def _activations(stats):
    return {name: entry["activation"]["scale"] for name, entry in stats["per_layer"].items() if "activation" in entry}


def test_conv_inputs_get_the_mse_range_and_the_linear_keeps_calibrates(tmp_path):
    path = _net(tmp_path)
    _, minmax = _compile(tmp_path, path, "calibrate,quantize{conv-method=calibrated}")
    _, mse = _compile(tmp_path, path, "calibrate,quantize{conv-method=mse}")
    before, after = _activations(minmax), _activations(mse)
    assert set(before) == set(after) == {"c1", "c2", "fc"}
    assert after["fc"] == before["fc"]  # the MatMul's input keeps calibrate's min-max range
    assert after["c1"] < 0.6 * before["c1"]  # the heavy-tailed input is clipped, not spread over the outliers
    # the range is the MSE-optimal one of the input's histogram at calibrate's default bins, as calibrate{method=mse} gives
    _, everything_mse = _compile(tmp_path, path, "calibrate{method=mse},quantize{conv-method=calibrated}")
    assert _activations(everything_mse)["c1"] == pytest.approx(after["c1"], rel=1e-6)


def test_mse_ranges_bring_the_int8_model_closer_to_float(tmp_path):
    path = _net(tmp_path)
    feeds = _batches(7, 2)[1]  # no spike
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    errors = {}
    for method in ("calibrated", "mse"):
        model, stats = _compile(tmp_path, path, f"calibrate,quantize{{conv-method={method}}},lower-ort")
        assert stats["conv_outputs_quantized"] == 2
        y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        errors[method] = float(np.mean((y - reference) ** 2))
    assert errors["mse"] < 0.85 * errors["calibrated"], errors


def test_w8a8_clips_conv_activations_by_mse():
    quantize = next(p for p in parse_pipeline("w8a8") if p.name == "quantize")
    assert quantize.conv_method == "mse"
    assert next(p for p in parse_pipeline("w8a8{conv-method=calibrated}") if p.name == "quantize").conv_method == "calibrated"


def test_unknown_conv_method_is_refused():
    with pytest.raises(UserError, match="conv-method"):
        parse_pipeline("calibrate,quantize{conv-method=kl}")
