"""The channel-wise computation behind an activation: the linears that produce the channels of its
last axis, and the elementwise ops between them and it.

`fold-permutation` reorders those channels and `prune-channels` removes some; both change the
producing linears' output columns and the per-channel constants on the way, which is exact when
every op in between treats each channel on its own (`channel_region` checks that, and that nothing
outside the region reads its values).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

UNARY = frozenset({"Sigmoid", "Tanh", "Erf", "Relu", "Neg", "Abs", "Sqrt", "Exp", "Log", "Gelu", "Softplus",
                   "Softsign", "Reciprocal", "Identity", "Elu", "Selu", "LeakyRelu", "HardSigmoid", "HardSwish",
                   "Mish", "Celu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Clip"})
BINARY = frozenset({"Mul", "Add", "Sub", "Div", "Pow", "Max", "Min"})


class NotChannelwise(Exception):
    """Why the channels of a value cannot be followed back to the linears that produce them."""


@dataclasses.dataclass
class ChannelRegion:
    values: set  # values carrying the channels, the activation included
    nodes: set  # the nodes computing them
    linears: list  # MatMul nodes (constant 2-D weight, one column per channel) and, if asked, qc.MixedMatMul
    constants: list  # (node, input index) of the per-channel constant operands on the way


def channel_region(graph: ir.Graph, x: ir.Value, channels: int, mixed: bool = False) -> ChannelRegion:
    """The region that computes `x`'s `channels` last-axis channels from linears through elementwise
    ops only (`mixed`: a `qc.MixedMatMul` may be one of the linears). Raises `NotChannelwise` when
    there is none, or when a graph output or a node outside the region reads one of its values
    (other than `x` itself, whose readers the caller checks)."""
    region = ChannelRegion(set(), set(), [], [])
    stack = [x]
    while stack:
        value = stack.pop()
        if value in region.values:
            continue
        region.values.add(value)
        node = value.producer()
        if node is None or value in graph.outputs:
            raise NotChannelwise("the input is a graph input or output")
        region.nodes.add(node)
        op = node.op_type
        standard = node.domain in ("", "ai.onnx")
        if standard and op == "MatMul" and _weight_columns(node) == channels:
            region.linears.append(node)
        elif mixed and node.domain == "qc" and op == "MixedMatMul":
            region.linears.append(node)
        elif standard and op in UNARY and len(node.outputs) == 1:
            if any(v is not None and v.const_value is None for v in node.inputs[1:]):
                raise NotChannelwise(f"'{node.name}' ({op}) has a computed parameter")
            stack.append(node.inputs[0])
        elif standard and op in BINARY:
            for index, operand in enumerate(node.inputs):
                last = _last_dim(operand)
                if operand.const_value is not None:
                    if last == channels and len(operand.const_value.shape) >= 1:
                        region.constants.append((node, index))
                    elif last != 1:
                        raise NotChannelwise(f"'{node.name}' ({op}) has a constant operand that is not per-channel")
                elif last == channels:
                    stack.append(operand)
                else:
                    raise NotChannelwise(f"'{node.name}' ({op}) broadcasts along the channel axis or has no static shape")
        else:
            raise NotChannelwise(f"the input comes from '{node.name}' ({node.domain + '.' if node.domain else ''}{op}), "
                                 "which mixes channels or is shared")
    for value in region.values:
        if value is not x and any(use.node not in region.nodes for use in value.uses()):
            node = value.producer()
            raise NotChannelwise(f"'{node.name}' ({node.op_type}) is also read outside this layer's input")
    return region


def _weight_columns(node: ir.Node) -> int | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    return w.const_value.shape[1]


def _last_dim(value: ir.Value) -> int | None:
    """The static size of the last axis (1 for a scalar), or None when unknown."""
    shape = value.shape if value.shape is not None else (value.const_value.shape if value.const_value is not None else None)
    if shape is None or len(shape) == 0:
        return None if shape is None else 1
    last = shape[len(shape) - 1]
    return last if isinstance(last, int) else None
