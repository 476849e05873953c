"""int8 Conv3d and ConvTranspose (2D and 3D): per-output-channel weights on the right axis (grouped
ConvTranspose included), bias correction for transposed convolutions, and placement that matches
what ONNX Runtime's CPU provider runs as integer kernels (QLinearConv for Conv3d; ConvTranspose
always float), checked on the graphs ONNX Runtime optimizes."""

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import onnx_ir as ir
import qcompiler
from qcompiler.analysis.placement import NO_INTEGER_CONV_TRANSPOSE
from qcompiler.passes.quantize import Target, quantize_weight_per_channel, weight_bias_shift


def _save(tmp_path, nodes, x_shape, y_shape, arrays, name):
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arrays.items()]
    graph = oh.make_graph(nodes, name, [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)], inits)
    path = tmp_path / f"{name}.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _unet3d(tmp_path):
    """Conv3d (stride 2) -> Relu -> ConvTranspose3d (stride 2, grouped) -> Relu -> Conv3d -> Sigmoid,
    16 channels throughout (wide enough for ONNX Runtime's integer 3D Conv to pay)."""
    rng = np.random.default_rng(5)
    arrays = {"w1": rng.normal(0, 0.1, (16, 16, 3, 3, 3)), "b1": rng.normal(0, 0.1, 16),
              "wt": rng.normal(0, 0.2, (16, 8, 3, 3, 3)), "bt": rng.normal(0, 0.1, 16),
              "w2": rng.normal(0, 0.1, (2, 16, 3, 3, 3))}
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["h"], name="down", pads=[1] * 6, strides=[2] * 3),
             oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("ConvTranspose", ["r", "wt", "bt"], ["u"], name="up", pads=[1] * 6, strides=[2] * 3,
                          output_padding=[1] * 3, group=2),
             oh.make_node("Relu", ["u"], ["ru"], name="relu_up"),
             oh.make_node("Conv", ["ru", "w2"], ["c"], name="head", pads=[1] * 6),
             oh.make_node("Sigmoid", ["c"], ["y"], name="sigmoid")]
    return _save(tmp_path, nodes, ["n", 16, 8, 8, 8], ["n", 2, 8, 8, 8], arrays, "unet3d")


def _batches(seed, count=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0.5, 1, (2, 16, 8, 8, 8)).astype(np.float32)} for _ in range(count)]


