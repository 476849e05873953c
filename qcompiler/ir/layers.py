"""Finding the layers quantization works on, and rewriting their constants safely."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from qcompiler import ir as qir
from qcompiler.ir import deferred, spill
from qcompiler.ir.deferred import Deferred
from qcompiler.ir.meta import CREATED_BY, SCOPE_KEY  # noqa: F401  (CREATED_BY: part of this API)


@dataclasses.dataclass(frozen=True)
class Linear:
    """`Y = X W` with W a constant [K, N] initializer (the MatMul form `canonicalize` produces)."""

    node: ir.Node
    x: ir.Value
    w: ir.Value
    weight_index = 1  # the input of `node` that reads W

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name


def linears(graph: ir.Graph) -> list[Linear]:
    """Every MatMul whose second input is a 2-D floating-point initializer, in graph order."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        if x is None or w is None or not w.is_initializer() or w.const_value is None:
            continue
        if len(w.const_value.shape) != 2 or not w.const_value.dtype.is_floating_point():
            continue
        found.append(Linear(node, x, w))
    return found


@dataclasses.dataclass(frozen=True)
class ConvAsLinear:
    """A Conv whose kernel [O, C/g, *spatial] is held as the matrix W [K, N] = [C/g * prod(spatial), O]
    (the im2col form: row (c, i, j, ...) channel-major, column o) and rebuilt for the Conv by
    `Transpose` + `Reshape` (`conv_as_linear`), so that what is written for `Y = X W` (bit allocation,
    weight quantization) treats it as a linear. `node` is the Transpose, which reads W at input 0."""

    conv: ir.Node
    node: ir.Node
    x: ir.Value
    w: ir.Value
    weight_index = 0

    @property
    def name(self) -> str:
        return self.conv.name or self.conv.outputs[0].name

    def row_energy(self, channel_energy: np.ndarray) -> np.ndarray:
        """E per row of W from E per input channel [C]: a row (c, i, j, ...) reads channel c of every
        group, so its energy is the mean over the groups (exact for one group)."""
        shape = _kernel_shape(self.conv)
        mean = np.asarray(channel_energy, np.float64).reshape(-1, shape[1]).mean(axis=0)
        return np.repeat(mean, int(np.prod(shape[2:])))


def weighted_convs(graph: ir.Graph) -> list[ir.Node]:
    """Every Conv whose kernel is a floating-point initializer that only it reads, in graph order."""
    found = []
    for node in graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or not w.const_value.dtype.is_floating_point():
            continue
        if len(w.const_value.shape) < 3 or len(w.uses()) != 1 or w in graph.outputs:
            continue
        found.append(node)
    return found


def conv_as_linear(graph: ir.Graph, conv: ir.Node, created_by: str) -> ConvAsLinear:
    """Hold `conv`'s kernel (an initializer only it reads) as its im2col matrix W [K, N] under the
    same name, and rebuild the kernel from it with `Transpose` + `Reshape` in front of the Conv
    (exact: the same numbers in another layout)."""
    kernel = conv.inputs[1]
    shape = tuple(kernel.const_value.shape)
    matrix = kernel.const_value.numpy().reshape(shape[0], -1).T
    set_constant(graph, kernel, np.ascontiguousarray(matrix), conv, "matrix")
    base = conv.name or conv.outputs[0].name  # the rebuilt kernel is named after its layer, as ONNX Runtime folds it
    transpose = ir.node("Transpose", [kernel], {"perm": [1, 0]}, name=f"{base}.kernel_t", metadata_props={CREATED_BY: created_by})
    transpose.outputs[0].name = f"{base}.kernel_t"
    target = new_initializer(graph, f"{base}.kernel_shape", np.array(shape, np.int64))
    reshape = ir.node("Reshape", [transpose.outputs[0], target], name=f"{base}.kernel", metadata_props={CREATED_BY: created_by})
    reshape.outputs[0].name = f"{base}.kernel"
    reshape.outputs[0].type = kernel.type
    reshape.outputs[0].shape = ir.Shape(shape)
    graph.insert_before(conv, [transpose, reshape])
    conv.replace_input_with(1, reshape.outputs[0])
    return ConvAsLinear(conv, transpose, conv.inputs[0], kernel)


