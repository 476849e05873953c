import numpy as np
import onnx_ir as ir

from qcompiler import execute
from qcompiler.ir import parse, to_text
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.probe import synthetic_inputs

SHARED_WEIGHT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 2] X) => (float[N, 2] Y, float[N, 2] Z)
<float[2,2] W = {1, 2, 3, 4}>
{
  Y = Gemm <transB = 1> (X, W)
  Z = MatMul (X, W)
}
"""


def test_second_run_changes_nothing(tiny_onnx):
    from qcompiler.ir import load

    model = load(tiny_onnx)
    assert CanonicalizePass()(model).modified
    text = to_text(model)
    result = CanonicalizePass()(model)
    assert not result.modified
    assert to_text(model) == text


def test_shared_weight_is_copied_not_changed():
    model = parse(SHARED_WEIGHT)
    feeds = synthetic_inputs(model)
    expected = execute.run(model, feeds)
    result = CanonicalizePass()(model)
    assert result.stats["gemm_to_matmul"] == 1
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    # The untouched MatMul still reads the original W; the Gemm's transposed copy is new.
    assert {"W", "W.kn"} <= set(model.graph.initializers)
    actual = execute.run(model, feeds)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6)


def test_graph_output_name_is_kept():
    model = parse(SHARED_WEIGHT)
    CanonicalizePass()(model)
    assert [v.name for v in model.graph.outputs] == ["Y", "Z"]
    assert isinstance(model.graph.outputs[0].producer(), ir.Node)
