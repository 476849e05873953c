"""External data: the one gate through which every byte an ONNX model points at outside its own
file passes.

ONNX lets any `TensorProto` keep its bytes in another file (`data_location = EXTERNAL`, with
`location`, `offset` and `length` entries). Such tensors can sit in the main graph's initializers,
in subgraphs (If/Loop/Scan bodies), in function bodies (`model.functions`), in tensor-valued
attributes (Constant `value`, ConstantOfShape, any TENSOR/TENSORS/SPARSE_TENSOR attribute) of all
of those, in sparse tensors and in training info. `inline_external_data` finds every one of them
by walking the whole `ModelProto` generically (so no route can be forgotten), reads its bytes
through `read_external` and stores them inline: after loading, nothing in the model refers to a
file. `materialize_external_tensors` does the same for an in-memory `onnx_ir` model handed to
the passes, so no pass ever opens a location as given.

`read_external` refuses, with one line naming the tensor and the problem: an empty location, a
NUL byte, an absolute path, a `..` component, a path that leads outside the model's folder
(through a symbolic link included), a missing file or one that is not a regular file, an offset
or length that is not a non-negative integer, bytes past the end of the file, and a length that
disagrees with the tensor's dims and type. A hard link inside the folder is a file of the folder
(whoever can make one there can write the model too) and is read, except where the weights stay
memory-mapped (`qcompiler.ir.load`): ONNX IR's reader refuses a mapped file with more than one link,
so `multiply_linked` names it and loading stops with one line.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from qcompiler.errors import UserError, shown

_FIX = "keep external data files beside the model, inside its folder"


def messages_in(message: Message, where: tuple[str, ...] = ()) -> Iterator[tuple[Message, tuple[str, ...]]]:
    """Every protobuf message nested in `message` (itself excluded), each with where it sits
    (`function 'f'`, `node 'c'`, `attribute 'value'`). A tensor's own fields are not entered
    (reading them would copy its bytes)."""
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        for item in (value,) if isinstance(value, Message) else value:
            place = where + _place(item)
            yield item, place
            if not isinstance(item, onnx.TensorProto):
                yield from messages_in(item, place)


def tensors_in(proto: Message) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every `TensorProto` anywhere in `proto`, with a description of where it sits."""
    for message, where in messages_in(proto):
        if isinstance(message, onnx.TensorProto):
            yield message, ", ".join(where[:-1])


def _place(message: Message) -> tuple[str, ...]:
    if isinstance(message, onnx.FunctionProto):
        return (f"function '{shown(message.name)}'",)
    if isinstance(message, onnx.NodeProto):
        return (f"node '{shown(message.name or message.op_type)}'",)
    if isinstance(message, onnx.AttributeProto):
        return (f"attribute '{shown(message.name)}'",)
    if isinstance(message, onnx.GraphProto) and message.name:
        return (f"graph '{shown(message.name)}'",)
    if isinstance(message, onnx.SparseTensorProto):
        return ("sparse tensor",)
    if isinstance(message, onnx.TrainingInfoProto):
        return ("training info",)
    if isinstance(message, onnx.TensorProto):
        return ("tensor",)
    if isinstance(message, onnx.ValueInfoProto):
        return (f"value '{shown(message.name)}'",)
    return ()


def expected_nbytes(dims, data_type: int, what: str) -> int:
    """Bytes a tensor of `dims` and ONNX `data_type` holds when stored raw."""
    if any(d < 0 for d in dims):
        raise UserError(f"{what} has a negative dimension {list(dims)}; export the model again")
    try:
        dtype = ir.DataType(data_type)
    except ValueError:
        raise UserError(f"{what} has unknown data type {data_type}; export the model again") from None
    if dtype in (ir.DataType.UNDEFINED, ir.DataType.STRING):
        raise UserError(f"{what} of type {dtype.name} cannot keep its data in an external file; export the model again")
    return math.ceil(math.prod(dims) * dtype.bitwidth / 8)