def _optimized_ops(model_path, tmp_path):
    """The op types ONNX Runtime's CPU provider runs after optimizing `model_path`."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_conv3d_runs_integer_and_conv_transpose_stays_float(tmp_path):
    path = _unet3d(tmp_path)
    result = qcompiler.compile(str(path), tmp_path / "w8a8", pipeline="w8a8", calibration=_batches(1), drift=False)
    stats = next(r.stats for r in result.records if r.name == "quantize")
    assert stats["layers"] == 2
    assert stats["float_placement"] == {"up": NO_INTEGER_CONV_TRANSPOSE}
    assert {n: e["weight_axis"] for n, e in stats["per_layer"].items()} == {"down": 0, "head": 0}
    ops = _optimized_ops(tmp_path / "w8a8" / "model.onnx", tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("ConvTranspose") == 1
    kernels = next(r.stats for r in result.records if r.name == "lower-ort")["kernels"]
    assert kernels["integer_kernels"] == 2
    feeds = _batches(9, 1)[0]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    actual = ort.InferenceSession(str(tmp_path / "w8a8" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.02


def test_forced_conv_transpose_is_quantized_and_runs_float(tmp_path):
    path = _unet3d(tmp_path)
    result = qcompiler.compile(str(path), tmp_path / "forced", pipeline="calibrate,quantize{force=wt},lower-ort",
                               calibration=_batches(1), drift=False)
    stats = next(r.stats for r in result.records if r.name == "quantize")
    assert stats["float_placement"] == {} and stats["per_layer"]["up"]["weight_axis"] == 1
    ops = _optimized_ops(tmp_path / "forced" / "model.onnx", tmp_path)
    assert ops.count("ConvTranspose") == 1  # ONNX Runtime does not fuse it: float behind a dequantize


@pytest.mark.parametrize(("weight", "x_shape", "reason"), [
    ((8, 2, 3, 3, 3), ["n", 2, 6, 6, 6], "summing 54 products an output (input channels per group x taps, below 64)"),
    ((8, 1, 3, 3, 3), ["n", 1, 6, 6, 6], "summing 27 products an output"),
    ((8, 3, 3, 3, 3), ["n", 3, 6, 6, 6], None), ((8, 1, 7, 7, 7), ["n", 1, 16, 16, 16], None),
    ((8, 15, 3, 3, 3), ["n", 15, "d", 6, 6], "15 input channels per group (below 16) that lower-ort cannot write in 2D"),
    ((8, 16, 3, 3, 3), ["n", 16, "d", 6, 6], None),
    ((8, 15, 1, 1, 1), ["n", 15, 6, 6, 6], None), ((8, 1, 3, 3), ["n", 1, 6, 6], None)])
def test_narrow_conv3d_with_taps_stays_float(weight, x_shape, reason):
    """A 3D Conv with more than one tap stays float where its integer kernel is slower: written in 2D over
    depth slices (its input's dims known), where each output sums fewer than 64 products (input channels per
    group x taps); as a 3D integer kernel (a depth unknown at compile time), below 16 input channels. 1^3
    kernels and 2D Convs are integer kernels."""
    from qcompiler.analysis.placement import integer_layers

    rng = np.random.default_rng(8)
    w = ir.Value(name="w", const_value=ir.tensor(rng.normal(0, 1, weight).astype(np.float32)))
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    conv = ir.node("Conv", [x, w])
    relu = ir.node("Relu", [conv.outputs[0]])
    sigmoid = ir.node("Sigmoid", [relu.outputs[0]])
    graph = ir.Graph([x], [sigmoid.outputs[0]], nodes=[conv, relu, sigmoid])
    found = integer_layers(graph, [conv], static=True).get(id(conv))
    assert (found is None) == (reason is None)
    if reason is not None:
        assert reason in found


def _in_2d_and_3d(tmp_path, monkeypatch, path, x_shape, rng):
    """`path` compiled to int8 (int8 forced everywhere) as `lower-ort` writes it and with its 3D Convs left
    in 3D: (how many Convs went 2D, the first output of each on one seeded input)."""
    from qcompiler.passes import lower_ort

    batches = [{"x": rng.normal(0.3, 1, x_shape).astype(np.float32)} for _ in range(3)]
    pipeline = "calibrate,quantize{force=*},lower-ort"
    unfolded = qcompiler.compile(str(path), tmp_path / "2d", pipeline=pipeline, calibration=batches, drift=False)
    in_2d = next(r.stats for r in unfolded.records if r.name == "lower-ort")["routes"].get("QLinearConv 2D over depth slices (integer Conv3d)", 0)
    with monkeypatch.context() as patch:
        patch.setattr(lower_ort, "unfold_integer_conv3d", lambda graph: 0)
        qcompiler.compile(str(path), tmp_path / "3d", pipeline=pipeline, calibration=batches, drift=False)
    feeds = {"x": rng.normal(0.3, 1, x_shape).astype(np.float32)}
    as_2d, as_3d = (ort.InferenceSession(str(tmp_path / d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                    for d in ("2d", "3d"))
    return in_2d, as_2d, as_3d


@pytest.mark.parametrize(("weight", "attrs"), [
    ((6, 4, 3, 3, 3), {"pads": [1] * 6}),
    ((6, 4, 7, 3, 3), {"pads": [3, 1, 1, 3, 1, 1], "strides": [2, 2, 2]}),
    ((6, 2, 3, 1, 3), {"pads": [2, 0, 1, 1, 0, 1], "dilations": [2, 1, 1], "group": 2}),
    ((6, 4, 1, 3, 3), {"pads": [0, 1, 1, 0, 1, 1]}),
    ((6, 4, 1, 1, 1), {"strides": [2, 1, 1]}),
])
def test_integer_conv3d_as_2d_over_depth_slices_computes_what_its_3d_kernel_does(tmp_path, monkeypatch, weight, attrs):
    """`lower-ort` writes an integer Conv3d as a 2D Conv over the output's depth slices (depth taps,
    strides, padding, dilation, groups, a batch of 2): ONNX Runtime runs it as a 2D QLinearConv and
    its output equals, bit for bit, that of the 3D QLinearConv the same QDQ group makes unrewritten."""
    rng = np.random.default_rng(11)
    arrays = {"w": rng.normal(0, 0.2, weight), "b": rng.normal(0, 0.1, weight[0])}
    node = oh.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", group=attrs.get("group", 1),
                        **{k: v for k, v in attrs.items() if k != "group"})
    nodes = [node, oh.make_node("Relu", ["c"], ["r"], name="relu"), oh.make_node("Sigmoid", ["r"], ["y"], name="sigmoid")]
    path = _save(tmp_path, nodes, ["n", 4, 7, 6, 5], None, arrays, "conv3d")
    in_2d, as_2d, as_3d = _in_2d_and_3d(tmp_path, monkeypatch, path, (2, 4, 7, 6, 5), rng)
    assert in_2d == 1
    assert _optimized_ops(tmp_path / "2d" / "model.onnx", tmp_path).count("QLinearConv") == 1
    assert as_2d.shape == as_3d.shape and np.array_equal(as_2d, as_3d)


def test_a_chain_of_integer_conv3ds_is_written_in_2d_throughout(tmp_path, monkeypatch):
    """Conv3d -> Relu -> Conv3d -> Relu (a folded BatchNorm's chain): the second Conv reads the first one's
    output put back in 5-D, whose dims the rewrite records, so both are written in 2D; the output equals the
    3D kernels' bit for bit."""
    rng = np.random.default_rng(12)
    arrays = {"w1": rng.normal(0, 0.2, (8, 4, 3, 3, 3)), "w2": rng.normal(0, 0.2, (6, 8, 3, 3, 3))}
    nodes = [oh.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 6), oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 6, strides=[2] * 3),
             oh.make_node("Relu", ["c2"], ["r2"], name="relu2"), oh.make_node("Sigmoid", ["r2"], ["y"], name="sigmoid")]
    path = _save(tmp_path, nodes, ["n", 4, 6, 6, 6], None, arrays, "chain")
    in_2d, as_2d, as_3d = _in_2d_and_3d(tmp_path, monkeypatch, path, (2, 4, 6, 6, 6), rng)
    assert in_2d == 2
    assert np.array_equal(as_2d, as_3d)


