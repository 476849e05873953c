"""The IR: a thin facade over `onnx_ir`.

There is one IR for every stage: `onnx_ir.Model`. This module adds what the compiler needs
around it and nothing more:

- `load` / `save`: ONNX files in and out, with the input checks a user needs (missing, empty,
  truncated or non-ONNX files, unknown op domains, malformed graphs and tensors: `load_checks`;
  external data that points outside the model's folder: `external_data`) and every model brought
  to one opset (`TARGET_OPSET`).
- `to_text` / `parse`: a deterministic, parseable text form in ONNX's textual syntax. Tensors with
  more than `ELIDE_ELEMENTS` elements, and float16/bfloat16 tensors (which the syntax writes as raw
  bit patterns), are elided to dtype, shape and a content hash, listed in `# elided` header lines;
  `parse` restores them as zeros of that dtype and shape.
- `verify`: structural checks run between passes (every use has a definition before it, names are
  unique, outputs are produced, every domain is imported and every `qc` op passes its verifier).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import unicodedata
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx.parser
import onnx.printer
import onnx_ir as ir

from qcompiler.dialect import ops
from qcompiler.errors import UserError, VerificationError, first_line, shown  # noqa: F401  (VerificationError: part of this API)
from qcompiler.ir.meta import STORED_WEIGHTS  # noqa: F401  (part of this API)
from qcompiler.dialect.op_registry import QC_DOMAIN

log = logging.getLogger(__name__)

Model = ir.Model
TARGET_OPSET = 21
# The oldest opset the loader accepts: onnx's version converter upgrades every opset from 1, and
# `to_target_opset` refuses a conversion that changes the graph's inputs or outputs.
MIN_OPSET = 1
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common", QC_DOMAIN})
ELIDE_ELEMENTS = 64
TEXT_HEADER = "# qcompiler-ir 1"
# Files above this size keep their weights in a side file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Sources whose external data passes this size keep it on disk, memory-mapped (onnx_ir's external
# tensors); a pass that rewrites a weight holds only its new value in memory. Read in, a float16
# source of S bytes is held as 2 S in float32, and a whole-model session holds it again: past about
# a quarter of a gigabyte that passes the memory a compile should take (half the source plus 2 GB).
MAPPED_DATA_THRESHOLD = 256 << 20


# --------------------------------------------------------------------------------------------
# Loading and saving


def load(path: str | os.PathLike, convert: bool = True) -> ir.Model:
    """Read an ONNX file into the IR, checked and (unless `convert` is False) converted to
    `TARGET_OPSET`. Every check runs on the file's contents before any pass: a malformed model
    (`load_checks`) or external data that would read outside the model's folder
    (`external_data`) is refused with one line. External data is read into the model here, so
    the IR refers to no file, except that the main graph's initializers stay memory-mapped when
    they hold more than `MAPPED_DATA_THRESHOLD` bytes (their files checked first); emitted
    artifacts never point back into the source's folder."""
    from qcompiler.ir import external_data, load_checks

    path = Path(path)
    proto = _read_proto(path)
    load_checks.check_text(proto)
    load_checks.check_opsets(proto, str(path))
    load_checks.check_input_types(proto)
    load_checks.check_graphs(proto)
    load_checks.rename_duplicate_nodes(proto)
    load_checks.name_unnamed_graphs(proto)
    mapped = external_data.external_bytes(proto, path) >= MAPPED_DATA_THRESHOLD  # every location checked
    linked = external_data.multiply_linked(proto, path) if mapped else None
    if linked is not None:
        raise UserError(
            f"external data file '{shown(linked[0])}' of '{shown(path.name)}' has {linked[1]} hard links, and ONNX IR "
            f"refuses to memory-map such a file (weights over {MAPPED_DATA_THRESHOLD >> 20} MiB are read that way); "
            "copy it to a file of its own in the model's folder"
        )
    external_data.inline_external_data(proto, path, keep_initializers=mapped)
    load_checks.unknown_minus_one_dims(proto)
    load_checks.check_tensors(proto)
    load_checks.densify_sparse(proto)
    load_checks.check_types(proto)
    model = ir.serde.deserialize_model(proto)
    del proto
    if mapped:
        # The main graph's initializers stay on disk, memory-mapped from files checked above; a pass
        # that rewrites a weight holds only its new value in memory, and `save` reads mapped weights
        # into the artifact, which never points back into the source model's folder.
        ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
        log.info("%s: external data over %d MiB stays on disk, memory-mapped", shown(path.name), MAPPED_DATA_THRESHOLD >> 20)
    check_domains(model)
    lift_constant_weights(model)
    name_free_dims(model)
    return to_target_opset(model, source=str(path)) if convert else model


