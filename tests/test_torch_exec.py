"""The block interpreter (`qcompiler.analysis.torch_exec`) against ONNX Runtime, one node at a time:
the ops that `flexround`, `tune-scales` and `gptq` meet in public conv nets (BatchNormalization left
unfolded, LRN, InstanceNormalization, the ReLU variants), slices with steps (a pairwise rotation's) and
a mixture of experts' routing (TopK, ScatterElements)."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler.analysis.torch_exec import Constants, run_nodes, unsupported_ops

RNG = np.random.default_rng(3)
X = RNG.standard_normal((2, 6, 5, 4)).astype(np.float32)
C = X.shape[1]


def _positive(n):
    return (RNG.random(n) + 0.5).astype(np.float32)


def _model(op, attrs, consts):
    names = ["x"] + [f"c{i}" for i in range(len(consts))]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(consts)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


CASES = {
    "BatchNormalization": ({"epsilon": 1e-3}, [_positive(C), RNG.standard_normal(C).astype(np.float32),
                                               RNG.standard_normal(C).astype(np.float32), _positive(C)]),
    "InstanceNormalization": ({"epsilon": 1e-4}, [_positive(C), RNG.standard_normal(C).astype(np.float32)]),
    "LRN": ({"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 2.0}, []),  # ONNX Runtime runs odd sizes only
    "LeakyRelu": ({"alpha": 0.1}, []),
    "PRelu": ({}, [RNG.standard_normal((C, 1, 1)).astype(np.float32)]),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, []),
    "HardSwish": ({}, []),
    "AveragePool": ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]}, []),  # uneven pads, not counted
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_op_computes_what_onnx_runtime_computes(case):
    attrs, consts = CASES[case]
    proto = _model(case, attrs, consts)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    model = ir.serde.deserialize_model(proto)
    nodes = list(model.graph)
    assert unsupported_ops(nodes) == []
    env = run_nodes(nodes, {"x": torch.from_numpy(X)}, lambda node: None, Constants())
    np.testing.assert_allclose(env["y"].numpy(), expected, rtol=1e-5, atol=1e-5)


def _ints(*values):
    return np.array(values, np.int64)


@pytest.mark.parametrize("starts, ends, axes, steps", [
    (_ints(1), _ints(2**62), _ints(-1), _ints(2)),  # x[..., 1::2], a pairwise rotation's odd values
    (_ints(0, 1), _ints(6, 4), _ints(1, 2), _ints(3, 2)),
    (_ints(-1), _ints(-2**63), _ints(1), _ints(-1)),  # reversed
    (_ints(4, 10), _ints(0, -10), _ints(1, 3), _ints(-2, -1)),  # backward on two axes, clamped
    (_ints(2), _ints(0), _ints(2), _ints(1)),  # empty
    (_ints(0), _ints(4), _ints(1), _ints(-2)),  # empty, backward: the start is not past the end
])
def test_slices_with_steps_take_what_onnx_runtime_takes(starts, ends, axes, steps):
    proto = _model("Slice", {}, [starts, ends, axes, steps])
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    env = run_nodes(list(ir.serde.deserialize_model(proto).graph), {"x": torch.from_numpy(X)}, lambda node: None, Constants())
    assert env["y"].shape == expected.shape
    np.testing.assert_array_equal(env["y"].numpy(), expected)


def test_top_k_then_scatter_elements_take_what_onnx_runtime_takes():
    """A mixture of experts' routing: the 2 best of each row's scores (values and indices), written back into
    a zero row at those indices, counted from the end (negative)."""
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1),
             helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("Sub", ["indices", "four"], ["back"]),  # the same places, counted from the end
             helper.make_node("ScatterElements", ["zeros", "back", "values"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
                              [numpy_helper.from_array(_ints(2), "k"), numpy_helper.from_array(_ints(*X.shape), "shape"),
                               numpy_helper.from_array(_ints(X.shape[-1]), "four")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})
    nodes = list(ir.serde.deserialize_model(proto).graph)
    assert unsupported_ops(nodes) == []
    env = run_nodes(nodes, {"x": torch.from_numpy(X)}, lambda node: None, Constants())
    np.testing.assert_array_equal(env["indices"].numpy(), expected[1])
    np.testing.assert_array_equal(env["y"].numpy(), expected[0])


def test_batch_normalization_in_training_mode_is_refused_by_name():
    attrs, consts = CASES["BatchNormalization"]
    proto = _model("BatchNormalization", {**attrs, "training_mode": 1}, consts)
    nodes = list(ir.serde.deserialize_model(proto).graph)
    with pytest.raises(NotImplementedError, match="BatchNormalization in training mode"):
        run_nodes(nodes, {"x": torch.from_numpy(X)}, lambda node: None, Constants())


I64 = np.array  # readability: integer operands below are int64 arrays
SCORES = np.array([[0.5, np.nan, -np.inf, 2.0], [np.inf, 1.0, 1.0, -3.0]], np.float32)
TOKENS = np.array([[5, 1, 7, 1, 1], [2, 9, 1, 4, 4]], np.int64)
MASK_OPS = {  # op, attributes, operands (the first is the graph input), outputs: what encoder exports compute masks with
    "IsNaN": ("IsNaN", {}, [SCORES], 1),
    "IsInf, negative only": ("IsInf", {"detect_positive": 0}, [SCORES], 1),
    "CumSum of a padding mask, exclusive and reversed": ("CumSum", {"exclusive": 1, "reverse": 1}, [TOKENS, I64(1)], 1),
    "CumSum along the first axis": ("CumSum", {}, [X, I64(-4)], 1),
    "CumSum, exclusive, past an infinity": ("CumSum", {"exclusive": 1}, [np.array([1, np.inf, 2, 1e20, 3], np.float32), I64(0)], 1),
    "GatherElements, negative indices": ("GatherElements", {"axis": 1}, [X, I64(np.tile([[[[0]], [[-1]], [[2]]]], (2, 1, 5, 4)))], 1),
    "GatherND": ("GatherND", {}, [X, I64([[[0, 5], [1, -1]], [[1, 0], [0, 2]]])], 1),
    "GatherND with a batch axis": ("GatherND", {"batch_dims": 1}, [X, I64([[[3, 1]], [[0, 4]]])], 1),
    "Split by sizes": ("Split", {"axis": 1}, [X, I64([1, 2, 3])], 3),
    "Split in equal parts": ("Split", {"axis": -1, "num_outputs": 2}, [X], 2),
    "Split in parts, the last empty": ("Split", {"axis": 1, "num_outputs": 4}, [X], 4),
    "ArgMax, last index": ("ArgMax", {"axis": 1, "select_last_index": 1}, [SCORES[:, 1:3]], 1),
    "ArgMin without the axis": ("ArgMin", {"axis": -1, "keepdims": 0}, [X], 1),
    "Einsum": ("Einsum", {"equation": "bchw,bdhw->bcd"}, [X, X[:, :3]], 1),
    "Size": ("Size", {}, [X], 1),
    "Round, halves to even": ("Round", {}, [np.array([-2.5, -1.5, 0.5, 1.5, 2.4], np.float32)], 1),
    "ReduceMin": ("ReduceMin", {"keepdims": 0}, [X, I64([1, -1])], 1),
    "LogSoftmax": ("LogSoftmax", {"axis": 1}, [X], 1),
    "Selu": ("Selu", {}, [X], 1),
    "Mish": ("Mish", {}, [X], 1),
    "Gather of one scalar index (a dim of a shape)": ("Gather", {"axis": 0}, [I64([2, 6, 5, 4]), I64(2)], 1),
    "ConstantOfShape of int64 ones": ("ConstantOfShape", {"value": numpy_helper.from_array(I64([1]))}, [I64([2, 3])], 1),
}


@pytest.mark.parametrize("case", list(MASK_OPS))
def test_mask_and_position_ops_compute_what_onnx_runtime_computes(case):
    op, attrs, operands, outputs = MASK_OPS[case]
    first, consts = np.asarray(operands[0]), [np.asarray(c) for c in operands[1:]]
    names = ["x"] + [f"c{i}" for i in range(len(consts))]
    out = [f"y{i}" for i in range(outputs)]
    graph = helper.make_graph([helper.make_node(op, names, out, **attrs)], "g",
                              [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(first.dtype), first.shape)],
                              [helper.make_empty_tensor_value_info(y) for y in out],
                              [numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(consts)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": first})
    nodes = list(ir.serde.deserialize_model(proto).graph)
    assert unsupported_ops(nodes) == []
    env = run_nodes(nodes, {"x": torch.from_numpy(first)}, lambda node: None, Constants())
    for name, want in zip(out, expected):
        got = env[name].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


F32 = np.float32
RESIZES = {  # attributes, scales, sizes: the upsampling of segmentation and depth heads (x is [2, 6, 5, 4])
    "linear, half_pixel, to sizes": ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, None, I64([2, 6, 10, 7])),
    "linear, half_pixel, by scales": ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, F32([1, 1, 2.5, 0.5]), None),
    "linear, align_corners": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, I64([2, 6, 9, 9])),
    "nearest, asymmetric, floor": ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                                   F32([1, 1, 2, 3]), None),
    "cubic, half_pixel": ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel"}, None, I64([2, 6, 8, 8])),
}


@pytest.mark.parametrize("case", list(RESIZES))
def test_resizes_compute_what_onnx_runtime_computes(case):
    attrs, scales, sizes = RESIZES[case]
    consts = [numpy_helper.from_array(scales, "scales")] if scales is not None else [numpy_helper.from_array(sizes, "sizes")]
    inputs = ["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"]
    graph = helper.make_graph([helper.make_node("Resize", inputs, ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    nodes = list(ir.serde.deserialize_model(proto).graph)
    assert unsupported_ops(nodes) == []
    got = run_nodes(nodes, {"x": torch.from_numpy(X)}, lambda node: None, Constants())["y"].numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_resize_the_rule_cannot_compute_is_named():
    """Modes torch's interpolate computes otherwise are refused by name, so that unsupported=skip steps aside."""
    nodes = list(ir.serde.deserialize_model(helper.make_model(helper.make_graph(
        [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest", coordinate_transformation_mode="half_pixel")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(I64([2, 6, 10, 8]), "sizes")]), opset_imports=[helper.make_opsetid("", 19)])).graph)
    assert unsupported_ops(nodes) == ["Resize(mode=nearest coordinate_transformation_mode=half_pixel)"]
    with pytest.raises(NotImplementedError, match="Resize with mode=nearest"):
        run_nodes(nodes, {"x": torch.from_numpy(X)}, lambda node: None, Constants())


@pytest.mark.parametrize("sizes, rank, refused", [
    (I64([2, 3, 10, 8]), 4, "Resize(batch or channel axis resized)"),  # channels 6 -> 3
    (I64([12, 9]), 2, "Resize(nearest mode on a rank-2 input)"),
])
def test_resizes_outside_the_rule_are_named_before_anything_runs(sizes, rank, refused):
    shape = X.shape if rank == 4 else (6, 5)
    nodes = list(ir.serde.deserialize_model(helper.make_model(helper.make_graph(
        [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(sizes, "sizes")]), opset_imports=[helper.make_opsetid("", 19)])).graph)
    assert unsupported_ops(nodes) == [refused]


def test_attributes_a_rule_refuses_are_named_before_anything_runs():
    """unsupported_ops names what run_nodes would raise on, so that a pass can step aside first."""
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER"),
         helper.make_node("Pad", ["c", "p"], ["y"], mode="reflect"),
         helper.make_node("Cast", ["y"], ["z"], to=TensorProto.STRING)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)], [helper.make_tensor_value_info("z", TensorProto.STRING, None)],
        [numpy_helper.from_array(RNG.standard_normal((3, C, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "p")]),
        opset_imports=[helper.make_opsetid("", 21)])
    nodes = list(ir.serde.deserialize_model(proto).graph)
    assert unsupported_ops(nodes) == ["Cast(to=8)", "Conv(auto_pad)", "Pad(reflect mode on the batch or channel axis)"]


def test_a_reflect_pad_of_amounts_computed_at_run_time_is_run_on_the_axes_they_name():
    """FFDNet pads its image to even sizes with amounts computed from its shape: not refused before the
    run; run as ONNX pads it, and a computed amount on the channel axis still refused by name then."""
    from qcompiler import parse
    from qcompiler.analysis import execute

    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[1, 2, 5, 7] X, int64[4] A) => (float[1, 2, 6, 8] Y)
    <int64[4] Z = {0, 0, 0, 0}>
    { P = Concat <axis: int = 0> (Z, A)
      Y = Pad <mode: string = "reflect"> (X, P) }""")
    assert unsupported_ops(list(model.graph)) == []
    feeds = {"X": RNG.standard_normal((1, 2, 5, 7)).astype(np.float32), "A": np.array([0, 0, 1, 1], np.int64)}
    got = run_nodes(list(model.graph), {k: torch.from_numpy(v) for k, v in feeds.items()}, lambda n: None, Constants())["Y"]
    np.testing.assert_array_equal(got.numpy(), execute.run(model, feeds)["Y"])
    with pytest.raises(NotImplementedError, match="pads only spatial axes in reflect mode"):
        run_nodes(list(model.graph), {"X": torch.from_numpy(feeds["X"]), "A": torch.tensor([1, 0, 0, 0])}, lambda n: None, Constants())
