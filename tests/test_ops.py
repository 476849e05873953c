"""The `qc` op registry: schema checks, op verifiers, reference execution inside a graph."""

import numpy as np
import pytest

from qcompiler.analysis import execute
from qcompiler.dialect import ops
from qcompiler.ir import VerificationError, parse, verify


def _scale_reference(x, scale=1.0):
    return (x * np.float32(scale),)


def _check_scale(node):
    if ops.attributes_of(node)["scale"] == 0:
        raise VerificationError(f"node '{node.name}': scale must not be zero")


@pytest.fixture(scope="module", autouse=True)
def scale_op():
    schema = ops.OpSchema(
        op_type="TestScale", inputs=("x",), outputs=("y",), attributes={"scale": ops.Attr("float", 1.0)},
        doc="y = x * scale", reference=_scale_reference, check=_check_scale,
    )
    ops.register(schema)
    yield schema
    ops._REGISTRY.pop("TestScale")


def _graph(attrs="<scale: float = 3.0>", inputs="X"):
    return parse(f"""
    <ir_version: 10, opset_import: ["" : 21, "qc" : 1]>
    g (float[2] X) => (float[2] Y)
    {{
      T = qc.TestScale {attrs} ({inputs})
      Y = Relu (T)
    }}
    """)


def test_reference_executor_runs_qc_ops():
    model = _graph()
    verify(model)
    out = execute.run(model, {"X": np.array([1.0, -2.0], np.float32)})["Y"]
    np.testing.assert_allclose(out, [3.0, 0.0])


def test_default_attribute_applies():
    out = execute.run(_graph(attrs=""), {"X": np.array([2.0, 1.0], np.float32)})["Y"]
    np.testing.assert_allclose(out, [2.0, 1.0])


@pytest.mark.parametrize(
    "attrs, inputs, message",
    [
        ("<scale: float = 0.0>", "X", "scale must not be zero"),
        ("<bits: int = 3>", "X", "unknown attribute 'bits'"),
        ("<scale: int = 3>", "X", "must be float"),
        ("", "X, X", "has 2 inputs"),
    ],
)
def test_verifier_rejects(attrs, inputs, message):
    with pytest.raises(VerificationError, match=message):
        verify(_graph(attrs, inputs))


def test_unknown_qc_op_is_rejected():
    model = parse("""
    <ir_version: 10, opset_import: ["" : 21, "qc" : 1]>
    g (float[2] X) => (float[2] Y) { Y = qc.Nope (X) }
    """)
    with pytest.raises(VerificationError, match="unknown op 'qc.Nope'"):
        verify(model)


def test_use_before_definition_is_rejected():
    model = parse("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2] X) => (float[2] Y) { Y = Relu (T)  T = Relu (X) }
    """)
    with pytest.raises(VerificationError, match="reads 'T' before it is defined"):
        verify(model)
