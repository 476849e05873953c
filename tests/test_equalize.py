"""`equalize` (cross-layer equalization) on a small Conv -> ReLU -> depthwise Conv -> ReLU -> Conv
net whose channels have ranges four orders of magnitude apart: the float outputs stay the same,
each pair's per-channel weight ranges become equal, and the int8 model's error drops."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from qcompiler.analysis import execute
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.passes.equalize import input_ranges, output_ranges
from qcompiler.pipeline.spec import format_pipeline, parse_pipeline
from qcompiler.tools.opt import optimize

CHANNELS = 8


def conv_net(activation: str = "Relu") -> ir.Model:
    """x [N, 4, 8, 8] -> Conv 3x3 (8, bias) -> act -> depthwise 3x3 (8, bias) -> act -> Conv 1x1 (4).
    Channel i of the first conv is multiplied by f_i and the depthwise conv's channel i divided by
    it (f from 1e-2 to 1e2), and likewise g between the depthwise and the last conv, so the float
    function is an ordinary one while the weight ranges are very unequal."""
    rng = np.random.default_rng(0)
    f = np.logspace(-2, 2, CHANNELS)
    g = np.logspace(2, -2, CHANNELS)
    w1 = rng.normal(size=(CHANNELS, 4, 3, 3)) * 0.3 * f[:, None, None, None]
    b1 = rng.normal(size=CHANNELS) * 0.1 * f
    wd = rng.normal(size=(CHANNELS, 1, 3, 3)) * 0.3 / f[:, None, None, None] * g[:, None, None, None]
    bd = rng.normal(size=CHANNELS) * 0.1 * g
    w3 = rng.normal(size=(4, CHANNELS, 1, 1)) * 0.3 / g[None, :, None, None]
    inits = [numpy_helper.from_array(a.astype(np.float32), name)
             for name, a in (("W1", w1), ("B1", b1), ("WD", wd), ("BD", bd), ("W3", w3))]
    extra = []
    if activation == "Clip":
        inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        extra = ["lo", "hi"]
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["H1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["H1", *extra], ["A1"], name="act1"),
        helper.make_node("Conv", ["A1", "WD", "BD"], ["H2"], name="depthwise", pads=[1, 1, 1, 1], group=CHANNELS),
        helper.make_node(activation, ["H2", *extra], ["A2"], name="act2"),
        helper.make_node("Conv", ["A2", "W3"], ["Y"], name="conv3"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "Conv"}


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_float_outputs_are_unchanged():
    model = conv_net()
    feeds = synthetic_inputs(model, seed=100)
    expected = execute.run(model, feeds)["Y"]
    records = optimize(model, "equalize")
    assert records[0].modified and records[0].stats["pairs_rescaled"] == 2
    np.testing.assert_allclose(execute.run(model, feeds)["Y"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_each_pair_has_equal_channel_ranges():
    model = conv_net()
    before = weights(model)
    assert output_ranges(before["conv1"]).max() / output_ranges(before["conv1"]).min() > 1e3
    optimize(model, "equalize")
    after = weights(model)
    for first, second, groups in (("conv1", "depthwise", CHANNELS), ("depthwise", "conv3", 1)):
        np.testing.assert_allclose(output_ranges(after[first]), input_ranges(after[second], groups), rtol=5e-3)


def test_int8_error_drops():
    feeds = synthetic_inputs(conv_net(), seed=100)
    expected = execute.run(conv_net(), feeds)["Y"]
    errors = {}
    for pipeline in ("calibrate,quantize", "equalize,calibrate,quantize"):
        model = conv_net()
        optimize(model, pipeline)
        errors[pipeline] = rel_l2(execute.run(model, feeds)["Y"], expected)
    assert errors["equalize,calibrate,quantize"] < 0.5 * errors["calibrate,quantize"], errors


@pytest.mark.parametrize("clip, rescaled", [("skip", 0), ("per-channel", 2)])
def test_relu6_is_skipped_unless_made_per_channel(clip, rescaled):
    model = conv_net("Clip")
    feeds = synthetic_inputs(model, seed=100)
    expected = execute.run(model, feeds)["Y"]
    stats = optimize(model, f"equalize{{clip={clip}}}")[0].stats
    assert stats["pairs_rescaled"] == rescaled
    if clip == "skip":
        assert all("ReLU6" in why for why in stats["skipped_why"].values()) and len(stats["skipped_why"]) == 2
    else:
        assert not any(n.op_type == "Clip" for n in model.graph)
        assert stats["clips_made_per_channel"] == 2
        assert not optimize(model, "equalize{clip=per-channel}")[0].modified  # a second run finds nothing to do
    np.testing.assert_allclose(execute.run(model, feeds)["Y"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_preset_option_puts_equalize_before_calibration():
    plain = format_pipeline(parse_pipeline("w8a8"))
    assert "equalize" not in plain
    with_equalize = format_pipeline(parse_pipeline("w8a8{equalize=true}"))
    assert with_equalize == plain.replace("calibrate{", "equalize{iterations=100 clip=skip},calibrate{", 1)
    assert "equalize{iterations=100 clip=per-channel},calibrate" in format_pipeline(parse_pipeline("w8a8{equalize=relu6}"))