LIFT_ELEMENTS = 16  # Constant nodes with more elements than this hold weights, not shapes or axes


def lift_constant_weights(model: ir.Model) -> int:
    """Tensors held by `Constant` nodes (more than `LIFT_ELEMENTS` elements) become initializers,
    as exporters that store weights that way meant them: counted as weights, elided in text."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    before = len(model.graph.initializers)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=LIFT_ELEMENTS)(model)
    lifted = len(model.graph.initializers) - before
    if lifted:
        log.info("%d weights stored in Constant nodes lifted to initializers", lifted)
    return lifted


def name_free_dims(model: ir.Model) -> int:
    """Graph input and output dims stored as a negative size (`-1`) or without a name (`?`)
    become free dims, each a symbol of its own (`<value>_dim<axis>`): a `-1` is not a size, and
    two unnamed dims are not the same dim."""
    graph = model.graph
    taken = {str(d) for v in [*graph.inputs, *graph.outputs] if v.shape is not None
             for d in v.shape if isinstance(d, ir.SymbolicDim) and d.value is not None}
    named = 0
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is None:
            continue
        dims = list(value.shape)
        for axis, dim in enumerate(dims):
            free = (isinstance(dim, int) and dim < 0) or (isinstance(dim, ir.SymbolicDim) and dim.value is None)
            if not free:
                continue
            symbol = base = re.sub(r"[^A-Za-z0-9_]", "_", f"{value.name}_dim{axis}")
            suffix = 1
            while symbol in taken:
                symbol, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(symbol)
            dims[axis] = ir.SymbolicDim(symbol)
            named += 1
        if named:
            value.shape = ir.Shape(dims)
    return named


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


def check_domains(model: ir.Model) -> None:
    """Every node's domain must be one we can run or a function defined in the model."""
    local = {f.domain for f in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise UserError(
                f"node '{shown(node.name)}' uses op '{shown(node.op_type)}' from unknown domain '{shown(node.domain)}'; "
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
            f"{shown(source)} uses opset {version}; opsets from {MIN_OPSET} up are supported: "
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
                f"{shown(source)}: could not convert opset {version} to {TARGET_OPSET} "
                f"({first_line(str(exc))}); re-export the model at opset {TARGET_OPSET}"
            ) from None
        log.info("%s keeps opset %d (no conversion down to %d: %s)", source, version, TARGET_OPSET, first_line(str(exc)))
    changed = _interface_changes(before, _interface(model.graph))
    if changed:
        raise UserError(
            f"{shown(source)}: converting opset {version} to {TARGET_OPSET} changed the graph's interface "
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
    passes do not keep (a folded constant becomes an initializer only). Those listings go: below
    IR 4 they are how weights had to be written (ONNX Runtime does not let a caller override them),
    while from IR 4 an initializer that is also an input is an overridable default, which nothing
    may fold (a Reshape of a weight by such a shape would stay a run-time op, its layer unquantized)."""
    if (model.ir_version or 0) < 4:
        weights = [v for v in model.graph.inputs if v.name in model.graph.initializers]
        for value in weights:
            model.graph.inputs.remove(value)
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


def on_disk_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    """The initializers still read from a file: memory-mapped, or computed from a mapped one when
    read (`qcompiler.ir.deferred`)."""
    from qcompiler.ir import deferred

    return [v.const_value for v in model.graph.initializers.values() if deferred.is_on_disk(v.const_value)]


def is_large(model: ir.Model) -> bool:
    """Whether the model cannot travel as one protobuf: weights past `EXTERNAL_DATA_THRESHOLD` or
    still on disk (`on_disk_tensors`)."""
    return bool(on_disk_tensors(model)) or initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def save(model: ir.Model, path: str | os.PathLike, progress=None, external_from: int | None = None) -> list[Path]:
    """Write `model` to `path` (weights in `<name>.data` beside it when they reach `external_from`
    bytes, by default where the file would pass protobuf's limit, or some weights are still on disk,
    a large source's: ONNX Runtime then maps them from the file instead of holding a parsed copy
    beside the read one; weights still mapped from the source are copied in, never referenced),
    never holding the model's serialization in memory (`qcompiler.ir.proto_stream`).
    `progress(done_bytes, total_bytes)` is called as external data is written. Returns the files
    written."""
    from qcompiler.ir import proto_stream

    path = Path(path)
    total = initializer_bytes(model)
    if total < (EXTERNAL_DATA_THRESHOLD if external_from is None else external_from) and not on_disk_tensors(model):
        with open(path, "wb") as file:  # one weight's bytes in memory at a time, mapped ones read from their files
            proto_stream.write_model(model, file, progress)
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


def to_text(model: ir.Model, elide_over: int | None = ELIDE_ELEMENTS) -> str:
    r"""The model in ONNX textual syntax, deterministic, with large tensors elided: those of more
    than `elide_over` elements and every float16/bfloat16 one (ONNX's syntax writes those as raw bit
    patterns, which no reader can check); `elide_over=None`: every tensor printed.

    Elided initializers are listed first as `# elided <dtype>[<dims>] "<name>" sha256:<hash>`; their
    data is hashed one tensor at a time and never copied into a protobuf.
    Inside quoted names and strings, characters that could break a line or hide text (controls,
    line and paragraph separators, format and private-use characters) are written as escapes
    (`\n`, `\r`, `\t`, `\uXXXX`, `\UXXXXXXXX`): one line of text stays one line, whatever the
    model's names hold."""
    header = [TEXT_HEADER]
    elided = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not _elided(tensor, elide_over):
            continue
        dims = ",".join(str(d) for d in tensor.shape.numpy())
        header.append(f'# elided {_dtype_text(tensor.dtype)}[{dims}] "{_escape_name(value.name)}" sha256:{tensor_digest(tensor)}')
        elided.append(value)
    with _initializers_detached(model.graph, elided):
        proto = to_proto(model)
    del proto.graph.value_info[:]  # intermediate types make the text hard to read; the checker re-infers them
    body = _escape_quoted(onnx.printer.to_text(proto))
    return "\n".join(header) + "\n" + body.rstrip() + "\n"


def _elided(tensor: ir.TensorProtocol, elide_over: int | None) -> bool:
    if elide_over is None:
        return False
    return tensor.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) or int(np.prod(tensor.shape.numpy())) > elide_over


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


_SHORT_ESCAPES = {"\n": "n", "\r": "r", "\t": "t"}
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def _unsafe(ch: str) -> bool:
    """A character written as an escape inside quotes: it could break a line (controls, U+2028,
    U+2029, U+0085) or hide or reorder text (format and private-use characters)."""
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _escape_char(ch: str) -> str:
    if ch in _SHORT_ESCAPES:
        return "\\" + _SHORT_ESCAPES[ch]
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _escape_name(name: str) -> str:
    """A name as written between the quotes of an `# elided` line."""
    out = []
    for ch in name:
        out.append("\\" + ch if ch in '"\\' else _escape_char(ch) if _unsafe(ch) else ch)
    return "".join(out)


def _read_escape(text: str, i: int) -> tuple[str, int] | None:
    r"""The character our escape at `text[i]` (a backslash) stands for and its length; None when
    it is not one of ours (`\\` and `\"` are ONNX's own)."""
    kind = text[i + 1 : i + 2]
    if kind in ("n", "r", "t"):
        return {"n": "\n", "r": "\r", "t": "\t"}[kind], 2
    width = {"u": 4, "U": 8}.get(kind)
    digits = text[i + 2 : i + 2 + width] if width else ""
    if width and len(digits) == width and all(c in "0123456789abcdefABCDEF" for c in digits):
        code = int(digits, 16)
        if code <= 0x10FFFF:
            return chr(code), 2 + width
    return None


def _unescape_name(text: str) -> str:
    """The inverse of `_escape_name`."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            ours = _read_escape(text, i)
            if ours is not None:
                out.append(ours[0])
                i += ours[1]
            else:
                out.append(text[i + 1])
                i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _scan_quoted(text: str, inside) -> str:
    r"""Rewrite `text`, passing each position inside a double-quoted string to `inside(text, i)`,
    which returns (replacement, characters consumed) or None to keep the character. ONNX's own
    escapes (`\\`, `\"`) are kept; outside quotes a `#` comment runs to the end of its line."""
    out, i, quoted = [], 0, False
    while i < len(text):
        ch = text[i]
        if quoted:
            done = inside(text, i)
            if done is not None:
                out.append(done[0])
                i += done[1]
                continue
            if ch == "\\":
                out.append(text[i : i + 2])
                i += 2
                continue
        elif ch == "#":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(text[i:end])
            i = end
            continue
        if ch == '"':
            quoted = not quoted
        out.append(ch)
        i += 1
    return "".join(out)


def _escape_quoted(text: str) -> str:
    """Printer output with every unsafe character inside quotes written as an escape."""
    return _scan_quoted(text, lambda t, i: (_escape_char(t[i]), 1) if _unsafe(t[i]) else None)


def _unescape_quoted(text: str, nul: str) -> str:
    """Text for ONNX's parser: our escapes inside quotes become the characters they stand for
    (the parser reads any of them raw but NUL, which becomes `nul`)."""

    def inside(t: str, i: int):
        if t[i] != "\\":
            return None
        ours = _read_escape(t, i)
        if ours is None:
            return None
        return (nul if ours[0] == "\x00" else ours[0]), ours[1]

    return _scan_quoted(text, inside)


def _unused_character(text: str) -> str:
    """A private-use character that `text` does not hold (stands for NUL while ONNX parses)."""
    code = 0x10FFFD
    while chr(code) in text:
        code -= 1
    return chr(code)


def _restore_nul(message, nul: str) -> None:
    """Replace `nul` by NUL in every string of a parsed proto."""
    encoded = nul.encode()
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in (value,) if isinstance(value, google.protobuf.message.Message) else value:
                _restore_nul(item, nul)
        elif field.type in (field.TYPE_STRING, field.TYPE_BYTES):
            fix = (lambda v: v.replace(nul, "\x00")) if field.type == field.TYPE_STRING else (lambda v: v.replace(encoded, b"\x00"))
            if isinstance(value, (str, bytes)):
                setattr(message, field.name, fix(value))
            else:
                value[:] = [fix(v) for v in value]


_ELIDED = re.compile(r'^# elided (\w+)\[([0-9,]*)\] "((?:[^"\\]|\\.)*)" sha256:[0-9a-f]+\s*$')


def parse(text: str) -> ir.Model:
    """Read ONNX textual syntax (as written by `to_text` or by hand) into the IR.

    Elided tensors come back as zeros of their dtype and shape; escaped characters in names come
    back as themselves."""
    elided, lines = [], []
    for line in text.split("\n"):
        match = _ELIDED.match(line)
        if match:
            dtype, dims, name = match.groups()
            shape = [int(d) for d in dims.split(",") if d]
            elided.append((dtype, shape, _unescape_name(name)))
            line = ""  # read here; the line numbers ONNX's parser reports stay right
        lines.append(line)
    nul = _unused_character(text)
    try:
        proto = onnx.parser.parse_model(_unescape_quoted("\n".join(lines), nul))
    except Exception as exc:
        raise UserError(f"IR text does not parse: {first_line(str(exc))}") from None
    if "\\u0000" in text or "\\U00000000" in text:
        _restore_nul(proto, nul)
    for dtype, shape, name in elided:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, dtype.upper()))
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(shape, np_dtype), name))
    return ir.serde.deserialize_model(proto)


# --------------------------------------------------------------------------------------------
# Verification


def verify(model: ir.Model) -> None:
    """Check the invariants every pass must keep; raise `VerificationError` naming the node."""
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

# The one answer to "is this node a weighted layer?": the ops that multiply their first input (the
# activation) by a stored weight, and which of their inputs hold that weight (None: every input after
# the first). A layer is such a node whose weight is computed from initializers alone (`is_weighted_layer`).
WEIGHTED_LAYER_OPS: dict[tuple[str, str], tuple[int, ...] | None] = {
    ("", "MatMul"): (1,),
    ("", "Gemm"): (1,),
    ("", "Conv"): (1,),
    ("", "ConvTranspose"): (1,),
    (QC_DOMAIN, "MixedMatMul"): None,  # permutation, class inputs, sparse outliers
    ("com.microsoft", "MatMulNBits"): (1, 2, 3, 4, 5),  # codes, scales, zero points, g_idx, bias
    ("com.microsoft", "MatMulIntegerToFloat"): (1, 3, 5),  # codes, scales, zero points
}


def op_key(node: ir.Node) -> tuple[str, str]:
    """(domain, op_type), with the default domain spelled ''."""
    return ("" if node.domain == "ai.onnx" else node.domain, node.op_type)


def producer_of(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node that computes `value` when it is a `domain`'s `op_type` (the default domain as ''); else None."""
    node = value.producer() if value is not None else None
    return node if node is not None and op_key(node) == (domain, op_type) else None


def weight_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs of a `WEIGHTED_LAYER_OPS` node that hold its weight (none for other nodes)."""
    key = op_key(node)
    if key not in WEIGHTED_LAYER_OPS:
        return []
    indices = WEIGHTED_LAYER_OPS[key]
    if indices is None:
        return [v for v in node.inputs[1:] if v is not None]
    return [node.inputs[i] for i in indices if i < len(node.inputs) and node.inputs[i] is not None]


def is_weighted_layer(node: ir.Node, memo: dict | None = None) -> bool:
    """A weighted layer: a `WEIGHTED_LAYER_OPS` node whose second input is computed from initializers
    alone (so `MatMul(q, k)` of two activations is not one)."""
    if op_key(node) not in WEIGHTED_LAYER_OPS or len(node.inputs) < 2:
        return False
    return bool(constant_sources(node.inputs[1], memo))


def constant_sources(value: ir.Value | None, memo: dict | None = None) -> list[ir.Value] | None:
    """The initializers `value` is computed from, or None when it depends on a run-time value
    (`memo` caches answers across calls on one graph)."""
    if value is None:
        return None
    memo = {} if memo is None else memo
    key = id(value)
    if key in memo:
        return memo[key]
    if value.is_initializer() and value.const_value is not None:
        found: list[ir.Value] | None = [value]
    else:
        producer = value.producer()
        found = None
        if producer is not None:
            found = []
            for inp in producer.inputs:
                if inp is None:
                    continue
                sub = constant_sources(inp, memo)
                if sub is None:
                    found = None
                    break
                found.extend(sub)
    memo[key] = found
    return found


def weight_values(model: ir.Model) -> list[ir.Value]:
    """Initializers that hold weights: the weight inputs of every `WEIGHTED_LAYER_OPS` node (for the
    contrib MatMulNBits and MatMulIntegerToFloat: codes, scales and zero points), directly or through
    a chain of nodes that read only constants (such as DequantizeLinear of packed codes, scales and
    zero points), the constant indices of a Gather that permutes the first operand, and the constant
    inputs of nodes marked `qc.stored_weights` (sparse outlier corrections). Deduplicated, in graph order."""
    found: dict[str, ir.Value] = {}
    memo: dict = {}
    for node in model.graph:
        if node.metadata_props.get(STORED_WEIGHTS):  # e.g. sparse outlier corrections
            for inp in node.inputs:
                for value in constant_sources(inp, memo) or ():
                    found.setdefault(value.name, value)
        if op_key(node) in WEIGHTED_LAYER_OPS and len(node.inputs) > 1 and node.inputs[1] is not None:
            for value in (v for w in weight_inputs(node) for v in constant_sources(w, memo) or ()):
                found.setdefault(value.name, value)
            for value in constant_sources(permutation_indices(node.inputs[0]), memo) or ():
                found.setdefault(value.name, value)
    return list(found.values())


def permutation_indices(value: ir.Value | None) -> ir.Value | None:
    """The column indices when `value` is a selection of columns of another tensor (a layer's input
    permutation): `Gather(x, indices)`, or `GatherElements(x, Expand(indices, shape))` as `lower-ort`
    writes it; else None."""
    producer = value.producer() if value is not None else None
    if producer is None or len(producer.inputs) < 2 or producer.inputs[1] is None:
        return None
    if producer.op_type == "Gather":
        return producer.inputs[1]
    expand = producer.inputs[1].producer() if producer.op_type == "GatherElements" else None
    return expand.inputs[0] if expand is not None and expand.op_type == "Expand" else None


def weight_count(model: ir.Model) -> int:
    """Number of weight elements (see `weight_values`)."""
    return sum(v.const_value.size for v in weight_values(model))
