"""Checks on an ONNX file's contents before any work: a malformed model is refused with one line
naming the problem (`UserError`, exit 2) instead of failing later as an internal error. In the
order `qcompiler.ir.load` runs them:

- `check_text`: every string is valid UTF-8.
- `check_opsets`: the default-domain opset is one onnx knows; every domain a node uses is
  imported (a file cut short before its opset imports is not read as opset 21); every op of the
  standard domains exists at the imported opset and gets as many inputs and outputs as it takes.
- `check_input_types`: every graph input declares its type.
- `check_graphs`: in the main graph, every subgraph and every function body, each value has one
  producer, every value read and every output is produced (within the graph or, for subgraphs,
  an enclosing one), the nodes form no cycle, initializers, graph inputs and outputs are named once.
  Nodes out of order (acyclic) are put in dependency order, keeping the given order where it holds.
- `rename_duplicate_nodes`: node names carry no meaning in ONNX (values are wired by value
  names) and ONNX Runtime runs models that repeat them, but the compiler keys layers, reports and
  `keep=` patterns by node name; so a repeated name is not refused but renamed, deterministically:
  the second `n` becomes `n.1` (the first free suffix), in graph order.
- `name_unnamed_graphs`: an empty graph name becomes `main_graph` (`subgraph` for a body).
- (`qcompiler.ir.external_data` reads external data inline here.)
- `unknown_minus_one_dims`: a declared dim of `-1` (how some exporters write "unknown") becomes
  an unknown dim; graph inputs and outputs then get a symbol of their own (`ir.name_free_dims`).
- `check_tensors`: no negative dimension or unknown element type anywhere; every stored tensor
  holds exactly the bytes or values its dims and type need.
- `densify_sparse`: a sparse initializer, or a Constant's `sparse_value`, becomes the dense
  tensor it stands for when that has at most `DENSE_LIMIT` elements and its indices are in range
  and distinct; otherwise, and for sparse tensors in any other attribute, the model is refused.
- `check_types`: onnx's strict type and shape inference finds no node whose inputs it cannot take.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx.defs
import onnx.numpy_helper
import onnx.shape_inference
import onnx_ir as ir

from qcompiler.errors import UserError, first_line, shown
from qcompiler.ir.external_data import messages_in, tensors_in

log = logging.getLogger(__name__)

MAX_OPSET = onnx.defs.onnx_opset_version()  # the newest default-domain opset onnx (and so this compiler) knows
DENSE_LIMIT = 1 << 26  # elements a sparse tensor may densify to (canonicalize's default fold limit)
_AGAIN = "export the model again"


def _domain(name: str) -> str:
    return "" if name == "ai.onnx" else name


def _shown_domain(name: str) -> str:
    return shown(name) if name else "ai.onnx"


# --------------------------------------------------------------------------------------------
# Walking graphs and nodes


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[onnx.AttributeProto, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr, attr.g
        for graph in attr.graphs:
            yield attr, graph


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph inside it, outermost first."""
    yield graph
    for node in graph.node:
        for _, sub in _subgraphs(node):
            yield from _graphs(sub)


def _all_graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield from _graphs(proto.graph)
    for function in proto.functions:
        for node in function.node:
            for _, sub in _subgraphs(node):
                yield from _graphs(sub)


def _all_nodes(proto: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, onnx.FunctionProto | None]]:
    """Every node of the model, with the function whose body holds it (None in graphs)."""
    for graph in _graphs(proto.graph):
        for node in graph.node:
            yield node, None
    for function in proto.functions:
        yield from _all_nodes_of(function)


def _node_text(node: onnx.NodeProto) -> str:
    return f"node '{shown(node.name)}' ({shown(node.op_type)})" if node.name else f"a {shown(node.op_type)} node"


# --------------------------------------------------------------------------------------------
# Opsets


_STANDARD = ("", "ai.onnx.ml")  # domains whose ops onnx defines (and so can be checked here)