def conv_reading(matrix: ir.Value) -> ConvAsLinear | None:
    """The Conv whose kernel `conv_as_linear` rebuilds from `matrix` (through its Transpose and
    Reshape), or None when `matrix` is not read that way."""
    for use in matrix.uses():
        transpose = use.node
        if transpose.op_type != "Transpose" or use.idx != 0:
            continue
        for reshape_use in transpose.outputs[0].uses():
            reshape = reshape_use.node
            if reshape.op_type != "Reshape":
                continue
            for conv_use in reshape.outputs[0].uses():
                if conv_use.node.op_type == "Conv" and conv_use.idx == 1:
                    return ConvAsLinear(conv_use.node, transpose, conv_use.node.inputs[0], matrix)
    return None


def _kernel_shape(conv: ir.Node) -> tuple[int, ...]:
    """The Conv's kernel shape [O, C/g, *spatial] (the kernel, or the Reshape that rebuilds it, knows it)."""
    kernel = conv.inputs[1]
    shape = kernel.const_value.shape if kernel.const_value is not None else kernel.shape
    return tuple(int(d) for d in shape)


QUANTIZED_LOOKUPS = frozenset({("qc", "GatherQuantized"), ("com.microsoft", "GatherBlockQuantized")})


def embedding_table(node: ir.Node) -> ir.Value | None:
    """The table an embedding lookup reads: the constant 2-D float table of a standard Gather on
    axis 0 (read through a `qc.BitAllocation` once allocated), or the codes of a quantized lookup
    (`qc.GatherQuantized`, `com.microsoft.GatherBlockQuantized`); None for any other node."""
    if (node.domain, node.op_type) in QUANTIZED_LOOKUPS:
        return node.inputs[0]
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2 or node.attributes.get_int("axis", 0):
        return None
    table = qir.producer_of(node.inputs[0], "BitAllocation", "qc")
    table = table.inputs[0] if table is not None else node.inputs[0]
    tensor = table.const_value if table is not None else None
    if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
        return None
    return table


def outputs_token_logits(graph: ir.Graph) -> bool:
    """Whether the graph's first output is token logits, an LM head's: a float output of rank 2 or
    more whose last axis is as long as the vocabulary of an embedding table the graph looks up."""
    out = graph.outputs[0] if len(graph.outputs) else None
    if out is None or out.dtype is None or not out.dtype.is_floating_point() or out.shape is None or len(out.shape) < 2:
        return False
    vocabulary = out.shape[-1]
    if not isinstance(vocabulary, int) or vocabulary < 2:
        return False
    tables = (embedding_table(node) for node in graph)
    return any(t is not None and t.shape is not None and t.shape[0] == vocabulary for t in tables)


def group_by_input(layers: list[Linear]) -> dict[str, list[Linear]]:
    """Layers that read the same activation (Q/K/V, gate/up), keyed by its name, in graph order."""
    groups: dict[str, list[Linear]] = {}
    for layer in layers:
        groups.setdefault(layer.x.name, []).append(layer)
    return groups


def set_constant(graph: ir.Graph, value: ir.Value, array: np.ndarray | Deferred, owner: ir.Node, suffix: str) -> ir.Value:
    """Give `owner` a constant holding `array` (or a weight computed when read: `qcompiler.ir.deferred`)
    in place of `value`.

    Rewritten in place when `owner` is the only reader; otherwise a new initializer named
    `<value>.<suffix>` is created and only `owner` is rewired to it."""
    readers = {use.node for use in value.uses()}
    if readers == {owner} and value not in graph.outputs and value not in graph.inputs:
        tensor = _tensor(array, value.name)
        value.const_value = tensor
        value.shape = ir.Shape(tensor.shape)
        value.dtype = tensor.dtype
        return value
    new = new_initializer(graph, f"{value.name}.{suffix}", array)
    for index, inp in enumerate(owner.inputs):
        if inp is value:
            owner.replace_input_with(index, new)
    return new


