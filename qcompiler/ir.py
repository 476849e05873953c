"""The IR: a thin facade over `onnx_ir`.

There is one IR for every stage: `onnx_ir.Model`. This module adds what the compiler needs
around it and nothing more:

- `load` / `save`: ONNX files in and out, with the input checks a user needs (missing, empty,
  truncated or non-ONNX files, unknown op domains, external data that points outside the model's
  folder) and every model brought to one opset (`TARGET_OPSET`).
- `to_text` / `parse`: a deterministic, parseable text form in ONNX's textual syntax. Tensors with
  more than `ELIDE_ELEMENTS` elements are elided to dtype, shape and a content hash, listed in
  `# elided` header lines; `parse` restores them as zeros of that dtype and shape.
- `verify`: structural checks run between passes (every use has a definition before it, names are
  unique, outputs are produced, every domain is imported and every `qc` op passes its verifier).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx.printer
import onnx_ir as ir

from qcompiler.errors import UserError, first_line

log = logging.getLogger(__name__)

Model = ir.Model
TARGET_OPSET = 21
# The oldest opset the loader accepts: onnx's version converter upgrades every opset from 1, and
# `to_target_opset` refuses a conversion that changes the graph's inputs or outputs.
MIN_OPSET = 1
QC_DOMAIN = "qc"
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common", QC_DOMAIN})
ELIDE_ELEMENTS = 64
TEXT_HEADER = "# qcompiler-ir 1"
# Files above this size keep their weights in a side file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Sources whose external data passes this size keep it on disk, memory-mapped (onnx_ir's external
# tensors); a pass that rewrites a weight holds only its new value in memory.
MAPPED_DATA_THRESHOLD = EXTERNAL_DATA_THRESHOLD


class VerificationError(Exception):
    """The IR broke an invariant; raised by `verify`."""


# --------------------------------------------------------------------------------------------
# Loading and saving


def load(path: str | os.PathLike, convert: bool = True) -> ir.Model:
    """Read an ONNX file into the IR, checked and (unless `convert` is False) converted to
    `TARGET_OPSET`."""
    path = Path(path)
    proto = _read_proto(path)
    external_bytes = _check_external_data(proto, path)
    model = ir.serde.deserialize_model(proto)
    del proto
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    if external_bytes < MAPPED_DATA_THRESHOLD:
        # Weights in memory: passes rewrite them, and emitted artifacts must not point back into
        # the source model's folder (`save` reads mapped weights into the artifact).
        model = ir.external_data.load_to_model(model)
    else:
        log.info("%s: %.2f GB of external data stays on disk, memory-mapped", path.name, external_bytes / 1e9)
    check_domains(model)
    return to_target_opset(model, source=str(path)) if convert else model


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise UserError(f"model file '{path}' not found; check the path")
    if path.is_dir():
        raise UserError(f"'{path}' is a directory; pass the .onnx file inside it")
    if path.stat().st_size == 0:
        raise UserError(f"model file '{path}' is empty; export the model again")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, sometimes RuntimeError or ValueError
        raise UserError(
            f"'{path}' is not a readable ONNX model ({first_line(str(exc)) or type(exc).__name__}); "
            "it may be truncated or another format: export it again"
        ) from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise UserError(f"'{path}' holds no ONNX graph; it may be truncated or another format: export it again")
    return proto


def _check_external_data(proto: onnx.ModelProto, path: Path) -> int:
    """Refuse external-data locations that would read outside the model's folder, and missing or
    short data files. Returns the bytes of external data."""
    base = path.parent.resolve()
    total = 0
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise UserError(
                f"tensor '{tensor.name}' points its external data at '{location}', outside the model's "
                f"folder '{base}'; refused: keep external data files beside the model"
            )
        if not target.is_file():
            raise UserError(
                f"external data file '{location}' for tensor '{tensor.name}' is missing beside '{path}'; "
                "copy it there with the model"
            )
        entries = {e.key: e.value for e in tensor.external_data}
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else _tensor_bytes(tensor)
        size = target.stat().st_size
        if offset + length > size:
            raise UserError(
                f"external data file '{location}' is {size} bytes, too short for tensor '{tensor.name}' "
                f"(bytes {offset} to {offset + length}); the file is truncated: copy it again"
            )
        total += length
    return total


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its dtype and dims (sub-byte types rounded up)."""
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    bits = ir.DataType(tensor.data_type).bitwidth
    return (count * bits + 7) // 8


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def check_domains(model: ir.Model) -> None:
    """Every node's domain must be one we can run or a function defined in the model."""
    local = {f.domain for f in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise UserError(
                f"node '{node.name}' uses op '{node.op_type}' from unknown domain '{node.domain}'; "
                f"supported domains: ai.onnx, ai.onnx.ml, com.microsoft, {QC_DOMAIN}"
            )


def to_target_opset(model: ir.Model, source: str = "model") -> ir.Model:
    """Bring the default-domain opset to `TARGET_OPSET` (newer opsets are kept when the
    converter cannot go down; the passes only rely on ops that exist in both)."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        model.opset_imports[""] = TARGET_OPSET
        return _at_least_ir_version_for_target(model)
    if version < MIN_OPSET:
        raise UserError(
            f"{source} uses opset {version}; opsets from {MIN_OPSET} up are supported: "
            "re-export with a newer opset (onnx.version_converter can upgrade it)"
        )
    if version == TARGET_OPSET:
        return _at_least_ir_version_for_target(model)
    from onnxscript import version_converter

    before = _interface(model.graph)
    try:
        version_converter.convert_version(model, TARGET_OPSET, fallback=True)
    except Exception as exc:
        if version < TARGET_OPSET:
            raise UserError(
                f"{source}: could not convert opset {version} to {TARGET_OPSET} "
                f"({first_line(str(exc))}); re-export the model at opset {TARGET_OPSET}"
            ) from None
        log.info("%s keeps opset %d (no conversion down to %d: %s)", source, version, TARGET_OPSET, first_line(str(exc)))
    changed = _interface_changes(before, _interface(model.graph))
    if changed:
        raise UserError(
            f"{source}: converting opset {version} to {TARGET_OPSET} changed the graph's interface "
            f"({changed}); re-export the model at opset {TARGET_OPSET}"
        )
    return _at_least_ir_version_for_target(model)


def _interface(graph: ir.Graph) -> list[tuple[str, str, tuple | None]]:
    """Name, type and (for tensors) shape of each graph input (initializers aside) and output."""
    values = [v for v in graph.inputs if v.name not in graph.initializers] + list(graph.outputs)
    return [
        (v.name, str(v.type), tuple(v.shape) if isinstance(v.type, ir.TensorType) and v.shape is not None else None)
        for v in values
    ]


def _interface_changes(before: list, after: list) -> str:
    """What a conversion changed in the graph's inputs and outputs, or "". Names and types must
    stay; a tensor's shape may only gain dims the original left unknown (onnx's Scan 8->9
    adapter, for one, drops the batch axis from the graph's inputs)."""
    if [name for name, _, _ in before] != [name for name, _, _ in after]:
        return f"names {[n for n, _, _ in before]} -> {[n for n, _, _ in after]}"
    for (name, type_a, dims_a), (_, type_b, dims_b) in zip(before, after):
        if type_a != "None" and type_b != type_a:
            return f"'{name}' {type_a} -> {type_b}"
        if dims_a is not None and (
            dims_b is None or len(dims_b) != len(dims_a) or any(isinstance(a, int) and b != a for a, b in zip(dims_a, dims_b))
        ):
            return f"'{name}' shape {list(dims_a)} -> {list(dims_b) if dims_b is not None else None}"
    return ""


def _at_least_ir_version_for_target(model: ir.Model) -> ir.Model:
    """Raise the IR version to the lowest one `TARGET_OPSET` allows. The version converter
    leaves it alone, and below IR 4 every initializer must also be a graph input, which the
    passes do not keep (a folded constant becomes an initializer only)."""
    minimum = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", TARGET_OPSET)])
    model.ir_version = max(model.ir_version or 0, minimum)
    return model


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def mapped_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """The initializers still read from an external data file (memory-mapped)."""
    return [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]


def is_large(model: ir.Model) -> bool:
    """Whether the model cannot travel as one protobuf: weights past `EXTERNAL_DATA_THRESHOLD` or
    still mapped from their source file."""
    return bool(mapped_tensors(model)) or initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def save(model: ir.Model, path: str | os.PathLike, progress=None) -> list[Path]:
    """Write `model` to `path` (weights in `<name>.data` beside it when the file would pass
    protobuf's limit; weights still mapped from the source are copied in, never referenced).
    `progress(done_bytes, total_bytes)` is called as external data is written. Returns the files
    written."""
    path = Path(path)
    total = initializer_bytes(model)
    if total < EXTERNAL_DATA_THRESHOLD:
        if mapped_tensors(model):
            ir.external_data.load_to_model(model)
        proto = to_proto(model)
        path.write_bytes(proto.SerializeToString(deterministic=True))
        return [path]
    data_name = path.name + ".data"
    written = 0

    def report(tensor, _info) -> None:
        nonlocal written
        written += tensor.nbytes
        if progress is not None:
            progress(written, total)

    ir.save(model, str(path), external_data=data_name, callback=report)
    return [path, path.parent / data_name]


# --------------------------------------------------------------------------------------------
# Text form


def tensor_digest(tensor: ir.TensorProtocol) -> str:
    """A short content hash: dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(f"{tensor.dtype.name}{tuple(tensor.shape)}".encode())
    h.update(tensor.tobytes())
    return h.hexdigest()[:16]


def _dtype_text(dtype: ir.DataType) -> str:
    return onnx.helper.tensor_dtype_to_string(dtype.value).removeprefix("TensorProto.").lower()


def to_text(model: ir.Model, elide_over: int = ELIDE_ELEMENTS) -> str:
    """The model in ONNX textual syntax, deterministic, with large tensors elided.

    Elided initializers are listed first as `# elided <dtype>[<dims>] "<name>" sha256:<hash>`; their
    data is hashed one tensor at a time and never copied into a protobuf."""
    header = [TEXT_HEADER]
    elided = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or int(np.prod(tensor.shape.numpy())) <= elide_over:
            continue
        dims = ",".join(str(d) for d in tensor.shape.numpy())
        name = value.name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        header.append(f'# elided {_dtype_text(tensor.dtype)}[{dims}] "{name}" sha256:{tensor_digest(tensor)}')
        elided.append(value)
    with _initializers_detached(model.graph, elided):
        proto = to_proto(model)
    del proto.graph.value_info[:]  # intermediate types make the text hard to read; the checker re-infers them
    body = _map_quoted(onnx.printer.to_text(proto), _ESCAPES)
    return "\n".join(header) + "\n" + body.rstrip() + "\n"


@contextlib.contextmanager
def _initializers_detached(graph: ir.Graph, values: list[ir.Value]):
    """Within the block, `values` are not initializers of `graph` (their tensors set aside); after
    it, every initializer is back, in its original order."""
    if not values:
        yield
        return
    order = list(graph.initializers.values())
    tensors = {}
    for value in values:
        tensors[value.name] = value.const_value
        graph.initializers.pop(value.name)
        value.const_value = None
    try:
        yield
    finally:
        for value in values:
            value.const_value = tensors[value.name]
        for value in order:
            graph.initializers.pop(value.name, None)
        for value in order:
            graph.initializers.add(value)


# Control characters inside quoted names are written as escapes, one line stays one line. ONNX's
# parser does not read these escapes, so `parse` swaps them for private-use characters first and
# restores them in the parsed names.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_PLACEHOLDERS = {"\\n": "\ue000", "\\r": "\ue001", "\\t": "\ue002"}
_RESTORE = {"\ue000": "\n", "\ue001": "\r", "\ue002": "\t"}


def _map_quoted(text: str, table: dict[str, str]) -> str:
    """Replace `table`'s keys inside double-quoted strings only (backslash escapes respected)."""
    out, i, quoted = [], 0, False
    while i < len(text):
        ch = text[i]
        if quoted and ch == "\\" and text[i : i + 2] in table:
            out.append(table[text[i : i + 2]])
            i += 2
            continue
        if quoted and ch == "\\":
            out.append(text[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        out.append(table.get(ch, ch) if quoted else ch)
        i += 1
    return "".join(out)


def _restore_names(proto: onnx.ModelProto) -> None:
    def fix(text: str) -> str:
        for placeholder, ch in _RESTORE.items():
            text = text.replace(placeholder, ch)
        return text

    def walk(graph: onnx.GraphProto) -> None:
        for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
            for item in seq:
                item.name = fix(item.name)
        for node in graph.node:
            node.name = fix(node.name)
            node.input[:] = [fix(n) for n in node.input]
            node.output[:] = [fix(n) for n in node.output]
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)


_ELIDED = re.compile(r'^# elided (\w+)\[([0-9,]*)\] "((?:[^"\\]|\\.)*)" sha256:[0-9a-f]+\s*$')


def parse(text: str) -> ir.Model:
    """Read ONNX textual syntax (as written by `to_text` or by hand) into the IR.

    Elided tensors come back as zeros of their dtype and shape."""
    elided = []
    for line in text.splitlines():
        match = _ELIDED.match(line)
        if match:
            dtype, dims, name = match.groups()
            name = name.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            shape = [int(d) for d in dims.split(",") if d]
            elided.append((dtype, shape, name))
    try:
        proto = onnx.parser.parse_model(_map_quoted(text, _PLACEHOLDERS))
    except Exception as exc:
        raise UserError(f"IR text does not parse: {first_line(str(exc))}") from None
    _restore_names(proto)
    for dtype, shape, name in elided:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, dtype.upper()))
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(shape, np_dtype), name))
    return ir.serde.deserialize_model(proto)