def check_opsets(proto: onnx.ModelProto, source: str) -> None:
    """The default opset is at most `MAX_OPSET`; every domain used by a node is imported; every
    op of a standard domain exists at the imported version."""
    imports = {_domain(o.domain): o.version for o in proto.opset_import}
    version = imports.get("")
    if version is not None and version > MAX_OPSET:
        raise UserError(
            f"{shown(source)} uses opset {version}, newer than the newest this compiler reads ({MAX_OPSET}); "
            f"re-export the model at opset {MAX_OPSET} or lower"
        )
    local = {_domain(f.domain) for f in proto.functions}
    functions = {(_domain(f.domain), f.name) for f in proto.functions}
    for node, function in _all_nodes(proto):
        domain = _domain(node.domain)
        own = {_domain(o.domain): o.version for o in function.opset_import} if function is not None else {}
        imported = own.get(domain, imports.get(domain))
        if imported is None and domain not in local:
            raise UserError(
                f"{_node_text(node)} uses domain '{_shown_domain(domain)}', which the model imports no opset for; "
                f"the file may be cut short: {_AGAIN}"
            )
        if domain in _STANDARD and (domain, node.op_type) not in functions:
            _check_standard_op(node, domain, imported)


def _check_standard_op(node: onnx.NodeProto, domain: str, version: int) -> None:
    """The op exists at the imported opset and the node gives it as many inputs and outputs as
    its schema allows."""
    try:
        schema = onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        raise UserError(
            f"{_node_text(node)} uses op '{shown(node.op_type)}', which opset {version} of "
            f"'{_shown_domain(domain)}' does not define; {_AGAIN}"
        ) from None
    for kind, count, low, high in (("inputs", len(node.input), schema.min_input, schema.max_input),
                                   ("outputs", len(node.output), schema.min_output, schema.max_output)):
        if not low <= count <= high:
            allowed = f"{low}" if low == high else f"{low} to {high}" if high < 1 << 30 else f"at least {low}"
            raise UserError(f"{_node_text(node)} has {count} {kind}; {shown(node.op_type)} takes {allowed}: {_AGAIN}")


# --------------------------------------------------------------------------------------------
# Text and types


def check_text(proto: onnx.ModelProto) -> None:
    """Every name and string field is valid UTF-8 (protobuf hands an invalid one back as bytes,
    which no later step expects)."""
    for message, where in [(proto, ())] + list(messages_in(proto)):
        fields = message.ListFields() if not isinstance(message, onnx.TensorProto) else _tensor_text_fields(message)
        for field, value in fields:
            if field.type != field.TYPE_STRING:
                continue
            for text in (value,) if isinstance(value, (str, bytes)) else value:
                if isinstance(text, bytes):
                    place = f" ({', '.join(where)})" if where else ""
                    raise UserError(f"field '{field.name}'{place} holds text that is not valid UTF-8; the file may be damaged: {_AGAIN}")


def _tensor_text_fields(tensor: onnx.TensorProto):
    """A tensor's string fields (its bytes fields are left unread: reading copies them)."""
    descriptor = tensor.DESCRIPTOR.fields_by_name
    yield descriptor["name"], tensor.name
    for entry in tensor.external_data:
        yield descriptor["name"], entry.key
        yield descriptor["name"], entry.value


