"""Lowering of `qc.MixedMatMul` to standard ONNX for ONNX Runtime (used by `lower-ort`).

The file stores what the bit budget counted, tightly packed; standard ops expand it back:
- codes of b bits as b bit-planes, 8 rows per byte (uint8 [b, ceil(K_c / 8), N]), unpacked with
  BitShift / BitwiseAnd / ReduceSum;
- uniform classes: fp16 scales and uint8 zero points per group, expanded with Gather;
- codebook classes: the fp16 table per column, read with Gather on flat indices;
- fp16 classes: Cast;
- sparse outliers: uint16 (row, column) pairs and fp16 values, written with ScatterND;
- the permutation: uint16, applied to X with Gather.
Every input of the expansion is an initializer, so ONNX Runtime folds it into one float weight when
the session is created: the file is small, the run is a float32 MatMul with the same numbers as the
reference of `qc.MixedMatMul`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.layers import CREATED_BY, new_initializer
from qcompiler.mixed_ops import INPUTS_PER_KIND, class_slices
from qcompiler.ops import attributes_of


def pack_bitplanes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [K, N] -> uint8 [bits, ceil(K / 8), N]: plane p holds bit p, row r in bit r % 8."""
    k, n = codes.shape
    padded = np.zeros((-(-k // 8) * 8, n), np.uint8)
    padded[:k] = codes
    planes = [(padded >> p) & 1 for p in range(bits)]
    stacked = np.stack(planes).reshape(bits, -1, 8, n)
    return np.sum(stacked << np.arange(8, dtype=np.uint8)[None, None, :, None], axis=2, dtype=np.uint8)


def unpack_bitplanes(planes: np.ndarray, rows: int) -> np.ndarray:
    """Inverse of `pack_bitplanes` (numpy, for tests)."""
    bits = ((planes[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1).reshape(planes.shape[0], -1, planes.shape[2])
    return np.sum(bits[:, :rows].astype(np.uint16) << np.arange(planes.shape[0], dtype=np.uint16)[:, None, None], axis=0).astype(np.uint8)


class _Builder:
    """Appends nodes before `anchor`, naming values after `base`."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, base: str):
        self.graph, self.anchor, self.base, self.count = graph, anchor, base, 0

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return new_initializer(self.graph, f"{self.base}.{suffix}", np.asarray(array))

    def op(self, op_type: str, inputs, attributes=None, **kwargs) -> ir.Value:
        self.count += 1
        node = ir.node(op_type, inputs, attributes, name=f"{self.base}.{op_type.lower()}{self.count}",
                       metadata_props={CREATED_BY: "lower-ort"}, **kwargs)
        node.outputs[0].name = node.name
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]


def _codes(b: _Builder, name: str, codes: np.ndarray, bits: int) -> ir.Value:
    """Float codes [K_c, N] expanded from stored bit-planes."""
    k = codes.shape[0]
    planes = b.const(f"{name}.planes", pack_bitplanes(codes, bits))
    shifts = b.const(f"{name}.shifts", np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1))
    one = b.const(f"{name}.one", np.array(1, np.uint8))
    expanded = b.op("Unsqueeze", [planes, b.const(f"{name}.axis", np.array([2], np.int64))])
    bit = b.op("BitwiseAnd", [b.op("BitShift", [expanded, shifts], {"direction": "RIGHT"}), one])
    flat = b.op("Reshape", [bit, b.const(f"{name}.shape", np.array([bits, -1, codes.shape[1]], np.int64))])
    rows = b.op("Slice", [flat, b.const(f"{name}.start", np.array([0], np.int64)),
                          b.const(f"{name}.stop", np.array([k], np.int64)), b.const(f"{name}.rows_axis", np.array([1], np.int64))])
    weights = b.const(f"{name}.place", (2.0 ** np.arange(bits)).astype(np.float32).reshape(bits, 1, 1))
    scaled = b.op("Mul", [b.op("Cast", [rows], {"to": ir.DataType.FLOAT}), weights])
    return b.op("ReduceSum", [scaled, b.const(f"{name}.sum_axis", np.array([0], np.int64))], {"keepdims": 0})


def _range(b: _Builder, name: str, count: int) -> ir.Value:
    """0, 1, ..., count - 1 (int64), computed at load instead of stored."""
    return b.op("Range", [b.const(f"{name}.zero_i", np.array(0, np.int64)), b.const(f"{name}.count", np.array(count, np.int64)),
                          b.const(f"{name}.step", np.array(1, np.int64))])


def _uniform(b: _Builder, name: str, codes, scale, zero, bits: int, group_size: int) -> ir.Value:
    rows = _range(b, f"{name}.rows", codes.shape[0])
    groups = b.op("Div", [rows, b.const(f"{name}.group_size", np.array(group_size, np.int64))])
    zero_rows = b.op("Gather", [b.op("Cast", [b.const(f"{name}.zero", zero)], {"to": ir.DataType.FLOAT}), groups], {"axis": 0})
    scale_rows = b.op("Gather", [b.op("Cast", [b.const(f"{name}.scale", scale)], {"to": ir.DataType.FLOAT}), groups], {"axis": 0})
    return b.op("Mul", [b.op("Sub", [_codes(b, name, codes, bits), zero_rows]), scale_rows])


def _codebook(b: _Builder, name: str, codes, book, bits: int) -> ir.Value:
    n, size = book.shape
    columns = b.op("Cast", [_range(b, f"{name}.columns", n)], {"to": ir.DataType.FLOAT})
    offsets = b.op("Mul", [columns, b.const(f"{name}.table_size", np.array(size, np.float32))])
    flat_index = b.op("Cast", [b.op("Add", [_codes(b, name, codes, bits), offsets])], {"to": ir.DataType.INT64})
    table = b.op("Cast", [b.const(f"{name}.codebook", book.reshape(-1))], {"to": ir.DataType.FLOAT})
    return b.op("Gather", [table, flat_index], {"axis": 0})


def lower_mixed_matmul(graph: ir.Graph, node: ir.Node) -> str:
    a = attributes_of(node)
    base = node.name or node.outputs[0].name
    b = _Builder(graph, node, base)
    arrays = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in node.inputs]
    x, perm = node.inputs[0], arrays[1]
    blocks = []
    for kind, index, _, _ in class_slices(a["kinds"], a["sizes"]):
        args = arrays[2 + index : 2 + index + INPUTS_PER_KIND[kind]]
        name = f"c{index}"
        bits = a["bits"][len(blocks)]
        if kind == "uniform":
            blocks.append(_uniform(b, name, *args, bits, a["group_size"]))
        elif kind == "codebook":
            blocks.append(_codebook(b, name, *args, bits))
        else:
            blocks.append(b.op("Cast", [b.const(f"{name}.fp16", args[0])], {"to": ir.DataType.FLOAT}))
    weight = blocks[0] if len(blocks) == 1 else b.op("Concat", blocks, {"axis": 0})
    if a["sparse"]:
        pairs = b.op("Cast", [b.const("outlier_index", arrays[-2].astype(np.uint16))], {"to": ir.DataType.INT64})
        values = b.op("Cast", [b.const("outlier_value", arrays[-1])], {"to": ir.DataType.FLOAT})
        weight = b.op("ScatterND", [weight, pairs, values])
    if np.array_equal(perm, np.arange(len(perm))):
        xp = x
    else:
        order = b.op("Cast", [b.const("perm", perm.astype(np.uint16))], {"to": ir.DataType.INT64})
        xp = b.op("Gather", [x, order], {"axis": -1})
    matmul = ir.node("MatMul", [xp, weight], name=base, metadata_props={CREATED_BY: "lower-ort"})
    ir.convenience.replace_nodes_and_values(graph, node, [node], [matmul], [node.outputs[0]], [matmul.outputs[0]])
    return "MixedMatMul(packed, expanded at load)"
