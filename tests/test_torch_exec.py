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