def scale_constant(graph: ir.Graph, value: ir.Value, factor: np.ndarray, owner: ir.Node, suffix: str) -> ir.Value:
    """`set_constant` with `value * factor` (`factor` broadcast against it, the weight's dtype
    kept). A weight still on disk stays there: its scaled value is computed each time it is read."""
    tensor = value.const_value
    if deferred.is_on_disk(tensor) and tensor.dtype == ir.DataType.FLOAT:
        return set_constant(graph, value, deferred.scaled(tensor, factor), owner, suffix)
    array = tensor.numpy()
    return set_constant(graph, value, (array * factor).astype(array.dtype), owner, suffix)


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray | Deferred) -> ir.Value:
    """A new initializer with a name no other initializer has (`name`, `name.1`, ...)."""
    unique, n = name, 1
    while unique in graph.initializers:
        unique, n = f"{name}.{n}", n + 1
    tensor = _tensor(array, unique)
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _tensor(array: np.ndarray | Deferred, name: str) -> ir.TensorProtocol:
    if isinstance(array, Deferred):
        array.name = name
        return array
    on_disk = spill.kept(array, name)  # while a large model compiles: written to disk, read back when needed
    return on_disk if on_disk is not None else ir.tensor(np.require(array, requirements="C"), name=name)  # keeps 0-d arrays 0-d


def insert_after_value(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    """Insert `node` right after the producer of `value` (or first, for graph inputs)."""
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), node)
    else:
        graph.insert_after(producer, node)


def bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> None:
    """Remove the single-output `node`; its readers read `replacement` instead. When the node's
    output is a graph output, `replacement` takes over its name (an Identity keeps graph inputs and
    other outputs named as they were)."""
    out = node.outputs[0]
    name = out.name
    if out in graph.outputs:
        if replacement in graph.inputs or replacement in graph.outputs or replacement.is_initializer():
            identity = ir.node("Identity", [replacement], name=f"{name}.identity")
            graph.insert_after(node, identity)
            replacement = identity.outputs[0]
        ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        replacement.name = name
        replacement.type = replacement.type or out.type
        replacement.shape = replacement.shape or out.shape
        return
    ir.convenience.replace_all_uses_with(out, replacement)
    graph.remove(node, safe=True)


def take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` for its readers and as a graph output, under `old`'s name, shape and type."""
    name, shape, dtype = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = f"{name}.replaced"
    new.name, new.shape, new.type = name, shape, dtype


def drop_unread(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the initializers among `values` that nothing reads any more (their memory with them)."""
    for value in values:
        if value.is_initializer() and not value.uses() and not value.is_graph_output() and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)


def remove_unused(model: ir.Model) -> None:
    """Drop nodes and initializers nothing reads any more."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def name_weights_after_modules(graph: ir.Graph) -> int:
    """Name each anonymous weight (`val_37`) that only a weighted layer (`qcompiler.ir.WEIGHTED_LAYER_OPS`) of a known module reads
    after that module (`lm_head.weight`, or `lm_head.matmul.weight` where that name is taken): those
    the exporter made, and those constant folding makes later (a tied output projection reads the
    transposed embedding, folded). Returns how many."""
    renamed = 0
    for node in graph:
        module = node.metadata_props.get(SCOPE_KEY)
        if not module or qir.op_key(node) not in qir.WEIGHTED_LAYER_OPS or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or not re.fullmatch(r"val_\d+", weight.name or "") or len(weight.uses()) != 1:
            continue
        # a tied output projection reads a folded copy of the embedding, which keeps `{module}.weight`
        free = [n for n in (f"{module}.weight", f"{module}.{node.op_type.lower()}.weight") if n not in graph.initializers]
        if not free:
            continue
        graph.initializers.pop(weight.name)
        weight.name = free[0]
        if weight.const_value is not None:
            weight.const_value.name = free[0]
        graph.register_initializer(weight)
        renamed += 1
    return renamed


def has_kv_cache(graph: ir.Graph) -> bool:
    """Whether the graph is a decoder with a KV cache, so that a decode step runs one token, where
    each kernel's call costs more than its weights: a graph input concatenated (through `Cast`s, as
    an int8 or float16 cache is read) into a graph output (`present = Concat(past, new)`), or a
    `GroupQueryAttention` (which reads the past and writes the present itself)."""
    if any(node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" for node in graph):
        return True
    for value in graph.inputs:
        readers = [use.node for use in value.uses()]
        while readers:
            node = readers.pop()
            if node.op_type == "Concat" and any(o.is_graph_output() for o in node.outputs):
                return True
            if node.op_type == "Cast":
                readers.extend(use.node for use in node.outputs[0].uses())
    return False