def read_external(base: str | os.PathLike, location: str, offset, length, expected: int, what: str) -> bytes:
    """The bytes `[offset, offset + length)` of the file `location` inside the folder `base`,
    after every check (see the module's doc); `length` None reads to the end of the file."""
    fd, start, count = _open_checked(base, location, offset, length, expected, what)
    try:
        return _read_exactly(fd, start, count)
    finally:
        os.close(fd)


def check_external(base: str | os.PathLike, location: str, offset, length, expected: int, what: str) -> int:
    """Every check `read_external` makes, without reading; the byte count."""
    fd, _, count = _open_checked(base, location, offset, length, expected, what)
    os.close(fd)
    return count


def _open_checked(base, location: str, offset, length, expected: int, what: str) -> tuple[int, int, int]:
    """An open descriptor of the checked file, the start and the byte count (the caller closes it)."""

    def refuse(problem: str) -> UserError:
        return UserError(f"{what} points its external data at '{shown(location)}', {problem}; refused: {_FIX}")

    if not base:
        raise refuse("with no model folder to read it from (load the model with qcompiler.load)")
    if not location:
        raise refuse("an empty location")
    if "\x00" in location:
        raise refuse("a location with a NUL byte")
    relative = Path(location)
    if relative.is_absolute() or location.startswith(("\\", "/")):
        raise refuse(f"an absolute path outside the model's folder '{shown(str(base))}'")
    if ".." in relative.parts:
        raise refuse(f"a path with '..' that may lead outside the model's folder '{shown(str(base))}'")
    folder = Path(base).resolve()
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder):
        raise refuse(f"a path that leads outside the model's folder '{shown(str(folder))}' through a symbolic link")
    start = _non_negative(offset, "offset", refuse) if offset is not None else 0
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise refuse("a file that is missing beside the model") from None
    except OSError as exc:
        raise refuse(f"a file that cannot be read ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("something that is not a regular file")
        count = _non_negative(length, "length", refuse) if length is not None else max(info.st_size - start, 0)
        if start + count > info.st_size:
            raise refuse(f"bytes [{start}, {start + count}) past the end of the file ({info.st_size} bytes)")
        if count != expected:
            raise refuse(f"{count} bytes where its dims and type need {expected}")
    except BaseException:
        os.close(fd)
        raise
    return fd, start, count


def _non_negative(text, key: str, refuse) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise refuse(f"an {key} '{shown(str(text))}' that is not an integer") from None
    if value < 0:
        raise refuse(f"a negative {key} {value}")
    return value


def _read_exactly(fd: int, start: int, count: int) -> bytes:
    chunks, done = [], 0
    while done < count:
        chunk = os.pread(fd, min(count - done, 1 << 30), start + done)
        if not chunk:
            raise UserError("an external data file shrank while it was read; export the model again")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def external_bytes(proto: onnx.ModelProto, model_path: Path) -> int:
    """Check every external tensor of `proto` (wherever it sits, see `read_external`) without
    reading it; the bytes they hold together."""
    total = 0
    for tensor, what, entries in _external_tensors(proto):
        expected = expected_nbytes(tensor.dims, tensor.data_type, what)
        total += check_external(model_path.parent, entries.get("location", ""), entries.get("offset"), entries.get("length"), expected, what)
    return total


def multiply_linked(proto: onnx.ModelProto, model_path: Path) -> tuple[str, int] | None:
    """The first external data file of the main graph's initializers (checked by `external_bytes`)
    with more than one hard link, and its link count; None when there is none."""
    folder = model_path.parent
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            links = os.stat(folder / location).st_nlink
            if links > 1:
                return location, links
    return None


def inline_external_data(proto: onnx.ModelProto, model_path: Path, keep_initializers: bool = False) -> int:
    """Read every external tensor of `proto` (wherever it sits) into the proto itself, through
    `read_external`, relative to the model file's folder. With `keep_initializers`, the main
    graph's initializers stay external (checked by `external_bytes`; the IR maps them from the
    file). Returns how many tensors were read."""
    base = model_path.parent
    initializers = list(proto.graph.initializer) if keep_initializers else []  # held, so their ids stay theirs
    kept = {id(t) for t in initializers}
    count = 0
    for tensor, what, entries in _external_tensors(proto):
        if id(tensor) in kept:
            continue
        expected = expected_nbytes(tensor.dims, tensor.data_type, what)
        data = read_external(base, entries.get("location", ""), entries.get("offset"), entries.get("length"), expected, what)
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # as if stored inline from the start (the same bytes as a mapped copy)
        count += 1
    return count


def _external_tensors(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str, dict[str, str]]]:
    """Every tensor of `proto` that keeps its bytes in another file: the tensor, where it sits, its
    external-data entries."""
    for tensor, where in tensors_in(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            what = f"tensor '{shown(tensor.name)}'" + (f" ({where})" if where else "")
            yield tensor, what, {e.key: e.value for e in tensor.external_data}


def materialize_external_tensors(model: ir.Model, keep_initializers_over: int | None = None) -> int:
    """Replace every `onnx_ir` external tensor of `model` (initializers of every graph, tensor
    attributes in graphs, subgraphs and function bodies) by its bytes in memory, read through
    `read_external` relative to the tensor's own `base_dir`; a tensor without one is refused.
    When the main graph's external initializers hold `keep_initializers_over` bytes or more, they
    are only checked (`check_external`) and stay memory-mapped. Returns how many were read."""
    slots = list(external_tensor_slots(model))
    mapped = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    keep = keep_initializers_over is not None and sum(t.nbytes for t in mapped) >= keep_initializers_over
    kept = {id(t) for t in mapped} if keep else set()
    read = 0
    for tensor, what, put in slots:
        if id(tensor) in kept:
            _checked_in_place(tensor, what)
            continue
        put(_in_memory(tensor, what))
        read += 1
    return read


def external_tensor_slots(model: ir.Model) -> Iterator[tuple[ir.ExternalTensor, str, Callable]]:
    """Every `onnx_ir` external tensor of `model`, in a fixed order (two models of the same
    structure list theirs alike), with where it sits and a function that puts another tensor
    in its place."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value, f"initializer '{shown(value.name)}'", partial(setattr, value, "const_value")
    for body in [model.graph, *model.functions.values()]:
        for node in ir.traversal.RecursiveGraphIterator(body):
            for name, attr in list(node.attributes.items()):
                if attr.is_ref():
                    continue
                what = f"attribute '{shown(name)}' of node '{shown(node.name or node.op_type)}'"
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value, what, partial(_put_attribute_tensor, node, name, None)
                elif attr.type == ir.AttributeType.TENSORS:
                    for i, tensor in enumerate(attr.value):
                        if isinstance(tensor, ir.ExternalTensor):
                            yield tensor, what, partial(_put_attribute_tensor, node, name, i)


def _put_attribute_tensor(node: ir.Node, name: str, index: int | None, tensor: ir.TensorProtocol) -> None:
    if index is None:
        node.attributes[name] = ir.AttrTensor(name, tensor)
        return
    tensors = list(node.attributes[name].value)
    tensors[index] = tensor
    node.attributes[name] = ir.AttrTensors(name, tensors)


def _checked_in_place(tensor: ir.ExternalTensor, what: str) -> None:
    what = f"tensor '{shown(tensor.name or '')}' ({what})"
    expected = expected_nbytes(tuple(tensor.shape.numpy()), tensor.dtype.value, what)
    check_external(tensor.base_dir, tensor.location, tensor.offset, tensor.length, expected, what)


def _in_memory(tensor: ir.ExternalTensor, what: str) -> ir.TensorProtocol:
    what = f"tensor '{shown(tensor.name or '')}' ({what})"
    expected = expected_nbytes(tuple(tensor.shape.numpy()), tensor.dtype.value, what)
    data = read_external(tensor.base_dir, tensor.location, tensor.offset, tensor.length, expected, what)
    proto = onnx.TensorProto(name=tensor.name or "", dims=list(tensor.shape.numpy()), data_type=tensor.dtype.value, raw_data=data)
    return ir.serde.TensorProtoTensor(proto)
