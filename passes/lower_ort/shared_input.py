"""`lower-ort`'s rewrites of linears that read one input into one wide kernel: the Q, K and V
projections of an attention (and a gated MLP's gate and up projections) as one product over their
concatenated weights, then a `Split`, or the packed QKV input `GroupQueryAttention` takes.
`MatMulIntegerToFloat` (`widen_integer_linears`, only under `shared-input=wide`: measured a little
slower on MiniLM, the Split copies), `MatMulNBits` and float MatMul (`widen_shared_input_linears`), and
`qc.MixedMatMul`s of one allocation (`widen_shared_input_mixed`, before they are lowered). Where each linear
adds a constant bias (Qwen2's Q, K and V), the wide product adds their concatenation once (`bias_adds`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul
from qcompiler.dialect.op_registry import attributes_of
from qcompiler.ir import op_key
from qcompiler.ir.layers import drop_unread, new_initializer, take_over
from qcompiler.ir.meta import CREATED_BY, MERGED_LAYERS_KEY, ROUTE_KEY

_NBITS_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _groups(graph: ir.Graph, key_of) -> list[list[ir.Node]]:
    """The nodes of `graph` that share a key (`key_of`: None for a node that is no candidate), in
    graph order: every group of two or more."""
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        key = key_of(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def widen_integer_linears(graph: ir.Graph) -> int:
    """MatMulIntegerToFloat nodes with the same quantized input, scale and zero point (Q, K, V) ->
    one over the concatenated weights, scales and biases, then a Split; returns the groups merged."""
    def key_of(node: ir.Node) -> tuple | None:
        if node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft" and len(node.inputs) == 7:
            return tuple(id(node.inputs[i]) for i in (0, 2, 4))  # the quantized input, its scale and zero point
        return None

    merged = 0
    for nodes in _groups(graph, key_of):
        if any(n.inputs[i].const_value is None for n in nodes for i in (1, 3, 6)):
            continue
        first = nodes[0]
        base = first.name or first.outputs[0].name
        parts = {index: [n.inputs[index].const_value.numpy() for n in nodes] for index in (1, 3, 6)}
        w = new_initializer(graph, f"{base}.wide.weight", np.concatenate(parts[1], axis=1))
        scale = new_initializer(graph, f"{base}.wide.scale", np.concatenate(parts[3]))
        bias = new_initializer(graph, f"{base}.wide.bias", np.concatenate(parts[6]))
        sizes = new_initializer(graph, f"{base}.wide.splits", np.array([p.shape[1] for p in parts[1]], np.int64))
        wide = ir.node("MatMulIntegerToFloat", [first.inputs[0], w, first.inputs[2], scale, first.inputs[4], None, bias],
                       domain="com.microsoft", name=f"{base}.wide", metadata_props={CREATED_BY: "lower-ort"})
        wide.outputs[0].name = f"{base}.wide"
        split = ir.node("Split", [wide.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{base}.split",
                        metadata_props={CREATED_BY: "lower-ort"})
        olds = [n.outputs[0] for n in nodes]
        read = [v for n in nodes for v in n.inputs if v is not None and v.is_initializer()]
        ir.convenience.replace_nodes_and_values(graph, first, nodes, [wide, split], olds, list(split.outputs))
        drop_unread(graph, read)  # the per-layer weights, now concatenated
        merged += 1
    return merged


def widen_shared_input_mixed(graph: ir.Graph) -> int:
    """`qc.MixedMatMul`s that read one input with the same permutation and the same classes (rows,
    kinds, widths, zero-point form; what `allocate-bits{shared-input=joint}` gives Q/K/V and gate/up)
    -> one over their class arrays concatenated along N, then a `Split`: lowered, the input is
    gathered once and each class is one kernel for all of them. Returns the groups merged."""
    merged = 0
    for nodes in _groups(graph, lambda node: _mixed_key(node) if is_mixed_matmul(node) else None):
        first = nodes[0]
        base = first.name or first.outputs[0].name
        views = [MixedMatMulView.of(n) for n in nodes]
        columns = [int(v.classes[0].inputs[0].const_value.shape[1]) for v in views]
        inputs = [first.inputs[0], first.inputs[1]]
        for members in zip(*(v.class_arrays() for v in views)):
            axes = _COLUMN_AXES[members[0].kind]
            for i, axis in enumerate(axes):
                array = np.concatenate([m.inputs[i] for m in members], axis=axis)
                inputs.append(new_initializer(graph, f"{base}.wide.c{members[0].slot}.{i}", array))
        if views[0].outliers is not None:
            offsets = np.cumsum([0, *columns[:-1]])
            pairs = [v.outlier_arrays() for v in views]
            index = np.concatenate([np.column_stack([i[:, 0], i[:, 1] + offset]).astype(i.dtype) for (i, _), offset in zip(pairs, offsets)])
            inputs.append(new_initializer(graph, f"{base}.wide.outlier_index", index))
            inputs.append(new_initializer(graph, f"{base}.wide.outlier_value", np.concatenate([values for _, values in pairs])))
        wide = ir.node("MixedMatMul", inputs, attributes_of(first), domain="qc", name=f"{base}.wide",
                       metadata_props={CREATED_BY: "lower-ort", MERGED_LAYERS_KEY: ",".join(n.name or n.outputs[0].name for n in nodes)})
        wide.outputs[0].name = f"{base}.wide"
        wide.outputs[0].type = first.outputs[0].type
        shape = first.outputs[0].shape
        if shape is not None and len(shape):
            wide.outputs[0].shape = ir.Shape([*shape[:-1], sum(columns)])
        biases = bias_adds(nodes, columns)
        adds = [add for add, _ in biases]
        biased = [_bias_add(graph, wide, biases)] if biases else []
        sizes = new_initializer(graph, f"{base}.wide.splits", np.array(columns, np.int64))
        split = ir.node("Split", [(biased or [wide])[0].outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes),
                        name=f"{base}.wide.split", metadata_props={CREATED_BY: "lower-ort"})
        graph.insert_before(first, [wide, *biased, split])
        for end, part in zip(adds or nodes, split.outputs):
            take_over(end.outputs[0], part)
        read = [v for n in nodes for v in n.inputs[2:] if v is not None and v.is_initializer()]
        read += [bias for _, bias in biases if bias.is_initializer()]
        graph.remove([*adds, *nodes], safe=True)
        drop_unread(graph, read)
        merged += 1
    return merged


# the axis of N in each input of a mixed class (codes and rows [K_c, N]; scale and zero [G, N]; a codebook [N, 2^b])
_COLUMN_AXES = {"uniform": (1, 1, 1), "codebook": (1, 0), "fp16": (1,)}


def _mixed_key(node: ir.Node) -> tuple | None:
    """What `qc.MixedMatMul`s must share to be one: their input, permutation, classes and zero-point
    forms (integer or fractional: a symmetric class merges with an integer one, the zero points then
    stored for all), all constant; None where something is not."""
    view = MixedMatMulView.of(node)
    if view.perm.const_value is None or any(v is None or v.const_value is None for c in view.classes for v in c.inputs):
        return None
    if view.outliers is not None and any(v.const_value is None for v in view.outliers):
        return None
    zeros = tuple(str(c.inputs[2].const_value.dtype) if c.kind == "uniform" else c.kind for c in view.classes)  # uint8 or fp16
    classes = tuple((c.kind, c.bits, c.stop - c.start) for c in view.classes)
    return (id(view.x), view.perm.const_value.numpy().tobytes(), classes, zeros, view.group_size, view.outliers is not None)


def widen_shared_input_linears(graph: ir.Graph) -> tuple[int, int]:
    """Linears of one input merged into one wide product (Concat ops of constants, which ONNX Runtime
    folds when the session loads: the bytes at rest are unchanged):
    - `MatMulNBits` of the same attributes (K, bits, block size, accuracy level) whose weight,
      scales and zero points (all with or all without) are constants or computed from constants only: one `MatMulNBits` over
      them concatenated along N;
    - float `MatMul`s of such weights, only where they are a fused attention's Q, K and V.
    Where the group is exactly a `GroupQueryAttention`'s Q, K and V, the kernel reads the wide
    product as its packed QKV input; otherwise a `Split` gives each reader its part. Returns
    (groups merged, of which packed into attention)."""
    merged = packed = 0
    for nodes in (part for group in _groups(graph, _group_key) for part in _attention_apart(group)):
        biases = bias_adds(nodes, [_columns(n) for n in nodes])
        adds = [add for add, _ in biases]
        attention = _attention_reading(adds or nodes)
        if nodes[0].op_type == "MatMul" and attention is None:
            continue
        if attention is not None:  # Q, K, V
            order = sorted(range(len(nodes)), key=lambda i: next(iter((adds or nodes)[i].outputs[0].uses())).idx)
            nodes, biases = [nodes[i] for i in order], [biases[i] for i in order] if biases else []
            adds = [add for add, _ in biases]
        wide = _wide_linear(graph, nodes)
        product = wide
        if biases:
            product = _bias_add(graph, wide, biases)
            graph.insert_after(wide, product)
        if attention is not None:
            attention.replace_input_with(0, product.outputs[0])
            attention.replace_input_with(1, None)
            attention.replace_input_with(2, None)
            packed += 1
        else:
            sizes = new_initializer(graph, f"{wide.name}.splits", np.array([_columns(n) for n in nodes], np.int64))
            split = ir.node("Split", [product.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{wide.name}.split",
                            metadata_props={CREATED_BY: "lower-ort"})
            graph.insert_after(product, split)
            for end, part in zip(adds or nodes, split.outputs):
                take_over(end.outputs[0], part)
        read = [bias for _, bias in biases if bias.is_initializer()]
        graph.remove([*adds, *nodes], safe=True)
        drop_unread(graph, read)
        merged += 1
    return merged, packed


def bias_adds(nodes: list[ir.Node], columns: list[int]) -> list[tuple[ir.Node, ir.Value]]:
    """The `Add` of a bias after each linear and the bias (its output read by that Add alone, whose
    other input is a constant vector of the linear's `columns`: Qwen2's Q, K and V), in the order of
    `nodes`; none where a linear has none, so that the linears merge without their biases."""
    adds = []
    for node, n in zip(nodes, columns):
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or op_key(uses[0].node) != ("", "Add"):
            return []
        add, index = uses[0].node, uses[0].idx
        bias = add.inputs[1 - index]
        if bias is None or bias.const_value is None or tuple(bias.const_value.shape) != (n,):
            return []
        adds.append((add, bias))
    return adds


def _bias_add(graph: ir.Graph, wide: ir.Node, adds: list[tuple[ir.Node, ir.Value]]) -> ir.Node:
    """One `Add` of the biases of `adds` (`bias_adds`), concatenated in their order, to the wide product."""
    bias = new_initializer(graph, f"{wide.name}.bias", np.concatenate([b.const_value.numpy() for _, b in adds]))
    add = ir.node("Add", [wide.outputs[0], bias], name=f"{wide.name}.bias", metadata_props={CREATED_BY: "lower-ort"})
    add.outputs[0].name = f"{wide.name}.biased"
    add.outputs[0].type, add.outputs[0].shape = adds[0][0].outputs[0].type, wide.outputs[0].shape
    return add


def _group_key(node: ir.Node) -> tuple | None:
    """What linears must share to be merged (their kind, input and attributes); None for a node
    that is not such a linear."""
    if op_key(node) == ("com.microsoft", "MatMulNBits") and len(node.inputs) in (3, 4) and \
            all(v is not None and _from_constants(v) for v in node.inputs[1:]):
        return ("MatMulNBits", id(node.inputs[0]), len(node.inputs), *(node.attributes.get_int(name, 0) for name in _NBITS_ATTRIBUTES))
    if op_key(node) == ("", "MatMul") and node.inputs[1].const_value is not None and len(node.inputs[1].const_value.shape) == 2:
        return ("MatMul", id(node.inputs[0]), node.inputs[1].const_value.shape[0], node.inputs[1].const_value.dtype)
    return None


def _columns(node: ir.Node) -> int:
    """N, the linear's output columns."""
    return node.attributes.get_int("N") if node.op_type == "MatMulNBits" else node.inputs[1].const_value.shape[1]