def check_input_types(proto: onnx.ModelProto) -> None:
    """Every graph input that is not an initializer declares its type (ONNX Runtime needs it)."""
    initializers = {t.name for t in proto.graph.initializer} | {s.values.name for s in proto.graph.sparse_initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind is None or (kind == "tensor_type" and value.type.tensor_type.elem_type == 0):
            raise UserError(f"graph input '{shown(value.name)}' declares no type; give it one: {_AGAIN}")


def check_types(proto: onnx.ModelProto) -> None:
    """onnx's type and shape inference, strict: a node whose inputs have types or shapes its op
    cannot take (a MatMul of [N, 4] by [3, 4], an Add of float and uint16) is refused here, as
    ONNX Runtime would refuse it later. It runs on `_skeleton(proto)`, which leaves out the bytes
    of large initializers, so a model of any size is checked at the cost of its structure."""
    try:
        onnx.shape_inference.infer_shapes(_skeleton(proto), check_type=True, strict_mode=True, data_prop=False)
    except Exception as exc:  # InferenceError, ValidationError, or a C++ error surfaced as RuntimeError
        if str(exc).count("Inference error(s)") > 1:
            # Raised inside a function body that onnx expands to infer an op (its own
            # MeanVarianceNormalization fails so at every opset): a limit of the inference, not
            # a fault of the model; ONNX Runtime has its own kernels.
            log.debug("type inference stopped inside a function body: %s", first_line(str(exc)))
            return
        node_errors = [line for line in str(exc).splitlines() if "(op_type:" in line]
        if node_errors and all("instead is null" in line for line in node_errors):
            # Only inputs whose type the inference could not carry so far (an op upstream it
            # cannot type at this opset, as in ONNX's own Inception v1 graph): missing knowledge,
            # not a conflict; ONNX Runtime types such graphs itself.
            log.debug("type inference stopped at an untyped value: %s", first_line(str(exc)))
            return
        reason = first_line(str(exc)).removeprefix("[ShapeInferenceError] ").removeprefix("[TypeInferenceError] ")
        raise UserError(f"the model is not well typed: {shown(reason, 200)}; {_AGAIN}") from None


_SKELETON_ELEMENTS = 1024  # initializers up to this size keep their data (shape inputs of Reshape, Expand, ...)


def _skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with the main graph's large initializers reduced to name, type and dims (sparse
    ones are dense by now)."""
    graph = onnx.GraphProto()
    for field, value in proto.graph.ListFields():
        if field.name in ("initializer", "sparse_initializer"):
            continue
        if field.type == field.TYPE_MESSAGE:
            getattr(graph, field.name).extend(value)  # node, input, output, value_info, ...: all repeated
        else:
            setattr(graph, field.name, value)  # name, doc_string
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) <= _SKELETON_ELEMENTS:
            graph.initializer.add().CopyFrom(tensor)
        else:
            graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
    model = onnx.ModelProto(ir_version=proto.ir_version, graph=graph)
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    return model


# --------------------------------------------------------------------------------------------
# Graph structure


def check_graphs(proto: onnx.ModelProto) -> None:
    """Producers, readers, outputs and order of every graph, subgraph and function body (nodes out
    of order are sorted, a cycle is refused)."""
    graph = proto.graph
    _check_unique([v.name for v in graph.input], "graph input", "")
    _check_unique([v.name for v in graph.output], "graph output", "")
    _check_graph(graph, frozenset(), "")
    for function in proto.functions:
        where = f" in function '{shown(function.name)}'"
        _check_body(list(function.input), [], function.node, list(function.output), frozenset(), where)


def _check_unique(names: Sequence[str], kind: str, where: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"{kind} '{shown(name)}' is listed twice{where}; keep one: {_AGAIN}")
        seen.add(name)


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], where: str) -> set[str]:
    initializers = [t.name for t in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    for name in _repeated(initializers):
        raise UserError(
            f"initializer '{shown(name)}' is defined twice{where}; ONNX Runtime would use the first and this "
            f"compiler the last, so the model is ambiguous: keep one"
        )
    return _check_body([v.name for v in graph.input], initializers, graph.node, [v.name for v in graph.output], outer, where)


def _repeated(names: Sequence[str]) -> Iterator[str]:
    seen = set()
    for name in names:
        if name in seen:
            yield name
        seen.add(name)


def _check_body(inputs, initializers, nodes, outputs, outer: frozenset[str], where: str) -> set[str]:
    """Check one graph or function body; returns the names it reads from enclosing graphs."""
    given = set(inputs) | set(initializers)
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in given:
                raise UserError(f"{_node_text(node)} produces '{shown(name)}', which is already a graph input or initializer{where}; {_AGAIN}")
            if name in producer:
                first = nodes[producer[name]]
                raise UserError(
                    f"value '{shown(name)}' is produced twice{where}, by {_node_text(first)} and {_node_text(node)}; "
                    f"each value needs one producer: {_AGAIN}"
                )
            producer[name] = index
    visible = outer | given | set(producer)
    free: set[str] = set()
    waits_for: list[set[int]] = []
    for index, node in enumerate(nodes):
        reads = [name for name in node.input if name]
        for attr, sub in _subgraphs(node):
            inner = f" in the '{shown(attr.name)}' body of {_node_text(node)}{where}"
            reads += sorted(_check_graph(sub, frozenset(visible), inner))
        deps = set()
        for name in reads:
            if name in producer:
                deps.add(producer[name])
            elif name in given:
                continue
            elif name in outer:
                free.add(name)
            else:
                raise UserError(
                    f"{_node_text(node)} reads '{shown(name)}'{where}, which no node, graph input or initializer "
                    f"produces; the model is incomplete: {_AGAIN}"
                )
        waits_for.append(deps)  # a node reading its own output waits forever: a cycle
    for name in outputs:
        if name in producer or name in given:
            continue
        if name in outer:
            free.add(name)
            continue
        raise UserError(f"graph output '{shown(name)}'{where} is produced by no node, graph input or initializer; {_AGAIN}")
    order = _dependency_order(nodes, waits_for, where)
    if order != sorted(order):
        _reorder(nodes, order)
    return free


def _dependency_order(nodes, waits_for: list[set[int]], where: str) -> list[int]:
    """The nodes' indices in dependency order, each at the earliest place the nodes before it
    allow (a graph already in order keeps it); a cycle is refused."""
    pending = [len(deps) for deps in waits_for]
    readers: list[list[int]] = [[] for _ in nodes]
    for index, deps in enumerate(waits_for):
        for dep in deps:
            readers[dep].append(index)
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers[index]:
            pending[reader] -= 1
            if pending[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) < len(nodes):
        stuck = [_node_text(nodes[i]) for i, count in enumerate(pending) if count > 0]
        more = f" and {len(stuck) - 3} more" if len(stuck) > 3 else ""
        raise UserError(f"{', '.join(stuck[:3])}{more}{where} form a cycle (each waits for another's output); ONNX graphs must be acyclic: {_AGAIN}")
    return order


def _reorder(nodes, order: list[int]) -> None:
    """Put a graph's nodes (a protobuf repeated field) in `order`: ONNX wants them sorted, and
    ONNX Runtime and the passes read them in that order."""
    ordered = [type(nodes[i])() for i in order]
    for copy, i in zip(ordered, order):
        copy.CopyFrom(nodes[i])
    del nodes[:]
    nodes.extend(ordered)


def name_unnamed_graphs(proto: onnx.ModelProto) -> int:
    """ONNX requires every graph to have a name (the emitted model is checked) and ONNX Runtime
    runs one without: an empty main graph name becomes `main_graph`, an empty subgraph name
    `subgraph`. Returns how many were named."""
    named = 0
    for graph in _all_graphs(proto):
        if not graph.name:
            graph.name = "main_graph" if graph is proto.graph else "subgraph"
            named += 1
    return named


def rename_duplicate_nodes(proto: onnx.ModelProto) -> int:
    """Give every repeated node name a `.k` suffix (the first free k), in graph order; the main
    graph and its subgraphs share one namespace, each function body has its own. Returns how many
    nodes were renamed."""
    renamed = _rename_in([node for graph in _graphs(proto.graph) for node in graph.node])
    for function in proto.functions:
        renamed += _rename_in([node for node, _ in _all_nodes_of(function)])
    if renamed:
        log.info("renamed %d node(s) whose names repeat an earlier node's (a name gets the first free '.k' suffix)", renamed)
    return renamed


def _all_nodes_of(function: onnx.FunctionProto) -> Iterator[tuple[onnx.NodeProto, onnx.FunctionProto]]:
    for node in function.node:
        yield node, function
        for _, sub in _subgraphs(node):
            for graph in _graphs(sub):
                for inner in graph.node:
                    yield inner, function


def _rename_in(nodes: list[onnx.NodeProto]) -> int:
    used = {node.name for node in nodes}
    seen: set[str] = set()
    renamed = 0
    for node in nodes:
        if not node.name:
            continue
        if node.name in seen:
            k = 1
            while f"{node.name}.{k}" in used:
                k += 1
            node.name = f"{node.name}.{k}"
            used.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed


# --------------------------------------------------------------------------------------------
# Tensors


def unknown_minus_one_dims(proto: onnx.ModelProto) -> int:
    """Declared dims of `-1` become unknown dims (neither a size nor a name); other negative dims
    are left for `check_tensors` to refuse. Returns how many were changed."""
    changed = 0
    for message, _ in messages_in(proto):
        if isinstance(message, onnx.TensorShapeProto.Dimension) and message.HasField("dim_value") and message.dim_value == -1:
            message.ClearField("dim_value")
            changed += 1
    return changed


def check_tensors(proto: onnx.ModelProto) -> None:
    """No negative dimension or unknown element type in any tensor or declared type; every stored
    tensor's data matches its dims and type (external data was read inline before, and checked as it was read)."""
    for message, where in messages_in(proto):
        value = where[-1] if where else "a value"
        if isinstance(message, onnx.TensorShapeProto.Dimension) and message.HasField("dim_value") and message.dim_value < 0:
            raise UserError(f"{value} declares dimension {message.dim_value}; dimensions are non-negative numbers or names: {_AGAIN}")
        if isinstance(message, (onnx.TypeProto.Tensor, onnx.TypeProto.SparseTensor)) and not _known_type(message.elem_type):
            raise UserError(f"{value} declares unknown element type {message.elem_type}; {_AGAIN}")
    for tensor, where in tensors_in(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # kept mapped: its file, offset and length were checked against dims and type
        what = f"tensor '{shown(tensor.name)}'" + (f" ({where})" if where else "")
        _check_tensor_data(tensor, what)


def _known_type(data_type: int) -> bool:
    try:
        ir.DataType(data_type)
    except ValueError:
        return False
    return True


def _check_tensor_data(tensor: onnx.TensorProto, what: str) -> None:
    if any(d < 0 for d in tensor.dims):
        raise UserError(f"{what} has a negative dimension {list(tensor.dims)}; {_AGAIN}")
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise UserError(f"{what} has unknown data type {tensor.data_type}; {_AGAIN}") from None
    if dtype == ir.DataType.UNDEFINED:
        raise UserError(f"{what} has no data type; {_AGAIN}")
    numel = math.prod(tensor.dims)
    if dtype == ir.DataType.STRING:
        have, need = len(tensor.string_data), numel
    elif tensor.raw_data:
        have, need = len(tensor.raw_data), math.ceil(numel * dtype.bitwidth / 8)
    else:
        try:
            onnx.numpy_helper.to_array(tensor)
            return
        except Exception:
            raise UserError(f"{what} holds data that does not fill its dims {list(tensor.dims)}; {_AGAIN}") from None
    if have != need:
        unit = "strings" if dtype == ir.DataType.STRING else "bytes"
        raise UserError(f"{what} holds {have} {unit} where its dims {list(tensor.dims)} and type {dtype.name} need {need}; {_AGAIN}")


# --------------------------------------------------------------------------------------------
# Sparse tensors


def densify_sparse(proto: onnx.ModelProto) -> int:
    """Sparse initializers and Constant `sparse_value`s become dense tensors; any other sparse
    attribute is refused. Returns how many were densified."""
    count = 0
    for graph in _all_graphs(proto):
        for sparse in graph.sparse_initializer:
            graph.initializer.append(_dense(sparse, f"sparse initializer '{shown(sparse.values.name)}'"))
            count += 1
        del graph.sparse_initializer[:]
    for node, _ in _all_nodes(proto):
        for attr in node.attribute:
            if not (attr.HasField("sparse_tensor") or attr.sparse_tensors):
                continue
            if node.op_type == "Constant" and _domain(node.domain) == "" and attr.name == "sparse_value" and not attr.sparse_tensors:
                dense = _dense(attr.sparse_tensor, f"the sparse_value of {_node_text(node)}")
                attr.Clear()
                attr.name, attr.type = "value", onnx.AttributeProto.TENSOR
                attr.t.CopyFrom(dense)
                count += 1
                continue
            raise UserError(f"{_node_text(node)} has a sparse tensor in attribute '{shown(attr.name)}'; store it dense: {_AGAIN}")
    return count


def _dense(sparse: onnx.SparseTensorProto, what: str) -> onnx.TensorProto:
    dims = list(sparse.dims)
    if any(d < 0 for d in dims):
        raise UserError(f"{what} has a negative dimension {dims}; {_AGAIN}")
    numel = math.prod(dims)
    if numel > DENSE_LIMIT:
        raise UserError(f"{what} stands for {numel} elements, more than the {DENSE_LIMIT} this compiler densifies; store it dense")
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    if values.ndim != 1 or values.dtype == object:
        raise UserError(f"{what} must hold a 1-D numeric list of values; {_AGAIN}")
    if indices.ndim == 2 and indices.shape[1] == len(dims) and len(dims) > 0:
        if (indices < 0).any() or (indices >= np.array(dims)).any():
            raise UserError(f"{what} has an index outside its dims {dims}; {_AGAIN}")
        flat = np.ravel_multi_index(indices.T, dims) if len(indices) else np.zeros(0, np.int64)
    elif indices.ndim == 1:
        flat = indices
    else:
        raise UserError(f"{what} has indices of shape {list(indices.shape)}; they must be [NNZ] or [NNZ, {len(dims)}]: {_AGAIN}")
    if len(flat) != len(values):
        raise UserError(f"{what} has {len(flat)} indices for {len(values)} values; {_AGAIN}")
    if len(flat) and ((flat < 0).any() or (flat >= numel).any()):
        raise UserError(f"{what} has an index outside its {numel} elements; {_AGAIN}")
    if len(np.unique(flat)) != len(flat):
        raise UserError(f"{what} names one position twice; {_AGAIN}")
    dense = np.zeros(numel, values.dtype)
    dense[flat] = values
    return onnx.numpy_helper.from_array(dense.reshape(dims), sparse.values.name)
