"""`quantize{bias-correction=true|conv}`: each layer's bias absorbs the mean change its int8 weights
make on the calibration inputs, so the quantized model's outputs keep the float model's mean."""

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.ir import load
from qcompiler.passes.quantize import Target, weight_bias_shift


def _save(tmp_path, nodes, inputs, outputs, arrays, name):
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arrays.items()]
    graph = oh.make_graph(nodes, name, inputs, outputs, inits)
    path = tmp_path / f"{name}.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _conv_net(tmp_path):
    """A Conv with a bias, a ReLU, a depthwise Conv without one, on inputs of mean 2 (FFDNet-like)."""
    rng = np.random.default_rng(3)
    arrays = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.5, (8, 1, 3, 3))}
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1], group=8)]
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 16, 16])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8, 16, 16])
    return _save(tmp_path, nodes, [x], [y], arrays, "convs")


def _mlp(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {"w": rng.normal(0, 0.2, (32, 16)), "b": rng.normal(0, 0.1, 16)}
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"], name="fc"), oh.make_node("Add", ["h", "b"], ["y"], name="fc_bias")]
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 32])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16])
    return _save(tmp_path, nodes, [x], [y], arrays, "mlp")


def _batches(shape, seed, count=6):
    rng = np.random.default_rng(seed)
    return [{"x": (2.0 + rng.normal(0, 1, shape)).astype(np.float32)} for _ in range(count)]


def _mean_error(path, artifact, batch):
    float_y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    quant_y = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    axes = tuple(i for i in range(float_y.ndim) if i != 1) if float_y.ndim == 4 else (0,)
    return np.abs((quant_y - float_y).mean(axis=axes)).max()


@pytest.mark.parametrize("model, shape", [(_conv_net, (2, 3, 16, 16)), (_mlp, (16, 32))])
def test_corrected_biases_keep_the_float_mean(tmp_path, model, shape):
    path = model(tmp_path)
    errors = {}
    for corrected in (False, True):
        out = tmp_path / f"out-{corrected}"
        result = qcompiler.compile(str(path), out, pipeline=f"calibrate,quantize{{activations=none bias-correction={str(corrected).lower()}}}",
                                   calibration=_batches(shape, 0), drift=False)
        errors[corrected] = _mean_error(path, out, _batches(shape, 9, 1)[0])
        stats = next(r.stats for r in result.records if r.name == "quantize")
        assert stats.get("biases_corrected", 0) == (2 if corrected and model is _conv_net else 1 if corrected else 0)
    assert errors[True] < 0.25 * errors[False], errors


def test_shift_of_a_grouped_conv_sums_its_taps_over_the_channels_of_its_group():
    error = np.zeros((4, 2, 3, 3))
    error[1, 0] = 0.1  # output 1 (group 0) reads input channels 0 and 1
    error[3, 1] = -0.2  # output 3 (group 1) reads input channels 2 and 3
    mean_in = np.array([1.0, 2.0, 3.0, 4.0])
    target = Target(node=type("N", (), {"op_type": "Conv"})(), x=None, w=None, weight_axis=0, channel_axis=1)
    np.testing.assert_allclose(weight_bias_shift(target, error, mean_in), [0, 0.9 * 1.0, 0, -1.8 * 4.0])


def test_default_pipeline_leaves_biases_alone(tmp_path):
    path = _mlp(tmp_path)
    qcompiler.compile(str(path), tmp_path / "o", pipeline="calibrate,quantize{activations=none}", calibration=_batches((16, 32), 0), drift=False)
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.initializer}["b"]
    np.testing.assert_array_equal(b, onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[1]))
    assert load(path)  # the source is untouched


def _quantize_stats(result):
    return next(r.stats for r in result.records if r.name == "quantize")


def test_w8a8_preset_corrects_conv_biases_unless_told_otherwise(tmp_path):
    """`w8a8` corrects Conv layers only (`bias-correction=conv`); `true` corrects linears too."""
    convs, mlp = _conv_net(tmp_path), _mlp(tmp_path)
    conv_calib, mlp_calib = _batches((2, 3, 16, 16), 0), _batches((16, 32), 0)
    on = qcompiler.compile(str(convs), tmp_path / "on", pipeline="w8a8", calibration=conv_calib, drift=False)
    off = qcompiler.compile(str(convs), tmp_path / "off", pipeline="w8a8{bias-correction=false}", calibration=conv_calib, drift=False)
    assert "bias-correction=conv" in on.pipeline and "bias-correction=false" in off.pipeline
    assert _quantize_stats(on)["biases_corrected"] == 1 and "biases_corrected" not in _quantize_stats(off)  # c2 writes the output: float
    batch = _batches((2, 3, 16, 16), 9, 1)[0]
    assert _mean_error(convs, tmp_path / "on", batch) < _mean_error(convs, tmp_path / "off", batch)
    linear = qcompiler.compile(str(mlp), tmp_path / "mlp", pipeline="w8a8", calibration=mlp_calib, drift=False)
    every = qcompiler.compile(str(mlp), tmp_path / "all", pipeline="w8a8{bias-correction=true}", calibration=mlp_calib, drift=False)
    assert _quantize_stats(linear)["biases_corrected"] == 0 and _quantize_stats(every)["biases_corrected"] == 1


def test_layers_without_a_constant_bias_are_left_alone(tmp_path):
    """A bias-free MatMul (as in Llama-style LMs) and one whose Add reads another activation: no
    correction, and the compile equals the uncorrected one byte for byte."""
    rng = np.random.default_rng(5)
    arrays = {"w1": rng.normal(0, 0.2, (32, 32)), "w2": rng.normal(0, 0.2, (32, 32))}
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             oh.make_node("Add", ["h", "x"], ["r"], name="residual"),
             oh.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 32])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 32])
    path = _save(tmp_path, nodes, [x], [y], arrays, "biasfree")
    on = qcompiler.compile(str(path), tmp_path / "on", pipeline="w8a8{bias-correction=true}", calibration=_batches((16, 32), 0), drift=False)
    qcompiler.compile(str(path), tmp_path / "off", pipeline="w8a8{bias-correction=false}", calibration=_batches((16, 32), 0), drift=False)
    assert _quantize_stats(on)["biases_corrected"] == 0
    assert (tmp_path / "on" / "model.onnx").read_bytes() == (tmp_path / "off" / "model.onnx").read_bytes()
