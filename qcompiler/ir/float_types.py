"""Float types of a source model: float32, float16 and bfloat16.

The passes compute in float32 (ONNX Runtime's CPU kernels have few float16 and almost no bfloat16
implementations, and calibration statistics want float32 anyway). A float16 or bfloat16 source is
therefore brought to float32 when it enters (`to_float32`), and the emitted model gets the
source's float type back at its edges (`restore_float_type`): its float graph inputs and outputs
that were of the source type are again (a Cast to float32 after each input, one back before each
output), and its
float parts (unquantized weights, biases, norm weights: every float32 initializer of more than one
element that no quantization op reads as a parameter) are stored in the source type and cast to
float32 where they are read, which ONNX Runtime folds when the session loads. A table only looked up
(every reader a Gather of its rows, as a float embedding) is not: the lookup reads the stored table
and the rows it takes are cast, so the session holds the table's stored bytes, not a float32 copy. Quantization
parameters (the scales of QuantizeLinear, DequantizeLinear and the com.microsoft kernels) stay
float32: their type is tied to the activations'.

The source type is recorded in the model's metadata (`SOURCE_FLOAT_KEY`) while it is float32
inside, so that calibration data and probe inputs of the source type are cast on the way in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UserError
from qcompiler.ir import deferred, spill
from qcompiler.ir.meta import SOURCE_EDGES_KEY, SOURCE_FLOAT_KEY

log = logging.getLogger(__name__)

SUPPORTED = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
NAMES = {dtype: name for name, dtype in SUPPORTED.items()}
LOW_PRECISION = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
FLOAT_TYPE_CHOICES = ("source", "float32")
# Ops whose float inputs past the first are quantization parameters (typed like the activations).
_PARAMETER_READERS = {("", "QuantizeLinear"), ("", "DequantizeLinear"), ("", "DynamicQuantizeLinear")}


def type_name(dtype: ir.DataType) -> str:
    return NAMES.get(dtype, "float64" if dtype == ir.DataType.DOUBLE else dtype.name.lower())


def source_float_type(model: ir.Model, quantizes: bool = True) -> ir.DataType:
    """The model's float type: the floating type holding the most initializer bytes, else that of
    its floating graph inputs and outputs; float32 when it has no floating tensors. A type other
    than float32, float16 or bfloat16 is refused (one line naming it and the supported ones) when
    the pipeline `quantizes`; otherwise (`canonicalize` and lowering only) such a model passes
    through as it is, and float32 is returned (nothing to convert)."""
    weight_bytes: dict[ir.DataType, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            weight_bytes[tensor.dtype] = weight_bytes.get(tensor.dtype, 0) + tensor.nbytes
    edges = [v.dtype for v in (*model.graph.inputs, *model.graph.outputs) if v.dtype is not None and v.dtype.is_floating_point()]
    if weight_bytes:
        found = max(weight_bytes, key=lambda d: (weight_bytes[d], d.value))
    elif edges:
        found = edges[0]
    else:
        return ir.DataType.FLOAT
    for dtype in (found, *edges):
        if dtype not in NAMES and not quantizes:
            return ir.DataType.FLOAT
        if dtype not in NAMES:
            raise UserError(
                f"the model's float type is {type_name(dtype)}, which the compiler does not handle; "
                f"supported float types: {', '.join(SUPPORTED)} (convert the model to one of them)"
            )
    return found


def to_float32(model: ir.Model, source: ir.DataType) -> None:
    """Every float16/bfloat16 tensor, value type and dtype attribute of `model` becomes float32
    (in place), and the source type is recorded in the model's metadata. Float weights still on disk
    (a large source's, memory-mapped) are read as float32 when needed (`qcompiler.ir.deferred`),
    float32 sources' too."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.dtype in (ir.DataType.FLOAT, *LOW_PRECISION):
            value.const_value = deferred.as_float32(tensor)  # read (and converted) when needed: never all in memory
    if source not in LOW_PRECISION:
        return
    edges = [v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.dtype == source and not v.is_initializer()]
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in LOW_PRECISION:
            value.const_value = ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)
    for value in _all_values(model):
        if isinstance(value.type, ir.TensorType) and value.type.dtype in LOW_PRECISION:
            value.dtype = ir.DataType.FLOAT
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.INT and name in ("to", "dtype") and attr.value in {d.value for d in LOW_PRECISION}:
                node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT.value)
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in LOW_PRECISION:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float32), name=attr.value.name))
    model.metadata_props[SOURCE_FLOAT_KEY] = type_name(source)
    model.metadata_props[SOURCE_EDGES_KEY] = json.dumps(edges)
    log.info("%s model: computing in float32", type_name(source))


def _all_values(model: ir.Model):
    graph = model.graph
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs
        yield from (v for v in node.inputs if v is not None)


def recorded_source_type(model: ir.Model) -> ir.DataType:
    """The source float type `to_float32` recorded (float32 when none was)."""
    return SUPPORTED.get(model.metadata_props.get(SOURCE_FLOAT_KEY, "float32"), ir.DataType.FLOAT)


