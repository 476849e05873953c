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

from qcompiler.analysis.channels import ChannelRegion, NotChannelwise, channel_region
from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul
from qcompiler.ir.layers import set_constant
from qcompiler.ir.meta import CHANNEL_ORDER_KEY, Prop
from qcompiler.pipeline.passbase import Pass, PassResult, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldPermutationPass(Pass):
    """Fold each mixed-precision layer's channel permutation into the linears that produce its input (exact)."""

    name = "fold-permutation"
    required = frozenset({Prop.WEIGHTS_QUANTIZED})
    provided = frozenset({Prop.PERMUTATION_FOLDED})

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        folded, kept = [], {}
        for node in list(graph):
            if not is_mixed_matmul(node):
                continue
            perm = MixedMatMulView.of(node).perm_array()
            if np.array_equal(perm, np.arange(len(perm))):
                continue
            name = node.name or node.outputs[0].name
            try:
                plan = _plan(graph, node, len(perm))
            except NotChannelwise as reason:
                kept[name] = str(reason)
                continue
            _apply(graph, node, plan, perm)
            folded.append(name)
        stats = {"folded": len(folded), "kept": len(kept), "folded_layers": folded, "kept_layers": kept}
        return PassResult(model, bool(folded), stats)


def _plan(graph: ir.Graph, consumer: ir.Node, k: int) -> ChannelRegion:
    x = MixedMatMulView.of(consumer).x
    region = channel_region(graph, x, k, mixed=True)
    if any(use.node is not consumer for use in x.uses()):
        node = x.producer()
        raise NotChannelwise(f"'{node.name}' ({node.op_type}) is also read outside this layer's input")
    return region


def _apply(graph: ir.Graph, consumer: ir.Node, plan: ChannelRegion, perm: np.ndarray) -> None:
    for leaf in plan.linears:
        output = leaf.outputs[0]  # its channels reordered: said for whoever compares it with the float model
        order = output.meta.get(CHANNEL_ORDER_KEY)
        output.meta[CHANNEL_ORDER_KEY] = perm.copy() if order is None else order[perm]
        if leaf.op_type == "MatMul":
            w = leaf.inputs[1].const_value.numpy()
            set_constant(graph, leaf.inputs[1], np.ascontiguousarray(w[:, perm]), leaf, "permuted")
        else:
            _permute_mixed_outputs(graph, leaf, perm)
    for node, index in plan.constants:
        c = node.inputs[index].const_value.numpy()
        set_constant(graph, node.inputs[index], np.ascontiguousarray(c[..., perm]), node, "permuted")
    set_constant(graph, MixedMatMulView.of(consumer).perm, np.arange(len(perm), dtype=np.int64), consumer, "folded")


def _permute_mixed_outputs(graph: ir.Graph, node: ir.Node, perm: np.ndarray) -> None:
    """A qc.MixedMatMul whose output column j is its former column perm[j]."""
    view = MixedMatMulView.of(node)
    for c in view.classes:
        for offset, value in enumerate(c.inputs):
            array = value.const_value.numpy()
            axis = 0 if (c.kind == "codebook" and offset == 1) else 1  # the codebook table is [N, 2^b]
            set_constant(graph, value, np.ascontiguousarray(np.take(array, perm, axis=axis)), node, "permuted")
    if view.outliers is not None:
        indices, values = view.outlier_arrays()
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        moved = np.stack([indices[:, 0], inverse[indices[:, 1]]], axis=1).astype(indices.dtype)
        order = np.lexsort((moved[:, 1], moved[:, 0]))
        set_constant(graph, view.outliers[0], moved[order], node, "permuted")
        set_constant(graph, view.outliers[1], values[order], node, "permuted")
