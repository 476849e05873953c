import numpy as np
import onnx_ir as ir

from qcompiler.analysis import execute
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.ir import parse, to_text
from qcompiler.passes.canonicalize import CanonicalizePass

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


TIED_OUTPUT = """
<ir_version: 10, opset_import: ["" : 21]>
g (int64[N] ids) => (float[N, 4] logits)
<float[4,3] emb = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}>
{
  h = Gather (emb, ids)
  val_7 = Transpose <perm = [1, 0]> (emb)
  logits = MatMul (h, val_7)
}
"""


def test_folded_weight_is_named_after_its_module():
    from qcompiler.driver.capture import SCOPE_KEY

    model = parse(TIED_OUTPUT)
    matmul = [n for n in model.graph if n.op_type == "MatMul"][0]
    matmul.metadata_props[SCOPE_KEY] = "lm_head"  # what capture records from torch's module path
    model.graph.initializers["emb"].name = "lm_head.weight"  # the tied parameter keeps the module's name
    result = CanonicalizePass()(model)
    assert result.stats["weights_named_after_modules"] == 1
    assert matmul.inputs[1].name == "lm_head.matmul.weight"
    assert matmul.inputs[1].shape == ir.Shape([3, 4])