# --------------------------------------------------------------------------------------------
# Verification


def verify(model: ir.Model) -> None:
    """Check the invariants every pass must keep; raise `VerificationError` naming the node."""
    from qcompiler import ops

    graph = model.graph
    defined: set[str] = set()
    for value in list(graph.inputs) + list(graph.initializers.values()):
        if value.name in defined and value.name not in graph.initializers:
            raise VerificationError(f"value '{value.name}' is defined twice")
        defined.add(value.name)
    for node in graph:
        if node.domain not in model.opset_imports and not (node.domain == "ai.onnx" and "" in model.opset_imports):
            raise VerificationError(f"node '{node.name}' ({node.op_type}) uses domain '{node.domain}' that the model does not import")
        for value in node.inputs:
            if value is not None and value.name and value.name not in defined and not _is_outer_scope(value, graph):
                raise VerificationError(
                    f"node '{node.name}' ({node.op_type}) reads '{value.name}' before it is defined"
                )
        for value in node.outputs:
            if not value.name:  # an optional output left out (Attention's "" outputs)
                continue
            if value.name in defined:
                raise VerificationError(f"value '{value.name}' is produced twice (again by node '{node.name}')")
            defined.add(value.name)
        if node.domain == QC_DOMAIN:
            ops.verify_node(node)
    for value in graph.outputs:
        if value.name not in defined:
            raise VerificationError(f"graph output '{value.name}' is not produced by any node")