def test_a_conv3d_weight_dequantized_once_for_two_convs_is_left_in_3d():
    """A QDQ graph (as ONNX Runtime's quantize_static writes it) whose one DequantizeLinear of an int8 kernel
    feeds two Conv3ds: writing either in 2D would make the other read a 4-D kernel, so the rewrite leaves the
    graph as it is."""
    from onnx import TensorProto, numpy_helper

    from qcompiler.passes.lower_ort.conv3d import unfold_integer_conv3d

    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array(rng.integers(-100, 100, (4, 4, 3, 3, 3)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array([0.01, 0.02, 0.015, 0.01], np.float32), "ws"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [oh.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), oh.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd1"]),
             oh.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd2"]), oh.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0)]
    for i in (1, 2):
        nodes += [oh.make_node("Conv", [f"xd{i}", "w"], [f"c{i}"], name=f"conv{i}", pads=[1] * 6),
                  oh.make_node("Relu", [f"c{i}"], [f"r{i}"]), oh.make_node("QuantizeLinear", [f"r{i}", "s", "z"], [f"q{i}"]),
                  oh.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"y{i}"])]
    graph = oh.make_graph(nodes, "shared", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 5, 5])],
                          [oh.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in (1, 2)], inits)
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))
    before = ir.to_proto(model).SerializeToString()
    assert unfold_integer_conv3d(model.graph) == 0
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_weights_per_output_channel_against_float(tmp_path, groups):
    """Weight-only int8 ConvTranspose (3D, grouped or not): one scale per column of [C, O/groups, k...],
    outputs close to float's in ONNX Runtime."""
    rng = np.random.default_rng(6)
    arrays = {"wt": rng.normal(0, 0.3, (4, 6 // groups, 2, 2, 2)) * np.array([1, 4, 0.25, 2, 1, 3][: 6 // groups]).reshape(1, -1, 1, 1, 1),
              "bt": rng.normal(0, 0.1, 6)}
    node = oh.make_node("ConvTranspose", ["x", "wt", "bt"], ["y"], name="up", strides=[2] * 3, group=groups)
    path = _save(tmp_path, [node], ["n", 4, 3, 3, 3], ["n", 6, 6, 6, 6], arrays, f"tconv{groups}")
    batches = [{"x": rng.normal(1, 1, (2, 4, 3, 3, 3)).astype(np.float32)} for _ in range(3)]
    result = qcompiler.compile(str(path), tmp_path / "w8", pipeline="calibrate,quantize{activations=none},lower-ort",
                               calibration=batches, drift=False)
    model = onnx.load(str(tmp_path / "w8" / "model.onnx"))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    scales = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == dq.input[1])
    expected_scales = np.abs(arrays["wt"]).max(axis=(0, 2, 3, 4)) / 127
    np.testing.assert_allclose(scales, expected_scales, rtol=1e-6)
    feeds = batches[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "w8" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01
    assert next(r.stats for r in result.records if r.name == "quantize")["layers"] == 1


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_bias_shift_is_the_mean_output_change(groups):
    """At stride = kernel (no overlap, no border) the shift is exactly the mean change per output channel."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (4, 6 // groups, 2, 2)).astype(np.float32)
    q, scale = quantize_weight_per_channel(w, 1)
    error = q.astype(np.float64) * scale.reshape(1, -1, 1, 1) - w
    x = (rng.normal(0, 1, (1, 4, 5, 5)) + np.array([2.0, -1.0, 0.5, 3.0]).reshape(1, 4, 1, 1)).astype(np.float32)
    node = ir.node("ConvTranspose", [ir.Value(name="x"), ir.Value(name="w")], {"strides": [2, 2], "group": groups})
    target = Target(node, node.inputs[0], node.inputs[1], 1, 1)
    shift = weight_bias_shift(target, error, x.astype(np.float64).mean(axis=(0, 2, 3)))
    model = oh.make_model(oh.make_graph(
        [oh.make_node("ConvTranspose", ["x", "e"], ["y"], strides=[2, 2], group=groups)], "t",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)], [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(error.astype(np.float32), "e")]), opset_imports=[oh.make_opsetid("", 21)])
    change = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(shift, change.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape, axis", [((70, 33), -1), ((70, 33), 0), ((12, 5, 3, 3), 0), ((12, 5, 3, 3), 1)])
def test_weights_quantized_a_slice_of_rows_at_a_time_equal_all_at_once(monkeypatch, shape, axis):
    import qcompiler.passes.quantize as quantize

    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    whole_q, whole_scale = quantize_weight_per_channel(w, axis)
    scales = whole_scale.reshape([-1 if i == axis % w.ndim else 1 for i in range(w.ndim)])
    whole_sqnr = quantize.weight_sqnr(w, whole_q, scales, axis)
    monkeypatch.setattr(quantize, "ROWS_AT_ONCE_ELEMENTS", 40)  # several slices of rows
    q, scale = quantize_weight_per_channel(w, axis)
    assert np.array_equal(q, whole_q) and np.array_equal(scale, whole_scale)
    deq = whole_q.astype(np.float32) * scales
    direct = 10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum((w.astype(np.float64) - deq) ** 2))
    assert quantize.weight_sqnr(w, q, scales, axis) == whole_sqnr == round(direct, 2)
    assert np.array_equal(whole_q, np.clip(np.round(w / scales), -127, 127).astype(np.int8))  # the plain formula


def test_a_swish_between_integer_convs_runs_as_one_kernel_behind_one_dequantize(tmp_path):
    """EfficientNet's stem as TensorFlow-style exporters write it: a zero Pad on one side before a
    stride-2 Conv with auto_pad VALID, then Swish (x * Sigmoid(x)), then a Conv. The Pad becomes the
    Conv's pads and the Swish one QuickGelu, so ONNX Runtime runs two integer Convs with one float
    kernel between them, computing what the float model does."""
    rng = np.random.default_rng(11)
    arrays = {"w1": rng.normal(0, 0.2, (16, 3, 3, 3)), "b1": rng.normal(0, 0.1, 16), "w2": rng.normal(0, 0.1, (8, 16, 1, 1))}
    pads = onnx.numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    nodes = [oh.make_node("Constant", [], ["p"], value=pads),
             oh.make_node("Pad", ["x", "p"], ["xp"], name="correct_pad"),
             oh.make_node("Conv", ["xp", "w1", "b1"], ["h"], name="stem", strides=[2, 2], auto_pad="VALID"),
             oh.make_node("Sigmoid", ["h"], ["g"], name="gate"),
             oh.make_node("Mul", ["h", "g"], ["s"], name="swish"),
             oh.make_node("Conv", ["s", "w2"], ["c"], name="project"),
             oh.make_node("Sigmoid", ["c"], ["y"], name="head")]
    path = _save(tmp_path, nodes, ["n", 3, 16, 16], ["n", 8, 8, 8], arrays, "stem")
    batches = [{"x": rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    result = qcompiler.compile(str(path), tmp_path / "w8a8", pipeline="w8a8", calibration=batches, drift=False)
    routes = next(r.stats for r in result.records if r.name == "lower-ort")["routes"]
    assert routes["QuickGelu(gated activation of a quantized tensor)"] == 1
    ops = _optimized_ops(tmp_path / "w8a8" / "model.onnx", tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("QuickGelu") == 1
    assert "Pad" not in ops and ops.count("Sigmoid") == 1 and ops.count("DequantizeLinear") == 2  # the Swish's and the head's
    feeds = {"x": rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    actual = ort.InferenceSession(str(tmp_path / "w8a8" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.03