def cast_float_feeds(feeds: Mapping[str, np.ndarray], model: ir.Model) -> dict[str, np.ndarray]:
    """Floating arrays for the float32 inputs of a model brought to float32 from a lower source
    type, as float32 (others unchanged)."""
    if recorded_source_type(model) not in LOW_PRECISION:
        return dict(feeds)
    wanted = {v.name for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT}
    out = {}
    for name, array in feeds.items():
        array = np.asarray(array)
        if name in wanted and _floating(array.dtype):
            array = array.astype(np.float32)
        out[name] = array
    return out


def _floating(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def check_float_type_option(value: str | None) -> str:
    value = "source" if value is None else value
    if value not in FLOAT_TYPE_CHOICES:
        raise UserError(f"unknown float type '{value}'; choose one of: {', '.join(FLOAT_TYPE_CHOICES)}")
    return value


def restore_float_type(model: ir.Model, dtype: ir.DataType) -> int:
    """Give the emitted float32 `model` the float type `dtype` at its edges and in its float parts
    (see the module's doc). Returns how many Cast nodes were added."""
    model.metadata_props.pop(SOURCE_FLOAT_KEY, None)
    edges = set(json.loads(model.metadata_props.pop(SOURCE_EDGES_KEY, "[]")))
    if dtype not in LOW_PRECISION:
        return 0
    graph = model.graph
    taken = _names(model)
    casts = 0
    for index, value in enumerate(list(graph.inputs)):
        if value.is_initializer() or value.dtype != ir.DataType.FLOAT or value.name not in edges:
            continue
        edge = ir.Value(name=value.name, type=ir.TensorType(dtype), shape=value.shape)
        value.name = _fresh(f"{edge.name}.float32", taken)
        graph.inputs[index] = edge
        graph.insert_before(graph[0], ir.Node("", "Cast", [edge], [ir.AttrInt64("to", ir.DataType.FLOAT.value)], outputs=[value], name=value.name))
        casts += 1
    for index, value in enumerate(list(graph.outputs)):
        if value.dtype != ir.DataType.FLOAT or value.name not in edges:
            continue
        name = value.name
        value.name = _fresh(f"{name}.float32", taken)
        edge = ir.Value(name=name, type=ir.TensorType(dtype), shape=value.shape)
        graph.append(ir.Node("", "Cast", [value], [ir.AttrInt64("to", dtype.value)], outputs=[edge], name=_fresh(f"{name}.cast", taken)))
        graph.outputs[index] = edge
        casts += 1
    for value in list(graph.initializers.values()):
        if _is_float_part(value):
            casts += _store_as(value, dtype, graph, taken)
    return casts


def _is_float_part(value: ir.Value) -> bool:
    tensor = value.const_value
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size <= 1 or value.is_graph_output() or value.is_graph_input():
        return False
    for node, index in value.uses():
        if node.domain not in ("", "ai.onnx"):
            return False  # contrib kernels tie their float inputs to the activation type
        if (node.domain, node.op_type) in _PARAMETER_READERS and index >= 1:
            return False
    return bool(value.uses())


def _store_as(value: ir.Value, dtype: ir.DataType, graph: ir.Graph, taken: set[str]) -> int:
    """Store the initializer `value` as `dtype` and read it through one Cast to float32."""
    stored = value.const_value.numpy().astype(dtype.numpy())
    name = value.name
    graph.initializers.pop(name)
    value.name = _fresh(f"{name}.float32", taken)
    tensor = spill.kept(stored, name)  # while a large model compiles: on disk until written
    if tensor is None:
        tensor = ir.tensor(stored, dtype=dtype, name=name)
    del stored
    source = ir.Value(name=name, type=ir.TensorType(dtype), shape=value.shape, const_value=tensor)
    graph.register_initializer(source)
    value.const_value = None
    if _only_looked_up(value, graph):
        return sum(_cast_rows(node, source, graph, taken) for node in dict.fromkeys(node for node, _ in value.uses()))
    cast = ir.Node("", "Cast", [source], [ir.AttrInt64("to", ir.DataType.FLOAT.value)], outputs=[value], name=value.name)
    graph.insert_before(graph[0], cast)
    return 1


def _only_looked_up(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether every reader of `value` is a Gather of `graph` (not of a subgraph) taking rows of it
    (an embedding table)."""
    return all(node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 0 and node.graph is graph
               and not node.outputs[0].is_graph_output() for node, index in value.uses())


def _cast_rows(gather: ir.Node, table: ir.Value, graph: ir.Graph, taken: set[str]) -> int:
    """`gather` takes its rows from `table` (stored in the source type) and one Cast after it makes
    them float32: the session holds the table as stored, not a float32 copy of it."""
    rows = gather.outputs[0]
    as_float = ir.Value(name=rows.name, type=ir.TensorType(ir.DataType.FLOAT), shape=rows.shape)
    for user, index in list(rows.uses()):
        user.replace_input_with(index, as_float)
    rows.name = _fresh(f"{as_float.name}.{type_name(table.dtype)}", taken)
    rows.dtype = table.dtype
    gather.replace_input_with(0, table)
    graph.insert_after(gather, ir.Node("", "Cast", [rows], [ir.AttrInt64("to", ir.DataType.FLOAT.value)], outputs=[as_float],
                                       name=_fresh(f"{as_float.name}.cast", taken)))
    return 1


def _names(model: ir.Model) -> set[str]:
    graph = model.graph
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in node.outputs if v.name)
        if node.name:
            names.add(node.name)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    taken.add(name)
    return name
