"""The text form: deterministic, parseable, large weights elided to shape + hash."""

import numpy as np
import onnx_ir as ir
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qcompiler.ir import ELIDE_ELEMENTS, parse, to_text

SMALL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 2] X) => (float[N, 2] Y)
<float[2,2] W = {1, 2, 3, 4}>
{
  Y = MatMul (X, W)
}
"""

EXPECTED_SMALL = """# qcompiler-ir 1
<
   ir_version: 10,
   opset_import: ["" : 21]
>
g (float[N,2] X) => (float[N,2] Y) 
   <float[2,2] W =  {1,2,3,4}>
{
   Y = MatMul (X, W)
}
"""


def _model_with_big_weight(name="W"):
    x = ir.Value(name="X", shape=ir.Shape(["N", 16]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name=name, const_value=ir.tensor(np.arange(16 * 8, dtype=np.float32).reshape(16, 8), name=name))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name = "Y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(["N", 8])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10)


def test_small_model_prints_exactly():
    assert to_text(parse(SMALL)) == EXPECTED_SMALL


def test_text_round_trips():
    text = to_text(parse(SMALL))
    assert to_text(parse(text)) == text


def test_large_weight_is_elided_to_shape_and_hash():
    text = to_text(_model_with_big_weight())
    assert 16 * 8 > ELIDE_ELEMENTS
    header = [line for line in text.splitlines() if line.startswith("# elided")]
    assert len(header) == 1
    assert header[0].startswith('# elided float[16,8] "W" sha256:')
    assert "127" not in text  # no weight values printed


def test_float16_weights_are_elided_whatever_their_size_and_a_lower_bound_elides_more():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float16[N, 2] X) => (float16[N, 2] Y, float[N, 3] Z)
    <float16[2] S = {15360, 16384}, float[2,3] W = {1, 2, 3, 4, 5, 6}>
    { Y = Mul (X, S)
      X32 = Cast <to: int = 1> (X)
      Z = MatMul (X32, W) }""")
    text = to_text(model)
    assert '# elided float16[2] "S" sha256:' in text and "15360" not in text  # raw bits: no reader could check them
    assert "float[2,3] W =  {1,2,3,4,5,6}" in text
    assert '# elided float[2,3] "W" sha256:' in to_text(model, elide_over=4)
    full = to_text(model, elide_over=None)
    assert "# elided" not in full and "{15360,16384}" in full


def test_hash_changes_with_content():
    a = to_text(_model_with_big_weight())
    model = _model_with_big_weight()
    w = model.graph.initializers["W"]
    w.const_value = ir.tensor(w.const_value.numpy() + 1, name="W")
    assert to_text(model) != a


def test_elided_weight_parses_back_as_zeros_of_its_shape():
    model = parse(to_text(_model_with_big_weight()))
    w = model.graph.initializers["W"].const_value.numpy()
    assert w.shape == (16, 8) and w.dtype == np.float32 and not w.any()


def test_hostile_names_round_trip():
    name = 'w"\nimport os; os.system("x")\\'
    text = to_text(_model_with_big_weight(name))
    assert "\nimport os" not in text
    model = parse(text)
    assert name in model.graph.initializers


def _model_with_names(weight: str, source: str, node: str, big: bool):
    """X -> MatMul(X, weight) named `node` -> Y, with `source` as the input's name. The weight is
    zeros, which is what an elided weight parses back as."""
    rows = 16 if big else 2
    x = ir.Value(name=source, shape=ir.Shape(["N", rows]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name=weight, const_value=ir.tensor(np.zeros((rows, 8), np.float32), name=weight))
    mm = ir.node("MatMul", [x, w], name=node)
    mm.outputs[0].name = "Y"
    mm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], mm.outputs, nodes=[mm], initializers=[w], opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10)


LINE_BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_line_breaking_characters_are_escaped():
    name = "w" + "".join(LINE_BREAKS) + "\x00\x07\u202e\ue000\\n\\u2028\""
    text = to_text(_model_with_names(name, "X", "mm", big=True))
    assert text.splitlines() == text.split("\n")[:-1]  # no character but "\n" ends a line
    assert not any(ch in text for ch in LINE_BREAKS[1:] + ["\x00", "\u202e", "\ue000"])
    model = parse(text)
    assert name in model.graph.initializers


names = st.text(min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weight=names, source=names, node=names, big=st.booleans())
def test_any_names_round_trip(weight, source, node, big):
    assume(len({weight, source, "Y"}) == 3)
    text = to_text(_model_with_names(weight, source, node, big))
    assert text.splitlines() == text.split("\n")[:-1]
    model = parse(text)
    assert list(model.graph.initializers) == [weight]
    assert [v.name for v in model.graph.inputs] == [source]
    assert [n.name for n in model.graph] == [node]
    assert [v.name for v in model.graph.node(0).inputs] == [source, weight]
    assert to_text(model) == text
