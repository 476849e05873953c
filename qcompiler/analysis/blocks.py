"""Blocks of a graph for block-wise reconstruction, found in the IR (no per-architecture tables).

A graph in topological order is cut after every *anchor* node:

- a residual `Add(a, b)` (or `Sum(a, b)`, as `lower-ort` writes one a LayerNormalization reads):
  both inputs are activations of the same shape, and `b` depends on `a`
  through a path that holds a weighted layer (the skip connection of a transformer sub-layer or a residual stage);
- a spatial stage boundary: `MaxPool`, `AveragePool` or `Resize` (the end of a conv stage).

The pieces between consecutive anchors are *regions* (for a pre-norm transformer: attention up to
its residual Add, then the MLP up to its). Regions without a weighted layer are merged into the
next one (the trailing one into the previous), and `regions` consecutive regions form one block:
with the default 2, one transformer layer (attention + MLP) per block; the trailing region (a
final norm and a head) stays a block of its own.

A block's inputs are the non-constant values it reads that are produced before it (graph inputs
included); its outputs are the values it produces that later nodes or the graph outputs read.
Weighted layers: `qcompiler.ir.is_weighted_layer` (MatMul, Gemm, Conv, ConvTranspose, `qc.MixedMatMul`
and the lowered kernels, with a weight computed from initializers).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qcompiler.ir import is_weighted_layer

ANCHOR_OPS = frozenset({"MaxPool", "AveragePool", "Resize"})


@dataclasses.dataclass
class Block:
    index: int
    nodes: list[ir.Node]
    inputs: list[ir.Value]
    outputs: list[ir.Value]
    layers: list[ir.Node]  # the weighted layers, in graph order

    @property
    def names(self) -> list[str]:
        return [node.name or node.outputs[0].name for node in self.layers]


def _constant(value: ir.Value | None) -> bool:
    return value is None or value.const_value is not None or (value.producer() is not None and value.producer().op_type == "Constant")


def is_weighted(node: ir.Node) -> bool:
    """A weighted layer (`qcompiler.ir.is_weighted_layer`)."""
    return is_weighted_layer(node)


def _is_residual_add(node: ir.Node, position: dict[ir.Node, int], any_symbols: bool = False) -> bool:
    if node.op_type not in ("Add", "Sum") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if _constant(a) or _constant(b):
        return False
    if a.shape is not None and b.shape is not None and not _same_shape(a.shape, b.shape, any_symbols):
        return False  # a broadcast (an attention mask, a bias), not a skip connection
    def start(v: ir.Value) -> int:
        p = v.producer()
        return position.get(p, -1) if p is not None else -1
    for skip, branch in ((a, b), (b, a)):
        if start(skip) < start(branch) and _depends_through_layer(branch, skip, start(skip), position):
            return True
    return False


def _depends_through_layer(value: ir.Value, source: ir.Value, floor: int, position) -> bool:
    """Whether `value` depends on `source` along a path holding a weighted layer."""
    # state: (node, seen a weighted layer on the way down from value)
    stack = [(value.producer(), False)]
    seen = set()
    while stack:
        node, weighted = stack.pop()
        if node is None or position.get(node, -1) <= floor or (node, weighted) in seen:
            continue
        seen.add((node, weighted))
        weighted = weighted or is_weighted(node)
        for inp in node.inputs:
            if inp is None:
                continue
            if inp is source:
                if weighted:
                    return True
                continue
            stack.append((inp.producer(), weighted))
    return False


def _same_shape(a: ir.Shape, b: ir.Shape, any_symbols: bool) -> bool:
    """Equal shapes; with `any_symbols`, two symbolic dims count as equal whatever their names
    (shape inference names the dims after a Reshape anew), a symbolic dim and a number never."""
    if not any_symbols:
        return list(a) == list(b)
    return len(a) == len(b) and all(
        x == y if isinstance(x, int) or isinstance(y, int) else True for x, y in zip(a, b)
    )


def find_blocks(graph: ir.Graph, regions: int = 2, any_symbols: bool = False) -> list[Block]:
    """The graph's blocks in order (see the module docstring). The graph must be topologically
    sorted (canonicalize sorts it). `regions=0`: the whole graph as one block (end to end).
    `any_symbols`: a residual Add's inputs may differ in the names of their symbolic dims (as an
    attention output does after a Reshape); block-sequential calibration cuts so, the block-wise
    learners keep the exact rule."""
    nodes = list(graph)
    if regions == 0:
        return [_block(0, nodes, graph)]
    position = {node: i for i, node in enumerate(nodes)}
    cuts = [i for i, node in enumerate(nodes) if node.op_type in ANCHOR_OPS or _is_residual_add(node, position, any_symbols)]
    bounds, start = [], 0
    for cut in cuts:
        bounds.append((start, cut + 1))
        start = cut + 1
    if start < len(nodes):
        bounds.append((start, len(nodes)))
    # merge regions without weighted layers into the next (the last into the previous)
    merged: list[list[int]] = []
    pending = None
    for lo, hi in bounds:
        lo = pending if pending is not None else lo
        if any(is_weighted(nodes[i]) for i in range(lo, hi)):
            merged.append([lo, hi])
            pending = None
        else:
            pending = lo
    if pending is not None:
        if merged:
            merged[-1][1] = len(nodes)
        else:
            merged.append([pending, len(nodes)])
    # group `regions` consecutive regions; the trailing region (after the last anchor) alone
    trailing = merged and cuts and merged[-1][0] > cuts[-1]
    body = merged[:-1] if trailing else merged
    groups = [[body[i][0], body[min(i + regions, len(body)) - 1][1]] for i in range(0, len(body), max(regions, 1))]
    if trailing:
        groups.append(merged[-1])
    blocks = []
    for index, (lo, hi) in enumerate(groups):
        blocks.append(_block(index, nodes[lo:hi], graph))
    return blocks


def _block(index: int, nodes: list[ir.Node], graph: ir.Graph) -> Block:
    inside = set(nodes)
    graph_outputs = set(graph.outputs)
    inputs, seen = [], set()
    for node in nodes:
        for inp in node.inputs:
            if inp is None or inp in seen or inp.const_value is not None:
                continue
            producer = inp.producer()
            if producer is None or producer not in inside:
                seen.add(inp)
                inputs.append(inp)
    outputs = []
    for node in nodes:
        for out in node.outputs:
            if out in graph_outputs or any(use.node not in inside for use in out.uses()):
                outputs.append(out)
    layers = [node for node in nodes if is_weighted(node)]
    return Block(index, nodes, inputs, outputs, layers)


def describe(blocks: list[Block]) -> list[dict]:
    """A JSON-able summary: per block, its node count, weighted layers and boundary values."""
    return [
        {"block": b.index, "nodes": len(b.nodes), "layers": b.names,
         "inputs": [v.name for v in b.inputs], "outputs": [v.name for v in b.outputs]}
        for b in blocks
    ]