def _is_outer_scope(value: ir.Value, graph: ir.Graph) -> bool:
    return value.graph is not None and value.graph is not graph


def qc_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes of our own domain, which only the reference executor and the backends understand."""
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == QC_DOMAIN]


STORED_WEIGHTS = "qc.stored_weights"  # metadata_props key: every constant input of the node is weight bytes
WEIGHT_CONSUMERS = frozenset({("", "MatMul"), ("", "Gemm"), ("", "Conv"), ("", "ConvTranspose"), ("com.microsoft", "MatMulNBits"),
                              ("com.microsoft", "MatMulIntegerToFloat")})
# Which inputs of a weight consumer hold its stored weight (default: the second).
_WEIGHT_INPUTS = {"MatMulNBits": (1, 2, 3, 4, 5), "MatMulIntegerToFloat": (1, 3, 5)}  # codes, scales, zero points (, g_idx, bias)


def weight_values(model: ir.Model) -> list[ir.Value]:
    """Initializers that hold weights: the second operand of MatMul/Gemm/Conv (and of the contrib
    MatMulNBits and MatMulIntegerToFloat: codes, scales and zero points), directly or through a
    chain of nodes that read only constants (such as DequantizeLinear of packed codes, scales and zero points), the
    constant indices of a Gather that permutes the first operand, and the constant inputs of nodes
    marked `qc.stored_weights` (sparse outlier corrections). Deduplicated, in graph order."""
    found: dict[str, ir.Value] = {}
    for node in model.graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if node.metadata_props.get(STORED_WEIGHTS):  # e.g. sparse outlier corrections
            for inp in node.inputs:
                for value in _constant_sources(inp) if inp is not None else ():
                    found.setdefault(value.name, value)
        if (domain, node.op_type) in WEIGHT_CONSUMERS and len(node.inputs) > 1 and node.inputs[1] is not None:
            weights = [node.inputs[i] for i in _WEIGHT_INPUTS.get(node.op_type, (1,)) if i < len(node.inputs)]
            for value in (v for w in weights if w is not None for v in _constant_sources(w)):
                found.setdefault(value.name, value)
            gather = node.inputs[0].producer() if node.inputs[0] is not None else None
            if gather is not None and gather.op_type == "Gather" and len(gather.inputs) > 1:  # an input permutation
                for value in _constant_sources(gather.inputs[1]):
                    found.setdefault(value.name, value)
    return list(found.values())


def _constant_sources(value: ir.Value) -> list[ir.Value]:
    if value.const_value is not None and value.is_initializer():
        return [value]
    producer = value.producer()
    if producer is None:
        return []
    sources = []
    for inp in producer.inputs:
        if inp is None:
            continue
        found = _constant_sources(inp)
        if not found:
            return []  # depends on a run-time value: not a stored weight
        sources.extend(found)
    return sources


def weight_count(model: ir.Model) -> int:
    """Number of weight elements (see `weight_values`)."""
    return sum(v.const_value.size for v in weight_values(model))