def _wide_linear(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """One linear over `nodes`' constant inputs concatenated along N, placed where the first of
    them was (the ops computing the others' constant inputs move up before it)."""
    position = {id(n): i for i, n in enumerate(graph)}
    first = min(nodes, key=lambda n: position[id(n)])
    base = first.name or first.outputs[0].name
    makers = {id(m): m for n in nodes for v in n.inputs[1:] for m in _constant_makers(v)}
    for maker in sorted(makers.values(), key=lambda m: position[id(m)]):
        if position[id(maker)] > position[id(first)]:
            graph.remove(maker)
            graph.insert_before(first, maker)
    nbits = first.op_type == "MatMulNBits"
    concats = [ir.node("Concat", [n.inputs[index] for n in nodes], {"axis": 0 if nbits else 1}, name=f"{base}.wide.in{index}",
                       metadata_props={CREATED_BY: "lower-ort"}) for index in range(1, len(first.inputs))]
    for concat in concats:
        concat.outputs[0].name = concat.name
    if nbits:
        attributes = {"K": first.attributes.get_int("K"), "N": sum(_columns(n) for n in nodes),
                      **{name: first.attributes.get_int(name, 0) for name in _NBITS_ATTRIBUTES[1:]}}
        wide = ir.node("MatMulNBits", [first.inputs[0], *(c.outputs[0] for c in concats)], attributes, domain="com.microsoft",
                       name=f"{base}.wide", metadata_props={CREATED_BY: "lower-ort"})
    else:
        wide = ir.node("MatMul", [first.inputs[0], concats[0].outputs[0]], name=f"{base}.wide", metadata_props={CREATED_BY: "lower-ort"})
    wide.outputs[0].name = f"{base}.wide"
    routes = [n.metadata_props.get(ROUTE_KEY) for n in nodes]
    if None not in routes:  # lowered mixed layers of one class each: the route and the layers, for the manifest
        wide.metadata_props[ROUTE_KEY] = " | ".join(dict.fromkeys(routes))
        wide.metadata_props[MERGED_LAYERS_KEY] = ",".join(name for n in nodes for name in _layer_names(n))
    graph.insert_before(first, [*concats, wide])
    return wide


def _layer_names(node: ir.Node) -> list[str]:
    """The layers a lowered linear computes: those it was merged from, else its own."""
    merged = node.metadata_props.get(MERGED_LAYERS_KEY)
    return merged.split(",") if merged else [node.name]


def pack_split_into_attention(graph: ir.Graph) -> int:
    """A `Split` in three whose parts are exactly a `GroupQueryAttention`'s query, key and value, in
    that order (a merged mixed Q/K/V), and read by nothing else -> the attention reads the Split's
    input as its packed QKV. Returns the attentions so packed."""
    packed = 0
    for split in list(graph):
        if op_key(split) != ("", "Split") or len(split.outputs) != 3:
            continue
        uses = [list(v.uses()) for v in split.outputs]
        if any(len(u) != 1 for u in uses) or any(v.is_graph_output() for v in split.outputs):
            continue
        attention = uses[0][0].node
        if op_key(attention) != ("com.microsoft", "GroupQueryAttention") or \
                [(u[0].node, u[0].idx) for u in uses] != [(attention, 0), (attention, 1), (attention, 2)]:
            continue
        if not _splits_qkv(split, attention):
            continue
        attention.replace_input_with(0, split.inputs[0])
        attention.replace_input_with(1, None)
        attention.replace_input_with(2, None)
        graph.remove(split, safe=True)
        packed += 1
    return packed


def _splits_qkv(split: ir.Node, attention: ir.Node) -> bool:
    """Whether `split` cuts the last axis into the attention's query, key and value widths
    (num_heads, kv_num_heads and kv_num_heads heads of one size), the packed QKV layout."""
    sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
    rank = split.inputs[0].shape.rank() if split.inputs[0].shape is not None else None
    axis = split.attributes.get_int("axis", 0)
    if sizes is None or rank is None or axis not in (-1, rank - 1):
        return False
    q, k, v = (int(x) for x in sizes.numpy())
    heads, kv_heads = attention.attributes.get_int("num_heads", 0), attention.attributes.get_int("kv_num_heads", 0)
    return heads > 0 and kv_heads > 0 and k == v and q % heads == 0 and q // heads * kv_heads == k


def _constant_makers(value: ir.Value) -> list[ir.Node]:
    """The ops computing `value` from constants, producers first."""
    node = value.producer()
    if node is None:
        return []
    return [m for v in node.inputs if v is not None for m in _constant_makers(v)] + [node]


def _attention_apart(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """Linears of one input as the groups to merge: each three that one `GroupQueryAttention` reads as
    its query, key and value (directly or each through its own Add), and the others together where
    two or more (an MLP's gate and up beside the attention that reads the same norm, as in a block
    whose attention and MLP run side by side)."""
    readers: dict[int, list[ir.Node]] = {}
    rest = []
    for node in nodes:
        attention = _qkv_reader(node)
        (readers.setdefault(id(attention), []) if attention is not None else rest).append(node)
    triples = [group for group in readers.values() if len(group) == 3]
    rest += [node for group in readers.values() if len(group) != 3 for node in group]
    rest.sort(key=nodes.index)
    return triples + ([rest] if len(rest) > 1 else [])


def _qkv_reader(node: ir.Node) -> ir.Node | None:
    """The `GroupQueryAttention` that alone reads the linear's output (or the output of the one Add
    that alone reads it) as its query, key or value; else None."""
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and op_key(uses[0].node) == ("", "Add"):
        uses = list(uses[0].node.outputs[0].uses())
    if len(uses) != 1 or op_key(uses[0].node) != ("com.microsoft", "GroupQueryAttention") or uses[0].idx > 2:
        return None
    return uses[0].node


def _attention_reading(nodes: list[ir.Node]) -> ir.Node | None:
    """The `GroupQueryAttention` that reads the three nodes' outputs, and nothing else does, as its
    query, key and value inputs; else None."""
    if len(nodes) != 3 or any(len(n.outputs[0].uses()) != 1 or n.outputs[0].is_graph_output() for n in nodes):
        return None
    uses = [next(iter(n.outputs[0].uses())) for n in nodes]
    attention = uses[0].node
    if op_key(attention) != ("com.microsoft", "GroupQueryAttention") or any(u.node is not attention for u in uses) or \
            sorted(u.idx for u in uses) != [0, 1, 2]:
        return None
    return attention


def _from_constants(value: ir.Value) -> bool:
    """Whether `value` is a constant or computed by ops that read only constants."""
    if value.const_value is not None:
        return True
    node = value.producer()
    if node is None:
        return False
    return all(v is None or _from_constants(v) for v in node.inputs)
