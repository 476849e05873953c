"""`fold-scales`: make per-channel scales free at run time by folding them into constants.

1. Smoothing: a `qc.ChannelScale(X, c)` (from `smooth`: c = 1/s, one value per channel of the last
   axis) is folded into the producer of X when X has no other reader:
   - LayerNormalization over the last axis: gamma *= c, beta *= c;
   - a Mul by a constant per-channel vector (the weight of an RMSNorm): that vector *= c;
   - an elementwise product with a linear read by nothing else (`silu(gate) * up`): that linear;
   - a linear `MatMul(A, W)` (+ `Add(., b)`) with constant W: columns W[:, j] *= c_j, b *= c.
   Otherwise (X feeds a residual Add as well, or comes from a nonlinearity) it cannot be free:
   `unfoldable=mul` keeps it as an explicit `Mul` (one more pass over X at run time);
   `unfoldable=unsmooth` folds it back into the weights of the linears that read it, which undoes
   that smoothing (the layer is then quantized as if `smooth` had left it alone). The statistics
   say which scales were kept or undone and why.
2. BatchNorm into the preceding Conv (the Conv's output read by nothing else):
   W' = W * gamma / sigma (per output channel), b' = (b - mu) * gamma / sigma + beta,
   sigma = sqrt(var + epsilon).

Every fold is exact in real arithmetic; tests compare against the unfolded graph to float32
round-off.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.ir.layers import bypass, new_initializer, remove_unused, scale_constant, set_constant
from qcompiler.ir.meta import CREATED_BY, SMOOTHED_KEY, STATS_KEY, Prop
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldScalesPass(Pass):
    """Fold smoothing scales into norms and linears, and BatchNorm into Conv; keep a Mul only where folding is impossible."""

    name = "fold-scales"
    provided = frozenset({Prop.FOLDED})
    keeps_activation_stats = True  # a folded tensor takes over the smoothed tensor's statistics

    unfoldable: Literal["mul", "unsmooth"] = option(
        "mul", "a smoothing scale that cannot fold: keep it as a Mul, or unsmooth (fold it back into its readers' weights)")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        folded, kept, undone = [], {}, {}
        for node in list(graph):
            if node.op_type == "ChannelScale" and node.domain == "qc" and _axis(node) == -1:
                reason = _fold_smoothing(graph, node)
                if reason is None:
                    folded.append(node.name)
                elif self.unfoldable == "unsmooth" and _unsmooth(graph, node):
                    undone[node.name] = reason
                else:
                    _to_mul(graph, node)
                    kept[node.name] = reason
        batchnorms = [n.name for n in list(graph) if n.op_type == "BatchNormalization" and _fold_batchnorm(graph, n)]
        stats = {
            "smoothing_folded": len(folded),
            "smoothing_kept": len(kept),
            "kept": kept,
            "smoothing_undone": len(undone),
            "undone": undone,
            "batchnorm_folded": len(batchnorms),
        }
        if "qc" in model.opset_imports and not any(n.domain == "qc" for n in graph):
            del model.opset_imports["qc"]
        if folded or undone or batchnorms:
            remove_unused(model)
        return PassResult(model, bool(folded or kept or undone or batchnorms), stats)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _axis(node: ir.Node) -> int:
    return node.attributes["axis"].value if "axis" in node.attributes else -1


def _to_mul(graph: ir.Graph, node: ir.Node) -> None:
    """An unfoldable ChannelScale over the last axis is exactly a broadcasting Mul."""
    mul = ir.node("Mul", list(node.inputs), name=node.name, metadata_props={CREATED_BY: "fold-scales"})
    _move_stats(node.outputs[0], mul.outputs[0])
    ir.convenience.replace_nodes_and_values(graph, node, [node], [mul], [node.outputs[0]], [mul.outputs[0]])


def _unsmooth(graph: ir.Graph, node: ir.Node) -> bool:
    """Fold `ChannelScale(X, c)` into the rows of the constant weights of the linears that read
    it (W_k *= c_k), undoing the smoothing; False (nothing changed) when a reader is not such a
    linear."""
    x, c_value = node.inputs
    c, y = _const(c_value), node.outputs[0]
    readers = [use.node for use in y.uses()]
    if c is None or c.ndim != 1 or y in graph.outputs:
        return False
    for reader in readers:
        w = _const(reader.inputs[1]) if reader.op_type == "MatMul" and reader.inputs[0] is y else None
        if w is None or w.ndim != 2 or w.shape[0] != c.size or len(reader.inputs[1].uses()) != 1:
            return False
    for reader in readers:
        _scale_constant(graph, reader, 1, c, axis=0)
    bypass(graph, node, x)  # X keeps its own (unsmoothed) statistics
    return True


def _fold_smoothing(graph: ir.Graph, mul: ir.Node) -> str | None:
    """Fold `mul` into the producer of its input; returns None, or why it stays."""
    x, c_value = mul.inputs
    c = _const(c_value)
    if c is None or c.ndim != 1:
        return "scale is not a constant vector"
    if len(x.uses()) > 1 or x in graph.outputs:
        return "input has other readers (e.g. a residual connection)"
    producer = x.producer()
    if producer is None:
        return "input is a graph input"
    fold = _FOLDERS.get(producer.op_type)
    if fold is None or producer.domain not in ("", "ai.onnx") or not fold(graph, producer, c):
        return f"producer {producer.op_type} cannot absorb a per-channel scale"
    _move_stats(mul.outputs[0], x)  # X now holds X / s
    bypass(graph, mul, x)
    return None


def _move_stats(source: ir.Value, target: ir.Value) -> None:
    """`target` now holds what `source` held: it takes `source`'s statistics and smoothed flag,
    or drops its own."""
    for key in (STATS_KEY, SMOOTHED_KEY):
        if key in source.meta:
            target.meta[key] = source.meta[key]
        else:
            target.meta.pop(key, None)


def _scale_constant(graph: ir.Graph, node: ir.Node, index: int, c: np.ndarray, axis: int = -1) -> bool:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.const_value is None:
        return False
    dims = tuple(value.const_value.shape)  # the shape alone: a weight on disk is not read here
    if not dims or dims[axis] != c.size:
        return False
    shape = [1] * len(dims)
    shape[axis] = c.size
    scale_constant(graph, value, c.reshape(shape), node, "folded")
    return True


def _fold_into_layernorm(graph: ir.Graph, node: ir.Node, c: np.ndarray) -> bool:
    axis = node.attributes["axis"].value if "axis" in node.attributes else -1
    gamma = _const(node.inputs[1])
    if gamma is None or gamma.ndim != 1 or axis not in (-1, len(node.inputs[0].shape or [0]) - 1):
        return False
    has_beta = len(node.inputs) > 2 and node.inputs[2] is not None
    if has_beta and _const(node.inputs[2]) is None:
        return False
    _scale_constant(graph, node, 1, c)
    if has_beta:
        _scale_constant(graph, node, 2, c)
    return True


def _fold_into_mul(graph: ir.Graph, node: ir.Node, c: np.ndarray) -> bool:
    """A Mul by a constant per-channel vector (RMSNorm's weight), or an elementwise product one of
    whose operands is a linear read by nothing else (a gated MLP's `silu(gate) * up`): scale that
    vector, or that linear's columns."""
    for index in (1, 0):
        array = _const(node.inputs[index])
        if array is not None and array.ndim == 1 and array.size == c.size:
            return _scale_constant(graph, node, index, c)
    for index in (1, 0):
        operand = node.inputs[index]
        producer = operand.producer() if operand is not None else None
        if producer is None or len(operand.uses()) != 1 or operand in graph.outputs:
            continue
        if producer.op_type == "MatMul" and _fold_into_matmul(graph, producer, c):
            return True
        if producer.op_type == "Add" and _fold_into_add(graph, producer, c):
            return True
    return False


def _fold_into_add(graph: ir.Graph, node: ir.Node, c: np.ndarray) -> bool:
    """`Add(MatMul(A, W), b)`: scale W's columns and b."""
    bias_index = 1 if _const(node.inputs[1]) is not None else 0
    other = node.inputs[1 - bias_index]
    bias = _const(node.inputs[bias_index])
    matmul = other.producer() if other is not None else None
    if bias is None or bias.ndim != 1 or matmul is None or matmul.op_type != "MatMul" or len(other.uses()) != 1:
        return False
    if not _fold_into_matmul(graph, matmul, c):
        return False
    return _scale_constant(graph, node, bias_index, c)


def _fold_into_matmul(graph: ir.Graph, node: ir.Node, c: np.ndarray) -> bool:
    w = _const(node.inputs[1])
    if w is None or w.ndim != 2 or w.shape[1] != c.size:
        return False
    return _scale_constant(graph, node, 1, c)


_FOLDERS = {
    "LayerNormalization": _fold_into_layernorm,
    "Mul": _fold_into_mul,
    "Add": _fold_into_add,
    "MatMul": _fold_into_matmul,
}


def _fold_batchnorm(graph: ir.Graph, bn: ir.Node) -> bool:
    """BatchNormalization(Conv(x, W, b)) -> Conv(x, W', b'); False when it does not apply."""
    x = bn.inputs[0]
    conv = x.producer()
    if conv is None or conv.op_type != "Conv" or len(x.uses()) != 1 or len(bn.outputs) != 1:
        return False
    params = [_const(v) for v in bn.inputs[1:5]]
    w = _const(conv.inputs[1])
    if any(p is None for p in params) or w is None:
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = bn.attributes["epsilon"].value if "epsilon" in bn.attributes else 1e-5
    factor = gamma / np.sqrt(var + eps)
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    bias = _const(conv.inputs[2]) if has_bias else np.zeros(w.shape[0], w.dtype)
    if bias is None:
        return False
    new_w = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    new_b = ((bias - mean) * factor + beta).astype(w.dtype)
    set_constant(graph, conv.inputs[1], new_w, conv, "bn_folded")
    if has_bias:
        set_constant(graph, conv.inputs[2], new_b, conv, "bn_folded")
    else:
        b_value = new_initializer(graph, f"{conv.name or conv.outputs[0].name}.bias", new_b)
        conv.resize_inputs(3)
        conv.replace_input_with(2, b_value)
    _move_stats(bn.outputs[0], x)  # the Conv's output now holds what the BatchNorm's held
    bypass(graph, bn, x)
    return True
