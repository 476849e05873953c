"""`fold-permutation`: fold the input-channel permutation of each `qc.MixedMatMul` into the
producers of its input, where that is exact, so the layer reads its bit classes as contiguous
slices instead of gathering columns.

`qc.MixedMatMul(X, perm, ...)` computes `X[..., perm] @ W`. When X is computed, channel by channel
along its last axis, from the outputs of linears with constant weights, through elementwise ops
only (the gated MLP: `down(silu(gate(x)) * up(x))`; BERT's `output(gelu(intermediate(x) + b))`),
and nothing else reads those values, the producers can emit their channels already in `perm`
order:
- a MatMul with a constant weight W [K', K]: W[:, perm];
- a `qc.MixedMatMul`: its output columns (every class array's column axis, codebook rows, the
  sparse outliers' column indices);
- a constant operand of an elementwise op whose last axis has K entries (a bias, a per-channel
  scale): c[..., perm]; scalars and size-1 axes are unchanged;
then `perm` becomes the identity. Elementwise ops commute with a permutation of the channel axis,
so the graph computes the same numbers.

Not folded (the Gather stays, counted in the statistics with the reason): an input read by other
layers (Q/K/V share one; each has its own permutation), by a residual connection or a
normalisation (LayerNorm's and RMSNorm's output feed the residual stream or several layers in the
models here), a graph input, or anything that mixes channels (attention, reshapes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.layers import set_constant
from qcompiler.mixed_ops import INPUTS_PER_KIND, class_slices
from qcompiler.ops import attributes_of
from qcompiler.passbase import Pass, PassResult, register_pass

UNARY = frozenset({"Sigmoid", "Tanh", "Erf", "Relu", "Neg", "Abs", "Sqrt", "Exp", "Log", "Gelu", "Softplus",
                   "Softsign", "Reciprocal", "Identity", "Elu", "Selu", "LeakyRelu", "HardSigmoid", "HardSwish",
                   "Mish", "Celu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign"})
BINARY = frozenset({"Mul", "Add", "Sub", "Div", "Pow", "Max", "Min"})


class _NotFoldable(Exception):
    pass


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldPermutationPass(Pass):
    """Fold each mixed-precision layer's channel permutation into the linears that produce its input (exact)."""

    name = "fold-permutation"
    required = frozenset({"weights-quantized"})
    provided = frozenset({"permutation-folded"})

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        folded, kept = [], {}
        for node in list(graph):
            if node.domain != "qc" or node.op_type != "MixedMatMul":
                continue
            perm = node.inputs[1].const_value.numpy().astype(np.int64)
            if np.array_equal(perm, np.arange(len(perm))):
                continue
            name = node.name or node.outputs[0].name
            try:
                plan = _plan(graph, node, len(perm))
            except _NotFoldable as reason:
                kept[name] = str(reason)
                continue
            _apply(graph, node, plan, perm)
            folded.append(name)
        stats = {"folded": len(folded), "kept": len(kept), "folded_layers": folded, "kept_layers": kept}
        return PassResult(model, bool(folded), stats)


@dataclasses.dataclass
class _Plan:
    leaves: list[ir.Node]  # linears whose output columns are permuted
    constants: list[tuple[ir.Node, int]]  # (elementwise node, input index) with a per-channel constant
    inside: set  # nodes whose outputs only the closure reads


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None


def _last_dim(value: ir.Value):
    shape = value.shape if value.shape is not None else (value.const_value.shape if value.const_value is not None else None)
    if shape is None or len(shape) == 0:
        return None if shape is None else 1
    return shape[len(shape) - 1] if isinstance(shape[len(shape) - 1], int) else None


def _plan(graph: ir.Graph, consumer: ir.Node, k: int) -> _Plan:
    leaves, constants, inside = [], [], set()
    stack, seen = [consumer.inputs[0]], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        if producer is None or value in graph.outputs:
            raise _NotFoldable("the input is a graph input or output")
        op = producer.op_type
        if producer.domain in ("", "ai.onnx") and op == "MatMul" and _is_constant(producer.inputs[1]) \
                and len(producer.inputs[1].const_value.shape) == 2 and producer.inputs[1].const_value.shape[1] == k:
            leaves.append(producer)
        elif producer.domain == "qc" and op == "MixedMatMul":
            leaves.append(producer)
        elif producer.domain in ("", "ai.onnx") and op in UNARY:
            stack.append(producer.inputs[0])
        elif producer.domain in ("", "ai.onnx") and op in BINARY:
            for index, inp in enumerate(producer.inputs):
                if _is_constant(inp):
                    last = _last_dim(inp)
                    if last == k and len(inp.const_value.shape) >= 1:
                        constants.append((producer, index))
                    elif last != 1:
                        raise _NotFoldable(f"'{producer.name}' ({op}) has a constant operand that is not per-channel")
                elif _last_dim(inp) == k:
                    stack.append(inp)
                else:
                    raise _NotFoldable(f"'{producer.name}' ({op}) broadcasts along the channel axis or has no static shape")
        else:
            raise _NotFoldable(f"the input comes from '{producer.name}' ({producer.domain + '.' if producer.domain else ''}{op}), "
                               "which mixes channels or is shared")
        inside.add(producer)
    for node in inside:
        for out in node.outputs:
            if out in graph.outputs or any(use.node is not consumer and use.node not in inside for use in out.uses()):
                raise _NotFoldable(f"'{node.name}' ({node.op_type}) is also read outside this layer's input")
    return _Plan(leaves, constants, inside)


def _apply(graph: ir.Graph, consumer: ir.Node, plan: _Plan, perm: np.ndarray) -> None:
    for leaf in plan.leaves:
        if leaf.op_type == "MatMul":
            w = leaf.inputs[1].const_value.numpy()
            set_constant(graph, leaf.inputs[1], np.ascontiguousarray(w[:, perm]), leaf, "permuted")
        else:
            _permute_mixed_outputs(graph, leaf, perm)
    for node, index in plan.constants:
        c = node.inputs[index].const_value.numpy()
        set_constant(graph, node.inputs[index], np.ascontiguousarray(c[..., perm]), node, "permuted")
    set_constant(graph, consumer.inputs[1], np.arange(len(perm), dtype=np.int64), consumer, "folded")


def _permute_mixed_outputs(graph: ir.Graph, node: ir.Node, perm: np.ndarray) -> None:
    """A qc.MixedMatMul whose output column j is its former column perm[j]."""
    a = attributes_of(node)
    for kind, index, _, _ in class_slices(a["kinds"], a["sizes"]):
        for offset in range(INPUTS_PER_KIND[kind]):
            slot = 2 + index + offset
            array = node.inputs[slot].const_value.numpy()
            axis = 0 if (kind == "codebook" and offset == 1) else 1  # the codebook table is [N, 2^b]
            set_constant(graph, node.inputs[slot], np.ascontiguousarray(np.take(array, perm, axis=axis)), node, "permuted")
    if a["sparse"]:
        indices = node.inputs[-2].const_value.numpy()
        values = node.inputs[-1].const_value.numpy()
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        moved = np.stack([indices[:, 0], inverse[indices[:, 1]]], axis=1).astype(indices.dtype)
        order = np.lexsort((moved[:, 1], moved[:, 0]))
        set_constant(graph, node.inputs[-2], moved[order], node, "permuted")
        set_constant(graph, node.inputs[-1], values[order], node, "permuted")
