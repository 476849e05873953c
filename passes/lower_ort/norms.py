"""`lower-ort`'s rewrites of normalizations into the forms ONNX Runtime runs fastest: a residual Add
read by a LayerNormalization kept apart from it, and RMSNorm written as the Div it fuses."""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.ir import producer_of
from qcompiler.ir.meta import CREATED_BY


def keep_residual_norms_apart(graph: ir.Graph) -> int:
    """`LayerNormalization(Add(a, b))` with a and b both computed -> `LayerNormalization(Sum(a, b))`
    (the same numbers; ONNX Runtime's SkipLayerNormalization fusion matches only Add)."""
    count = 0
    for norm in list(graph):
        if norm.op_type != "LayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or \
                any(v is None or v.const_value is not None for v in add.inputs):
            continue
        total = ir.node("Sum", list(add.inputs), name=add.name, metadata_props={CREATED_BY: "lower-ort"})
        ir.convenience.replace_nodes_and_values(graph, add, [add], [total], [add.outputs[0]], [total.outputs[0]])
        count += 1
    return count


def rms_norms_as_div(graph: ir.Graph) -> int:
    """`Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps))))` -> `Div(x, Sqrt(...))`: the
    pattern ONNX Runtime's optimizer fuses into one `SimplifiedLayerNormalization` (with the
    following scale `Mul`); the optimizer does not match the Reciprocal form torch's `rsqrt` exports.
    A Reciprocal that is a graph output or has other readers stays."""
    count = 0
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
            continue
        found = [(x, inverse, root) for x, inverse in (mul.inputs, tuple(reversed(mul.inputs)))
                 if (root := _rms_denominator(x, inverse)) is not None]
        if not found:
            continue
        x, inverse, root = found[0]
        div = ir.node("Div", [x, root], name=mul.name, metadata_props={CREATED_BY: "lower-ort"})
        ir.convenience.replace_nodes_and_values(graph, mul, [mul], [div], [mul.outputs[0]], [div.outputs[0]])
        reciprocal = inverse.producer()
        if not inverse.uses() and not inverse.is_graph_output():
            graph.remove(reciprocal, safe=True)
        count += 1
    return count


def _rms_denominator(x: ir.Value | None, inverse: ir.Value | None) -> ir.Value | None:
    """Sqrt(mean(x^2) + eps) when `inverse` is its Reciprocal, of the same `x`; else None."""
    reciprocal = producer_of(inverse, "Reciprocal")
    root = producer_of(reciprocal.inputs[0], "Sqrt") if reciprocal else None
    add = producer_of(root.inputs[0], "Add") if root else None
    if add is None:
        return None
    for mean_value, eps in (add.inputs, reversed(add.inputs)):
        mean = producer_of(mean_value, "ReduceMean")
        power = producer_of(mean.inputs[0], "Pow") if mean else None
        if power is not None and eps is not None and eps.const_value is not None and power.inputs[0] is x \
                and power.inputs[1].const_value is not None and float(power.inputs[1].const_value.numpy()) == 2.0:
            return root.outputs[0]
    return None
