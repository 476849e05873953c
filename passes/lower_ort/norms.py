"""`lower-ort`'s rewrites of normalizations into the forms ONNX Runtime runs fastest: a residual Add
read by a LayerNormalization kept apart from it, an RMSNorm of a residual sum as one
`SkipSimplifiedLayerNormalization`, and the other RMSNorms written as the Div ONNX Runtime fuses."""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.ir import producer_of
from qcompiler.ir.layers import take_over
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
    for mul, x, inverse, root in _rms_normalizations(graph):
        div = ir.node("Div", [x, root], name=mul.name, metadata_props={CREATED_BY: "lower-ort"})
        ir.convenience.replace_nodes_and_values(graph, mul, [mul], [div], [mul.outputs[0]], [div.outputs[0]])
        reciprocal = inverse.producer()
        if not inverse.uses() and not inverse.is_graph_output():
            graph.remove(reciprocal, safe=True)
        count += 1
    return count


def rms_norms_with_skip(graph: ir.Graph) -> int:
    """`Mul(Mul(h, Reciprocal(Sqrt(mean(h^2) + eps))), gamma)` with `h = Add(a, b)` of two computed
    tensors of one shape [batch, sequence, hidden] (a decoder's residual sum) ->
    `com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma)`, whose fourth output is the sum
    the other readers of `h` (the next residual Add) take: one kernel for the seven ops. Its second
    and third outputs (mean and inverse std) are left absent (named ""), so it does not write them. The scale
    `gamma` is a constant vector [hidden] that the norm's output Mul alone reads. The replaced ops
    are left unread, for the caller to sweep. Returns the norms rewritten."""
    count = 0
    for mul, x, inverse, root in _rms_normalizations(graph):
        residual = producer_of(x, "Add")
        scale = _scale_after(mul, x.shape)
        if residual is None or scale is None or not _addends_of_shape(residual, x.shape) or not _over_last_axis(root):
            continue
        norm_mul, gamma = scale
        skip = ir.node("SkipSimplifiedLayerNormalization", [*residual.inputs, gamma], {"epsilon": _epsilon(root)},
                       domain="com.microsoft", num_outputs=4, name=f"{norm_mul.name or mul.name or x.name}.skip_norm",
                       metadata_props={CREATED_BY: "lower-ort"})
        for unused in skip.outputs[1:3]:  # mean and inverse std: absent, so the kernel does not write them
            unused.name = ""
        graph.insert_before(residual, skip)
        take_over(norm_mul.outputs[0], skip.outputs[0])
        take_over(x, skip.outputs[3])  # the old ops, now unread, go with the pass's sweep
        count += 1
    return count


def _rms_normalizations(graph: ir.Graph):
    """Each `Mul(x, Reciprocal(Sqrt(mean(x^2) + eps)))` of the graph, as (the Mul, x, the
    Reciprocal's output, the Sqrt's output); the graph may be rewritten between them."""
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
            continue
        found = [(x, inverse, root) for x, inverse in (mul.inputs, tuple(reversed(mul.inputs)))
                 if (root := rms_denominator(x, inverse)) is not None]
        if found:
            yield (mul, *found[0])


def _scale_after(mul: ir.Node, shape: ir.Shape | None) -> tuple[ir.Node, ir.Value] | None:
    """(the Mul by gamma, gamma) when the normalized value's only reader multiplies it by a constant
    vector as long as the last dim of `shape`, a known [batch, sequence, hidden]; else None."""
    out = mul.outputs[0]
    uses = list(out.uses())
    if shape is None or len(shape) != 3 or not isinstance(shape[-1], int) or out.is_graph_output() or len(uses) != 1 or \
            uses[0].node.op_type != "Mul" or uses[0].node.domain not in ("", "ai.onnx"):
        return None
    norm_mul = uses[0].node
    gamma = norm_mul.inputs[1 - uses[0].idx]
    constant = gamma.const_value if gamma is not None else None
    if constant is None or constant.shape != (shape[-1],):
        return None
    return norm_mul, gamma


def _addends_of_shape(add: ir.Node, shape: ir.Shape) -> bool:
    """Both addends computed and of the sum's shape (the kernel's input and skip: no broadcasting)."""
    return all(v is not None and v.const_value is None and v.shape == shape for v in add.inputs)


def _over_last_axis(root: ir.Value) -> bool:
    """Whether the mean under `root` (Sqrt(ReduceMean(x^2) + eps)) is over x's last axis only,
    dims kept, as the fused kernel normalizes (x is [batch, sequence, hidden] here; axes given as
    the constant input of opset 18 on)."""
    return mean_axes(root) in ([-1], [2])


def mean_axes(root: ir.Value) -> list[int] | None:
    """The axes of the mean under `root` (Sqrt(ReduceMean(x^2) + eps)), dims kept, given as the
    constant input of opset 18 on; None otherwise."""
    add = root.producer().inputs[0].producer()
    mean = next(m for v in add.inputs if (m := producer_of(v, "ReduceMean")) is not None)
    axes = mean.inputs[1].const_value if len(mean.inputs) > 1 and mean.inputs[1] is not None else None
    return axes.numpy().reshape(-1).tolist() if axes is not None and mean.attributes.get_int("keepdims", 1) == 1 else None


def _epsilon(root: ir.Value) -> float:
    add = root.producer().inputs[0].producer()
    eps = next(v for v in add.inputs if v is not None and v.const_value is not None)
    return float(eps.const_value.numpy())


def rms_denominator(x: ir.Value | None, inverse: ir.Value | None) -> ir.Value | None:
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
