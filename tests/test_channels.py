"""`qcompiler.analysis.channels`: following an activation's channels back to the linears that produce them."""

import pytest

from qcompiler.analysis.channels import NotChannelwise, channel_region
from qcompiler.ir import parse

GATED = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4] X, float L) => (float[N, 2] Y)
<float[4,3] Wg = {1,2,3,4,5,6,7,8,9,10,11,12}, float[4,3] Wu = {1,2,3,4,5,6,7,8,9,10,11,12},
 float[3] B = {1,2,3}, float[3,2] Wd = {1,2,3,4,5,6}, float Lo = {0}, float Hi = {6},
 float[N,3] G, float[N,3] Gb, float[N,3] S, float[N,3] A, float[N,3] U, float[N,3] C, float[N,3] H>
{
  G = MatMul (X, Wg)
  Gb = Add (G, B)
  S = Sigmoid (Gb)
  A = Mul (Gb, S)
  U = MatMul (X, Wu)
  C = Clip (U, Lo, %s)
  H = Mul (A, C)
  Y = MatMul (H, Wd)
}"""


def _value(model, name):
    return next(out for node in model.graph for out in node.outputs if out.name == name)


def test_gated_mlp_region_has_both_linears_and_the_bias():
    model = parse(GATED % "Hi")
    region = channel_region(model.graph, _value(model, "H"), 3)
    assert sorted(n.outputs[0].name for n in region.linears) == ["G", "U"]
    assert [(node.op_type, index) for node, index in region.constants] == [("Add", 1)]
    assert {v.name for v in region.values} == {"H", "A", "C", "U", "Gb", "S", "G"}


def test_a_computed_clip_bound_or_an_outside_reader_is_refused():
    model = parse(GATED % "L")
    with pytest.raises(NotChannelwise, match="computed parameter"):
        channel_region(model.graph, _value(model, "H"), 3)
    model = parse((GATED % "Hi").replace("float[N, 2] Y)", "float[N, 2] Y, float[N, 3] S)"))
    with pytest.raises(NotChannelwise, match="graph input or output"):
        channel_region(model.graph, _value(model, "H"), 3)
