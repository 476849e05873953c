"""`quantize-embedding`: embedding tables stored as 4- or 8-bit codes, looked up without expanding.

Each `Gather(table, ids)` (axis 0) of a constant float table [V, D] becomes
`qc.GatherQuantized(Q, ids, scale, zero_point)`: every row is cut into blocks of `block-size`
consecutive columns, and each block gets its own asymmetric grid over [min(lo, 0), max(hi, 0)]:

    scale = (hi - lo) / (2^bits - 1),   zero_point = round(-lo / scale),
    Q = clip(round(x / scale) + zero_point, 0, 2^bits - 1)

(round half to even; a block of zeros gets scale 1). `lower-ort` writes it as ONNX Runtime's
`com.microsoft.GatherBlockQuantized`, which keeps the codes packed in memory and expands only the
rows a batch looks up. For a causal LM the table holds a large share of the weights (SmolLM2-135M:
28 M of 135 M), so this is what brings the file and the resident memory of a 4-bit model down
further; the LM head is a linear and is quantized by the layer passes.

A head tied to the table reads its own copy once the transpose is folded (`canonicalize`), so the
table is quantized and the head stays a linear. With `tied=share` the table is instead the head's
own codes, where the head already holds them as one symmetric or integer-zero 4-bit class in input
order (`int4`, or a `mixed` head given one class): its float weight (`FLOAT_WEIGHT_KEY`) must equal the
table transposed, and the lookup then reads codes, scales and zero points [V, D / group] of the head
transposed (block-size = the head's group size; `bits` does not apply). `lower-ort` then stores the
codes once, read by both (`share_tied_codes`). Left in float, with the reason in the statistics: a
table another node reads as it is (a second Gather), a Gather on another axis, and a table whose
width is not a multiple of `block-size`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.dialect.qc_ops import gather_quantized
from qcompiler.errors import UserError
from qcompiler.ir.layers import new_initializer
from qcompiler.ir.meta import CREATED_BY, FLOAT_WEIGHT_KEY, Prop
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeEmbeddingPass(Pass):
    """Embedding tables (Gather of a constant float table) as 4- or 8-bit codes with a scale and zero point per block."""

    name = "quantize-embedding"
    provided = frozenset({Prop.EMBEDDING_QUANTIZED})

    bits: Literal[4, 8] = option(4, "bits per code: 4 or 8")
    block_size: int = option(32, "columns per scale and zero point: a power of 2, at least 16")
    tied: Literal["copy", "share"] = option("copy", "a table tied to a 4-bit head: its own codes (copy), or the head's (share: stored once)")

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"quantize-embedding: block-size must be a power of 2, at least 16, got {self.block_size}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        quantized, kept = {}, {}
        for node, table, reason in lookups(graph, self.block_size):
            name = node.name or node.outputs[0].name
            if reason:
                kept[name] = reason
                continue
            head = tied_head(graph, table) if self.tied == "share" else None
            if head is not None:
                lookup = replace_lookup_with_head(graph, node, table, head)
            else:
                lookup = replace_lookup(graph, node, table, self.bits, self.block_size)
            quantized[name] = {"table": table.name, "shape": list(lookup.inputs[0].const_value.shape)}  # bytes as stored: the manifest's `embeddings`
            if head is not None:
                quantized[name]["shared_with"] = head.name
        if quantized:
            model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
            for entry in quantized.values():
                if not graph.initializers[entry["table"]].uses():
                    graph.initializers.pop(entry["table"])
        stats = {"tables": len(quantized), "bits": self.bits, "block_size": self.block_size,
                 "quantized": quantized, "kept_in_float": kept}
        return PassResult(model, bool(quantized), stats)


def lookups(graph: ir.Graph, block_size: int) -> list[tuple[ir.Node, ir.Value, str | None]]:
    """Every embedding lookup (a standard Gather of a constant 2-D float table) in graph order, with
    the reason its table cannot be stored as codes of `block_size` columns a block (None: it can)."""
    found = []
    for node in graph:
        table = _embedding_table(node)
        if table is not None:
            found.append((node, table, _why_kept(node, table, block_size)))
    return found


def _why_kept(node: ir.Node, table: ir.Value, block_size: int) -> str | None:
    axis = node.attributes.get_int("axis", 0)
    if axis != 0:
        return f"Gather on axis {axis}, not the table's rows"
    others = sorted({use.node.name or use.node.op_type for use in table.uses() if use.node is not node})
    if others:
        return f"the table is also read by {', '.join(others)}"
    columns = table.const_value.shape[1]
    if columns % block_size:
        return f"width {columns} is not a multiple of block-size {block_size}"
    return None


def _embedding_table(node: ir.Node) -> ir.Value | None:
    """The constant 2-D float table a standard Gather reads, else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    table = node.inputs[0]
    if table is None or not table.is_initializer() or table.const_value is None:
        return None
    tensor = table.const_value
    return table if tensor.dtype.is_floating_point() and len(tensor.shape) == 2 else None


