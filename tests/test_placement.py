"""Placement that pays: `quantize` makes every Conv it quantizes an integer kernel for ONNX Runtime
(its output quantized too) and leaves in float those ONNX Runtime would run in float behind a
dequantize, `lower-ort` fuses biases of any row shape, and a forced placement that ONNX Runtime
cannot use is counted and warned about."""

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.analysis import execute


def _conv_net() -> onnx.ModelProto:
    """conv0 -> Relu -> conv1 -> Relu -> conv2 -> Relu (also the skip) -> conv3 -> HardSigmoid * x ->
    conv4 -> Add(skip) -> GlobalAveragePool -> Flatten -> Gemm, and conv5 reading the Add as a second output."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(i, x, cin, cout):
        inits.append(numpy_helper.from_array(rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        return f"c{i}"

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    x = relu(conv(0, "image", 3, 8))
    x = relu(conv(1, x, 8, 8))
    skip = relu(conv(2, x, 8, 8))
    x = conv(3, skip, 8, 8)
    nodes += [helper.make_node("HardSigmoid", [x], ["gate"], name="gate"), helper.make_node("Mul", [x, "gate"], ["hs"], name="hswish")]
    x = conv(4, "hs", 8, 8)
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "fc")]
    nodes += [helper.make_node("Add", [x, skip], ["res"], name="residual"), helper.make_node("GlobalAveragePool", ["res"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc")]
    mask = conv(5, "res", 8, 1)  # a second head: its output is a graph output
    graph = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info(mask, TensorProto.FLOAT, ["n", 1, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _mlp_row_bias() -> onnx.ModelProto:
    """Dense layers as Keras exports them: MatMul + Add of a [1, 1, N] bias (+ Relu)."""
    rng = np.random.default_rng(1)
    nodes, inits, x = [], [], "tokens"
    for i, (k, n) in enumerate([(16, 32), (32, 8)]):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (k, n)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, (1, 1, n)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"dense{i}"), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["n", 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _compile(tmp_path, model, pipeline, rows):
    path = tmp_path / f"{model.graph.name}.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(3)
    return qcompiler.compile(str(path), tmp_path / pipeline.replace(",", "_"), pipeline=pipeline, calibration=[rows(rng) for _ in range(4)])


def _images(rng):
    return {"image": rng.normal(0, 1, (2, 3, 12, 12)).astype(np.float32)}


def _stats(result, name):
    return next(r.stats for r in result.records if r.name == name)


def test_every_conv_runs_integer_but_one_writing_a_graph_output(tmp_path):
    result = _compile(tmp_path, _conv_net(), "w8a8", _images)
    quantize = _stats(result, "quantize")
    # each quantized Conv's output (after its Relu) is quantized too, so ONNX Runtime makes a
    # QLinearConv of it; readers that are no layer (the hard-swish, the residual Add) read it
    # dequantized. conv5 writes a graph output, which stays float: it would run float behind a dequantize.
    assert list(quantize["float_placement"]) == ["conv5"] and "graph output" in quantize["float_placement"]["conv5"]
    assert sorted(quantize["per_layer"]) == ["conv0", "conv1", "conv2", "conv3", "conv4", "fc"]
    assert quantize["conv_outputs_quantized"] == 5
    kernels = _stats(result, "lower-ort")["kernels"]
    assert kernels["integer_kernels"] == 6 and kernels["float_kernels_behind_qdq"] == 0
    assert not kernels["predicted_slower_than_float"]
    feeds = _images(np.random.default_rng(11))
    want = execute.ort_session(_conv_net()).run(None, feeds)
    got = execute.ort_session(str(result.output / "model.onnx")).run(None, feeds)
    assert all(execute.drift({"y": w}, {"y": g})["cosine"] > 0.99 for w, g in zip(want, got))


def _relu6_net() -> onnx.ModelProto:
    """(Conv -> Clip(0, 6)) x 3 -> GlobalAveragePool, as MobileNets and EfficientNet-Lite are built:
    each Conv's output spans far more than the [0, 6] its reader sees."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes, x = [], "image"
    for i, cin in enumerate([3, 8, 8]):
        inits.append(numpy_helper.from_array(rng.normal(0, 3.0, (8, cin, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        x = f"c{i}"
        nodes.append(helper.make_node("Clip", [x, "zero", "six"], [f"{x}.relu6"], name=f"relu6_{i}"))
        x = f"{x}.relu6"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="pool"))
    graph = helper.make_graph(nodes, "relu6_net", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_relu6_outputs_are_quantized_after_the_clip_and_every_conv_runs_integer(tmp_path):
    result = _compile(tmp_path, _relu6_net(), "w8a8", _images)
    model = onnx.load(str(result.output / "model.onnx"))
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantized = [(producer.get(n.input[0], "input"), constants[n.input[1]].item())
                 for n in model.graph.node if n.op_type == "QuantizeLinear"]
    after_clip = [scale for op, scale in quantized if op == "Clip"]
    assert len(after_clip) == 3 and max(after_clip) <= 6 / 255 * 1.001  # the [0, 6] grid, not the Conv's range
    assert [op for op, _ in quantized if op == "Conv"] == []
    assert _stats(result, "lower-ort")["kernels"]["integer_kernels"] == 3
    optimized = tmp_path / "optimized.onnx"
    execute.ort_session(str(result.output / "model.onnx"), optimized_path=str(optimized))
    ran = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ran.count("QLinearConv") == 3 and "Clip" not in ran and "Conv" not in ran
    feeds = _images(np.random.default_rng(12))
    want = execute.ort_session(_relu6_net()).run(None, feeds)[0]
    got = execute.ort_session(str(result.output / "model.onnx")).run(None, feeds)[0]
    assert execute.drift({"y": want}, {"y": got})["cosine"] > 0.99


def _one_conv() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(2).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "one_conv",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 12, 12])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_forced_placement_is_predicted_slower_with_a_warning(tmp_path, caplog):
    assert _stats(_compile(tmp_path, _one_conv(), "w8a8", _images), "quantize")["layers"] == 0
    with caplog.at_level(logging.WARNING, logger="qcompiler"):
        result = _compile(tmp_path, _one_conv(), "canonicalize,calibrate,quantize{force=*},lower-ort", _images)
    kernels = _stats(result, "lower-ort")["kernels"]
    assert kernels["float_kernels_behind_qdq_names"] == ["conv"] and kernels["integer_kernels"] == 0
    assert kernels["predicted_slower_than_float"]
    assert any("predicted slower than float" in r.getMessage() for r in caplog.records)


def test_dynamic_activations_leave_convs_float(tmp_path):
    result = _compile(tmp_path, _conv_net(), "canonicalize,calibrate,quantize{act-mode=dynamic},lower-ort", _images)
    assert sorted(_stats(result, "quantize")["float_placement"]) == [f"conv{i}" for i in range(6)]


def test_row_shaped_bias_is_fused_into_the_integer_kernel(tmp_path):
    result = _compile(tmp_path, _mlp_row_bias(), "w8a8", lambda rng: {"tokens": rng.normal(0, 1, (2, 5, 16)).astype(np.float32)})
    assert _stats(result, "lower-ort")["routes"].get("MatMulIntegerToFloat(bias)") == 2
    assert not any(n.op_type == "Add" for n in result.model.graph)
    feeds = {"tokens": np.random.default_rng(9).normal(0, 1, (3, 5, 16)).astype(np.float32)}
    want = execute.ort_session(_mlp_row_bias()).run(None, feeds)[0]
    got = execute.ort_session(str(result.output / "model.onnx")).run(None, feeds)[0]
    assert got.shape == want.shape and execute.drift({"y": want}, {"y": got})["cosine"] > 0.999


def test_force_pattern_must_match(tmp_path):
    with pytest.raises(qcompiler.errors.UserError, match="force pattern 'nothing'"):
        _compile(tmp_path, _conv_net(), "canonicalize,calibrate,quantize{force=nothing},lower-ort", _images)


def test_rms_norm_fused_is_one_simplified_layer_normalization_in_onnx_runtime(tmp_path):
    """`lower-ort{rms-norm=fused}`: ONNX Runtime's optimizer makes the rewritten RMSNorm (and its
    scale) one SimplifiedLayerNormalization, with the same outputs to float32 round-off; the
    default (`as-is`) leaves the export's six ops apart."""
    from qcompiler.ir import parse, save
    from qcompiler.pipeline.context import CompileContext, using
    from qcompiler.pipeline.pass_manager import run_pipeline
    from qcompiler.pipeline.spec import parse_pipeline

    text = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[N, 8] X) => (float[N, 8] Y)
    <float Two = {2}, int64[1] Axes = {-1}, float Eps = {1e-05}, float[8] G = {1, 2, 3, 4, 5, 6, 7, 8}>
    {
      P = Pow (X, Two)
      M = ReduceMean <keepdims: int = 1> (P, Axes)
      V = Add (M, Eps)
      R = Sqrt (V)
      I = Reciprocal (R)
      N = Mul (X, I)
      Y = Mul (N, G)
    }"""
    x = np.random.default_rng(0).normal(0, 3, (5, 8)).astype(np.float32)
    ops, out = {}, {}
    for form in ("as-is", "fused"):
        model = parse(text)
        with using(CompileContext()):
            run_pipeline(model, parse_pipeline(f"lower-ort{{rms-norm={form}}}"))
        save(model, tmp_path / f"{form}.onnx")
        session = execute.ort_session(str(tmp_path / f"{form}.onnx"), optimized_path=tmp_path / f"{form}.opt.onnx")
        out[form] = session.run(None, {"X": x})[0]
        ops[form] = [n.op_type for n in onnx.load(tmp_path / f"{form}.opt.onnx").graph.node]
    assert ops["fused"] == ["SimplifiedLayerNormalization"]
    assert "SimplifiedLayerNormalization" not in ops["as-is"] and "Reciprocal" in ops["as-is"]
    np.testing.assert_allclose(out["fused"], out["as-is"], rtol=1e-5, atol=1e-5)


def _hard_swish_net() -> onnx.ModelProto:
    """MobileNetV3's pattern: (1x1 Conv 16 -> 16, depthwise 3x3 Conv) x 2, each followed by a HardSwish,
    then GlobalAveragePool: every Conv sums few products (16, 9), and each HardSwish runs in float
    between two integer Convs."""
    rng = np.random.default_rng(6)
    nodes, inits, x = [], [], "image"
    for i, (cin, group, k) in enumerate([(3, 1, 1), (16, 16, 3), (16, 1, 1), (16, 16, 3)]):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (16, cin // group, k, k)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[k // 2] * 4, group=group, name=f"conv{i}"),
                  helper.make_node("HardSwish", [f"c{i}"], [f"h{i}"], name=f"hswish{i}")]
        x = f"h{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"]))
    graph = helper.make_graph(nodes, "hard_swish_net", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_float_activations_between_cheap_integer_convs_are_predicted_no_faster_with_a_warning(tmp_path, caplog):
    path = tmp_path / "hard_swish_net.onnx"
    onnx.save(_hard_swish_net(), str(path))
    rng = np.random.default_rng(3)
    with caplog.at_level(logging.WARNING, logger="qcompiler"):
        result = qcompiler.compile(str(path), tmp_path / "w8a8", pipeline="w8a8", calibration=[_images(rng) for _ in range(4)],
                                   report=tmp_path / "report.json")
    kernels = _stats(result, "lower-ort")["kernels"]
    assert kernels["integer_kernels"] == 4 and kernels["float_kernels_behind_qdq"] == 0
    assert kernels["float_activations_behind_qdq_names"] == ["hswish0", "hswish1", "hswish2", "hswish3"]
    assert kernels["predicted_slower_than_float"]
    said = "predicted no faster than float: 4 float activations (hswish0, hswish1, hswish2, hswish3)"
    assert any(said in r.getMessage() for r in caplog.records)
    assert any(said in w for w in json.loads((tmp_path / "report.json").read_text())["warnings"])
