"""One ONNX file written a weight at a time.

`onnx.ModelProto.SerializeToString` needs the whole model as a protobuf and then as bytes: two
copies of every weight beside the IR's own. `write_model` writes the same bytes while holding one
weight's serialization at a time:

1. the model is serialized with every initializer's tensor replaced by an empty stand-in (same
   name, no data): the *frame*, small;
2. in the frame, the graph field (`ModelProto.graph`, field 7) and in it the initializer entries
   (`GraphProto.initializer`, field 5) are found by reading protobuf's wire format (tag, length);
3. the file is the frame with each stand-in entry replaced by the real tensor's serialization and
   the graph's length prefix recomputed. The real entries' sizes are taken in a first pass over
   the weights (each serialized, measured, dropped), the bytes in a second.

Protobuf's deterministic serialization writes a message's fields in field-number order, and a
nested message as it would be alone, so the result equals
`to_proto(model).SerializeToString(deterministic=True)` byte for byte (`tests/test_proto_stream.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
import onnx_ir as ir

MODEL_GRAPH = 7  # ModelProto.graph
GRAPH_INITIALIZER = 5  # GraphProto.initializer
LENGTH_DELIMITED = 2


def write_model(model: ir.Model, file: BinaryIO, progress: Callable[[int, int], None] | None = None) -> None:
    """Write `model` to the open binary `file` as one ONNX protobuf. `progress(done, total)` is
    called with the weight bytes written."""
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    with _stand_ins(values):
        frame = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    sizes = [len(_entry(value)) for value in values]  # first pass: sizes only
    total, done = sum(sizes), 0
    for number, start, body, end in _fields(frame, 0, len(frame)):
        if number != MODEL_GRAPH:
            file.write(frame[start:end])
            continue
        graph_fields = list(_fields(frame, body, end))
        stand_ins = [f for f in graph_fields if f[0] == GRAPH_INITIALIZER]
        if len(stand_ins) != len(values):
            raise AssertionError(f"the frame has {len(stand_ins)} initializers, the model {len(values)}")
        graph_size = (end - body) - sum(f[3] - f[1] for f in stand_ins) + sum(_framed_size(GRAPH_INITIALIZER, n) for n in sizes)
        file.write(frame[start:body - len(_varint(end - body))])  # the graph's tag
        file.write(_varint(graph_size))
        written = iter(zip(values, sizes))
        for field in graph_fields:
            if field[0] != GRAPH_INITIALIZER:
                file.write(frame[field[1]:field[3]])
                continue
            value, size = next(written)
            entry = _entry(value)
            if len(entry) != size:
                raise AssertionError(f"initializer '{value.name}' serialized to {len(entry)} bytes, then {size}")
            file.write(_varint(GRAPH_INITIALIZER << 3 | LENGTH_DELIMITED) + _varint(size))
            file.write(entry)
            done += size
            del entry
            if progress is not None:
                progress(done, total)


def _entry(value: ir.Value) -> bytes:
    """The initializer's TensorProto, serialized (the tensor named after its value, as ONNX's
    serializer does)."""
    tensor = value.const_value
    tensor.name = value.name
    return ir.serde.serialize_tensor(tensor).SerializeToString(deterministic=True)


@contextlib.contextmanager
def _stand_ins(values: list[ir.Value]):
    """Within the block, each value's tensor is an empty one of its dtype."""
    tensors = [v.const_value for v in values]
    try:
        for value in values:
            value.const_value = ir.Tensor(np.zeros(0, np.uint8), name=value.name)
        yield
    finally:
        for value, tensor in zip(values, tensors):
            value.const_value = tensor


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the message in `data[start:end]`: (number, where its tag starts, where its
    value starts, where it ends)."""
    pos = start
    while pos < end:
        tag_start = pos
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, value_end = _read_varint(data, pos)
            value_start = pos
        elif wire == 1:
            value_start, value_end = pos, pos + 8
        elif wire == LENGTH_DELIMITED:
            length, value_start = _read_varint(data, pos)
            value_end = value_start + length
        elif wire == 5:
            value_start, value_end = pos, pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {tag_start}")
        yield number, tag_start, value_start, value_end
        pos = value_end


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed_size(number: int, size: int) -> int:
    return len(_varint(number << 3 | LENGTH_DELIMITED)) + len(_varint(size)) + size