def quantize_table(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [V, D], scales float32 [V, D / block_size], zero points uint8 [V, D / block_size])."""
    rows, columns = table.shape
    blocks = np.asarray(table, np.float32).reshape(rows, columns // block_size, block_size)
    top = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = ((hi - lo) / np.float32(top)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, top)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, top)
    return codes.astype(np.uint8).reshape(rows, columns), scale, zero.astype(np.uint8)


def tied_head(graph: ir.Graph, table: ir.Value) -> ir.Node | None:
    """The `qc.MixedMatMul` computing `x @ table^T` from one 4-bit uniform class with integer zero
    points in input order (the identity permutation, no outliers), whose group size is a power of 2
    of at least 16 dividing the table's width; None when there is none."""
    rows, columns = table.const_value.shape
    for node in graph:
        if not is_mixed_matmul(node) or FLOAT_WEIGHT_KEY not in node.meta:
            continue
        float_weight = node.meta[FLOAT_WEIGHT_KEY]
        if tuple(float_weight.shape) != (columns, rows):
            continue
        view = MixedMatMulView.of(node)
        group = view.group_size
        if (len(view.classes) != 1 or view.outliers is not None or view.classes[0].kind != "uniform" or view.classes[0].bits != 4
                or view.classes[0].inputs[2].dtype != ir.DataType.UINT8 or group < 16 or group & (group - 1) or columns % group
                or not np.array_equal(view.perm_array(), np.arange(columns))):
            continue
        if np.array_equal(np.asarray(float_weight.numpy(), np.float32).T, np.asarray(table.const_value.numpy(), np.float32)):
            return node
    return None


def replace_lookup_with_head(graph: ir.Graph, node: ir.Node, table: ir.Value, head: ir.Node) -> ir.Node:
    """`node` becomes a `qc.GatherQuantized` of `head`'s codes (see `tied_head`), transposed."""
    view = MixedMatMulView.of(head)
    codes, scale, zero = view.class_arrays()[0].inputs
    return _replace_gather(graph, node, table.name, np.ascontiguousarray(codes.T), np.ascontiguousarray(scale.T.astype(np.float32)),
                           np.ascontiguousarray(zero.T), 4, view.group_size)


def dequantized_table(table: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """The table as stored at `bits` (`quantize_table`), back in float32."""
    codes, scale, zero = quantize_table(table, bits, block_size)
    return gather_quantized(codes, np.arange(table.shape[0]), scale, zero, block_size)


def replace_lookup(graph: ir.Graph, node: ir.Node, table: ir.Value, bits: int, block_size: int) -> ir.Node:
    """`node` (a Gather of `table`, read as float32 from wherever it is stored) becomes a
    `qc.GatherQuantized` of the table's codes, which is returned."""
    codes, scale, zero = quantize_table(table.const_value.numpy(), bits, block_size)
    return _replace_gather(graph, node, table.name, codes, scale, zero, bits, block_size)


def _replace_gather(graph: ir.Graph, node: ir.Node, base: str, codes, scale, zero, bits: int, block_size: int) -> ir.Node:
    inputs = [new_initializer(graph, f"{base}.q", codes), node.inputs[1],
              new_initializer(graph, f"{base}.scale", scale), new_initializer(graph, f"{base}.zero_point", zero)]
    lookup = ir.node("GatherQuantized", inputs, {"bits": bits, "block_size": block_size}, domain="qc",
                     name=node.name or f"{base}.gather", metadata_props={CREATED_BY: "quantize-embedding"})
    lookup.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    lookup.outputs[0].meta.update(node.outputs[0].meta)  # the rows' calibration statistics, for the layers that read them
    ir.convenience.replace_nodes_and_values(graph, node, [node], [lookup], [node.outputs[0]], [lookup.outputs[0]])
    return lookup
