"""Reading ONNX files: conversion to the target opset and one-line errors for bad input."""

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from qcompiler.analysis import execute
from qcompiler.errors import UserError
from qcompiler.ir import TARGET_OPSET, load


def test_old_opset_is_converted(tiny_onnx):
    model = load(tiny_onnx)
    assert model.opset_imports[""] == TARGET_OPSET
    x = np.ones((2, 4), np.float32)
    w = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    expected = np.maximum(0.5 * x @ w.T + [0.5, 1.5, 2.5], 0)
    np.testing.assert_allclose(execute.run(model, {"X": x})["Y"], expected, rtol=1e-6)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "none.onnx")


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        load(tmp_path / "e.onnx")


def test_truncated_file(tiny_onnx, tmp_path):
    data = tiny_onnx.read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load(tmp_path / "t.onnx")


def test_not_onnx(tmp_path):
    (tmp_path / "n.onnx").write_text("hello, this is text\n" * 10)
    with pytest.raises(UserError, match="not a readable ONNX model|holds no ONNX graph"):
        load(tmp_path / "n.onnx")


def test_unknown_domain(tmp_path):
    node = oh.make_node("Frobnicate", ["X"], ["Y"], domain="com.example")
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("X", 1, [2])], [oh.make_tensor_value_info("Y", 1, [2])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "u.onnx")
    with pytest.raises(UserError, match="unknown domain 'com.example'"):
        load(tmp_path / "u.onnx")


def _external_model(tmp_path, location):
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    node = oh.make_node("MatMul", ["X", "W"], ["Y"])
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("X", 1, [1, 4])], [oh.make_tensor_value_info("Y", 1, [1, 4])], [weight])
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir()
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), path)
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "ABSOLUTE"])
def test_external_data_outside_folder_is_refused(tmp_path, location):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(16, np.float32).tobytes())
    path = _external_model(tmp_path, str(secret) if location == "ABSOLUTE" else location)
    with pytest.raises(UserError, match="outside the model's folder"):
        load(path)


def test_external_data_beside_model_loads(tmp_path):
    path = _external_model(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(np.full(16, 2, np.float32).tobytes())
    model = load(path)
    out = execute.run(model, {"X": np.ones((1, 4), np.float32)})["Y"]
    np.testing.assert_allclose(out, np.full((1, 4), 8.0))


def test_type_inference_limits_inside_function_bodies_are_not_refused(tmp_path):
    """onnx's strict inference fails inside MeanVarianceNormalization's own function body; ONNX
    Runtime runs the op, so the model loads."""
    node = oh.make_node("MeanVarianceNormalization", ["X"], ["Y"])
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("X", 1, [3, 3, 3, 1])], [oh.make_tensor_value_info("Y", 1, [3, 3, 3, 1])])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), tmp_path / "mvn.onnx")
    assert [n.op_type for n in load(tmp_path / "mvn.onnx").graph] == ["MeanVarianceNormalization"]


def test_ill_typed_model_is_refused(tmp_path):
    node = oh.make_node("MatMul", ["X", "W"], ["Y"])
    weight = onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "W")
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("X", 1, ["N", 4])], [oh.make_tensor_value_info("Y", 1, None)], [weight])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), tmp_path / "m.onnx")
    with pytest.raises(UserError, match="not well typed.*MatMul"):
        load(tmp_path / "m.onnx")


def _two_free_dims(tmp_path, dims):
    import onnx.helper as oh

    rng = np.random.default_rng(0)
    weight = oh.make_tensor("w", onnx.TensorProto.FLOAT, [8, 3], rng.normal(size=24).astype(np.float32).tolist())
    nodes = [
        oh.make_node("Constant", [], ["w"], value=weight),
        oh.make_node("MatMul", ["x", "w"], ["h"]),
        oh.make_node("Add", ["h", "y"], ["z"]),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims + [8]),
                                       oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims + [3])],
                          [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, dims + [3])])
    path = tmp_path / "m.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def _symbols(value):
    return [d if isinstance(d, int) else d.value for d in value.shape]


def test_minus_one_and_unnamed_dims_are_free_dims_of_their_own(tmp_path):
    model = load(_two_free_dims(tmp_path, [-1, None]))
    x, y = model.graph.inputs
    assert _symbols(x) == ["x_dim0", "x_dim1", 8] and _symbols(y) == ["y_dim0", "y_dim1", 3]
    # each its own symbol: calibration rows of different lengths per input are accepted
    from qcompiler.analysis.calib_data import validate_batches

    validate_batches([{"x": np.ones((2, 5, 8), np.float32), "y": np.ones((3, 1, 3), np.float32)}], model)


def test_constant_weights_are_initializers_and_counted(tmp_path):
    from qcompiler.ir import weight_count

    path = _two_free_dims(tmp_path, ["n"])
    model = load(path)
    assert "w" in model.graph.initializers and not any(n.op_type == "Constant" for n in model.graph)
    assert weight_count(model) == 24


def test_show_elides_constant_weights(tmp_path, capsys):
    import onnx.helper as oh
    from qcompiler.tools.cli import main

    big = oh.make_tensor("w", onnx.TensorProto.FLOAT, [64, 8], np.arange(512, dtype=np.float32).tolist())
    graph = oh.make_graph([oh.make_node("Constant", [], ["w"], value=big), oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])])
    path = tmp_path / "big.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), str(path))
    assert main(["show", str(path)]) == 0
    text = capsys.readouterr().out
    assert "511" not in text and "# elided" in text


def test_compile_of_constant_weights_and_minus_one_dims_has_finite_effective_bits(tmp_path):
    import math

    import qcompiler

    path = _two_free_dims(tmp_path, [-1])
    rng = np.random.default_rng(1)
    calib = [{"x": rng.normal(size=(4, 8)).astype(np.float32), "y": rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(3)]
    result = qcompiler.compile(str(path), tmp_path / "out", pipeline="w8a8", calibration=calib)
    assert result.manifest["source"]["weights"] == 24
    assert math.isfinite(result.manifest["effective_bits_per_weight"])
    assert result.probe.source == "calibration-held-apart"


def test_weights_listed_as_inputs_below_ir_4_stay_weights(tmp_path):
    """Below IR 4 every initializer had to be a graph input too; raised to IR 10 such an input would
    be an overridable default that nothing folds (a classifier whose weight is reshaped by one stayed
    float). Loading drops those listings: the model's inputs are its data, the Reshape folds."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (1, 1, 4, 8)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("Reshape", ["W", "shape"], ["w2"]), oh.make_node("Gemm", ["X", "w2"], ["Y"], transB=1)], "g",
        [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 8]), oh.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [1, 1, 4, 8]),
         oh.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2])],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(np.array([4, 8], np.int64), "shape")])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 11)], ir_version=3)
    path = tmp_path / "legacy.onnx"
    onnx.save(proto, str(path))
    model = load(path)
    assert [v.name for v in model.graph.inputs] == ["X"]
    x = rng.normal(0, 1, (2, 8)).astype(np.float32)
    np.testing.assert_allclose(execute.run(model, {"X": x})["Y"], x @ w.reshape(4, 8).T, rtol=1e-5, atol=1e-5)
    from qcompiler.pipeline.pass_manager import run_pipeline
    from qcompiler.pipeline.spec import parse_pipeline

    run_pipeline(model, parse_pipeline("canonicalize"))
    assert [n.op_type for n in model.graph] == ["MatMul"]
