"""`prune-channels`: remove the input channels a sparse model never uses, report the rest of its zeros.

A model pruned with a binary mask (`W * M`, METHODS.md: sparse connectivity) arrives with exact
zeros. When row k of every linear reading an activation X is zero (`Y = X W`, W [K, N]), channel k
of X contributes nothing; if X is computed from linears by channel-wise ops only (unary
elementwise ops, binary ops with a per-channel or scalar constant, products/sums of two such
chains: a bias, an activation, a gated MLP's `silu(gate) * up`) and nothing else reads that
region, the channel is removed everywhere: row k of the readers' weights, column k of the
producers' weights, entry k of per-channel constants. Exact: the graph computes the same values.

Unstructured zeros (scattered in weights) are counted per layer and reported; they stay in the
dense weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.channels import ChannelRegion, NotChannelwise, channel_region
from qcompiler.ir.layers import linears, set_constant
from qcompiler.pipeline.passbase import Pass, PassResult, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class PruneChannelsPass(Pass):
    """Remove input channels whose weights are all zero (and their producers' columns); report unstructured sparsity."""

    name = "prune-channels"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        removed: dict[str, int] = {}
        done: set[str] = set()
        for linear in linears(graph):
            x = linear.x
            if x.name in done:
                continue
            done.add(x.name)
            readers = [use.node for use in x.uses()]
            if x in graph.outputs or not readers or any(not _const_matmul(n, x) for n in readers):
                continue
            zero = np.ones(_weight(readers[0]).shape[0], bool)
            for node in readers:
                zero &= ~np.any(_weight(node) != 0, axis=1)
            if not zero.any() or zero.all():
                continue
            try:
                region = channel_region(graph, x, zero.size)
            except NotChannelwise:
                continue
            keep = np.flatnonzero(~zero)
            _apply(graph, x, readers, region, keep)
            removed[x.name] = int(zero.sum())
        stats = {"channels_removed": int(sum(removed.values())), "per_activation": removed,
                 "sparsity": _sparsity(graph)}
        return PassResult(model, bool(removed), stats)


def _weight(node: ir.Node) -> np.ndarray:
    return node.inputs[1].const_value.numpy()


def _const_matmul(node: ir.Node, x: ir.Value) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is not x:
        return False
    w = node.inputs[1]
    return w is not None and w.const_value is not None and len(w.const_value.shape) == 2


def _apply(graph: ir.Graph, x: ir.Value, readers: list[ir.Node], region: ChannelRegion, keep: np.ndarray) -> None:
    for node in readers:
        set_constant(graph, node.inputs[1], _weight(node)[keep], node, "pruned")
    for node in region.linears:
        set_constant(graph, node.inputs[1], _weight(node)[:, keep], node, "pruned")
    for node, index in region.constants:
        array = node.inputs[index].const_value.numpy()
        set_constant(graph, node.inputs[index], np.take(array, keep, axis=-1), node, "pruned")
    for v in region.values:
        if v.shape is not None and len(v.shape) > 0:
            dims = list(v.shape)
            dims[-1] = int(len(keep))
            v.shape = ir.Shape(dims)


def _sparsity(graph: ir.Graph) -> dict:
    """Exact zeros in every linear's weight: per layer (when any) and overall."""
    per_layer, zeros, total = {}, 0, 0
    for linear in linears(graph):
        w = linear.w.const_value.numpy()
        z = int(np.count_nonzero(w == 0))
        zeros, total = zeros + z, total + w.size
        if z:
            per_layer[linear.name] = round(z / w.size, 4)
    return {"zero_fraction": round(zeros / total, 4) if total else 0.0, "per_layer": per_layer,
            "note": "unstructured zeros stay in the dense weights"}
