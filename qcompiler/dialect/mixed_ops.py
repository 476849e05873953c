"""The `qc` ops of channel-wise mixed precision (CMPQ style, Chen et al., arXiv 2410.13056).
Importing this module registers them.

`qc.BitAllocation(W, bits) -> W` marks a weight with the bit width chosen for each input channel
(row k of W [K, N]); it computes nothing (the reference returns W) and is consumed by
`quantize-weights`. `bits` is a uint8 [K] initializer (16 = kept in fp16); the attributes record
the format the budget was counted for (`group_size`, `codebook`: uniform or kmeans,
`outliers_weight`: the fraction of weights kept as sparse fp16, `zero_points`: fractional, integer or
auto (integer for 2, 4 and 8 bits); absent means fractional).

`qc.MixedMatMul(X, perm, <class inputs>..., [indices, values]) -> Y` is a weight-only linear whose
input channels are split into classes of equal treatment, stored contiguously after the
permutation `perm` (int64 [K]: row j of the stored weight is input channel perm[j]):

    kind       inputs                                        dequantized rows W_c [K_c, N]
    uniform    codes uint8 [K_c, N], scale fp16 [G_c, N],      (codes - zero[k // g]) * scale[k // g]
               zero fp16 [G_c, N] (fractional)                 (g = group_size along K)
               or zero uint8 [G_c, N] (integer, 0..2^b-1)
    codebook   codes uint8 [K_c, N], codebook fp16 [N, 2^b]    codebook[n, codes[k, n]]
    fp16       W_c fp16 [K_c, N]                               W_c

    W = concat(W_c) ; W[indices[:, 0], indices[:, 1]] = values   (sparse fp16 outliers, optional)
    Y = X[..., perm] @ W

Attributes: `kinds` (strings), `bits` (ints, 16 for fp16), `sizes` (K_c per class), `group_size`,
`sparse` (1 when indices and values follow the classes).

`qc.MixedWeight(perm, <class inputs>..., [indices, values]) -> W` is the same storage without the
product: the dequantized weight [K, N] with its rows back in input-channel order (W[perm] = concat(W_c),
outliers written in). `allocate-bits` gives it to a Conv whose kernel it holds as a matrix
(`qcompiler.ir.layers.ConvAsLinear`: Transpose + Reshape rebuild the kernel); `lower-ort` expands it
into a float32 weight when the session starts.

A uniform class whose zero point is uint8 (an integer on the code grid) has the same meaning; it is
the form `lower-ort` can hand to ONNX Runtime's `com.microsoft.MatMulNBits` (2, 4 and 8 bits). One
whose every zero point is the mid-code 2^(b-1) is symmetric (`uniform_zero_kind`): passes that fit
its grid again keep it so, and `lower-ort` stores no zero points for it (MatMulNBits' default).

Passes and backends read the op by role through `MixedMatMulView.of(node)` (its classes as
`MixedClass`es, its outliers), or `split_class_inputs` for arrays, never by input position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.op_registry import Attr, OpSchema, attributes_of, register
from qcompiler.errors import VerificationError

KINDS = ("uniform", "codebook", "fp16")
INPUTS_PER_KIND = {"uniform": 3, "codebook": 2, "fp16": 1}
FP16_BITS = 16
T = TypeVar("T")


def dequantize_uniform(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int) -> np.ndarray:
    groups = np.arange(codes.shape[0]) // group_size
    return (codes.astype(np.float32) - zero.astype(np.float32)[groups]) * scale.astype(np.float32)[groups]


def uniform_zero_kind(zero: np.ndarray, bits: int) -> str:
    """The grid of a uniform class with zero points `zero`: `fractional` (fp16), `symmetric` (uint8,
    every one the mid-code 2^(b-1)) or `integer` (other uint8); `bitcost.zero_point_kind`'s names."""
    if zero.dtype != np.uint8:
        return "fractional"
    return "symmetric" if zero.size and bool(np.all(zero == 1 << (bits - 1))) else "integer"


def dequantize_codebook(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    columns = np.arange(codes.shape[1])[None, :]
    return codebook.astype(np.float32)[columns, codes.astype(np.int64)]


def class_slices(kinds, sizes) -> list[tuple[str, int, int, int]]:
    """(kind, first input index after X and perm, first row, last row) per class."""
    out, index, row = [], 0, 0
    for kind, size in zip(kinds, sizes):
        out.append((kind, index, row, row + size))
        index += INPUTS_PER_KIND[kind]
        row += size
    return out


@dataclass(frozen=True)
class MixedClass(Generic[T]):
    """One class of a `qc.MixedMatMul`: rows `start .. stop` of the stored (permuted) weight, and its
    inputs (`ir.Value`s in a view of a node, arrays once read): `uniform`: codes [K_c, N], scale and
    zero [ceil(K_c / group), N]; `codebook`: codes and a table [N, 2**bits]; `fp16`: the rows [K_c, N].
    `slot` is the position of its first input among the class inputs (after X and perm)."""

    kind: str
    bits: int
    start: int
    stop: int
    inputs: tuple[T, ...]
    slot: int = 0

    def read(self) -> MixedClass[np.ndarray]:
        """The same class with its inputs' constant arrays (None where an input is not constant)."""
        return replace(self, inputs=tuple(_array(v) for v in self.inputs))

    def dequantize(self, group_size: int) -> np.ndarray:
        """Rows `start .. stop` of the dequantized weight (the class's inputs must be arrays)."""
        if self.kind == "uniform":
            codes, scale, zero = self.inputs
            return dequantize_uniform(np.asarray(codes), scale, zero, group_size)
        if self.kind == "codebook":
            return dequantize_codebook(*(np.asarray(v) for v in self.inputs))
        return np.asarray(self.inputs[0], np.float32)


def split_class_inputs(items: Sequence[T], kinds, bits, sizes, sparse) -> tuple[list[MixedClass[T]], tuple[T, T] | None]:
    """The class inputs of a `qc.MixedMatMul` (everything after X and perm, as values or arrays) by
    role: one `MixedClass` per class, and the sparse outliers' (indices, values) or None."""
    classes = [MixedClass(kind, int(b), start, stop, tuple(items[index : index + INPUTS_PER_KIND[kind]]), index)
               for (kind, index, start, stop), b in zip(class_slices(kinds, sizes), bits)]
    return classes, ((items[-2], items[-1]) if sparse else None)


def mixed_weight(classes: Sequence[MixedClass[np.ndarray]], outliers: tuple | None, group_size: int) -> np.ndarray:
    """The dequantized weight [K, N] in permuted row order, sparse outliers written in."""
    w = np.concatenate([c.dequantize(group_size) for c in classes], axis=0)
    if outliers is not None:
        indices, values = outliers
        w[indices[:, 0].astype(np.int64), indices[:, 1].astype(np.int64)] = values.astype(np.float32)
    return w


@dataclass(frozen=True)
class MixedMatMulView:
    """A `qc.MixedMatMul` (or a `qc.MixedWeight`, whose `x` is None) read by role: its activation,
    permutation, classes and sparse outliers."""

    node: ir.Node
    x: ir.Value | None
    perm: ir.Value
    classes: tuple[MixedClass[ir.Value], ...]
    outliers: tuple[ir.Value, ir.Value] | None  # (indices int [S, 2], values fp16 [S])
    group_size: int

    @classmethod
    def of(cls, node: ir.Node) -> MixedMatMulView:
        a = attributes_of(node)
        first = 1 if node.op_type == "MixedWeight" else 2  # the class inputs follow (X,) perm
        classes, outliers = split_class_inputs(list(node.inputs[first:]), a["kinds"], a["bits"], a["sizes"], a["sparse"])
        x = None if first == 1 else node.inputs[0]
        return cls(node, x, node.inputs[first - 1], tuple(classes), outliers, int(a["group_size"]))

    def perm_array(self) -> np.ndarray:
        return self.perm.const_value.numpy().astype(np.int64)

    def class_arrays(self) -> list[MixedClass[np.ndarray]]:
        return [c.read() for c in self.classes]

    def outlier_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.outliers is None else (_array(self.outliers[0]), _array(self.outliers[1]))

    def weight(self) -> np.ndarray:
        """The dequantized weight [K, N] in permuted row order (every input must be constant)."""
        return mixed_weight(self.class_arrays(), self.outlier_arrays(), self.group_size)


def is_mixed_matmul(node: ir.Node) -> bool:
    return node.domain == "qc" and node.op_type == "MixedMatMul"


def mixed_linear_weights(model: ir.Model) -> int:
    """The weights of the model's `qc.MixedMatMul` layers (K x N each), the size a pass's `max-weights` reads."""
    total = 0
    for node in model.graph:
        if is_mixed_matmul(node):
            view = MixedMatMulView.of(node)
            total += int(view.perm.shape[0]) * int(view.classes[0].inputs[0].shape[1])
    return total


def mixed_weights_over(model: ir.Model, limit: int) -> int:
    """The mixed layers' weights where they exceed `limit` (a pass's `max-weights`), else 0; 0 for no limit."""
    weights = mixed_linear_weights(model) if limit else 0
    return weights if weights > limit else 0


def _array(value: ir.Value | None) -> np.ndarray | None:
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def _mixed_matmul_reference(x, perm, *rest, kinds=(), bits=(), sizes=(), group_size=128, sparse=0):
    classes, outliers = split_class_inputs(list(rest), kinds, bits, sizes, sparse)
    w = mixed_weight(classes, outliers, group_size)
    return ((np.asarray(x)[..., np.asarray(perm, np.int64)] @ w).astype(np.asarray(x).dtype),)


def _mixed_weight_reference(perm, *rest, kinds=(), bits=(), sizes=(), group_size=128, sparse=0):
    classes, outliers = split_class_inputs(list(rest), kinds, bits, sizes, sparse)
    stored = mixed_weight(classes, outliers, group_size)
    w = np.empty_like(stored)
    w[np.asarray(perm, np.int64)] = stored
    return (w,)


def _check_mixed_storage(node: ir.Node) -> None:
    """The checks of `qc.MixedMatMul` and `qc.MixedWeight`: classes, inputs, permutation, zero points."""
    a = attributes_of(node)
    where = f"node '{node.name}' (qc.{node.op_type})"
    first = 1 if node.op_type == "MixedWeight" else 2
    kinds, bits, sizes = list(a["kinds"]), list(a["bits"]), list(a["sizes"])
    if not (len(kinds) == len(bits) == len(sizes)) or not kinds:
        raise VerificationError(f"{where}: kinds, bits and sizes must have one entry per class")
    for kind, b in zip(kinds, bits):
        if kind not in KINDS:
            raise VerificationError(f"{where}: unknown class kind '{kind}'; kinds: {', '.join(KINDS)}")
        if (kind == "fp16") != (b == FP16_BITS) or not (1 <= b <= 8 or b == FP16_BITS):
            raise VerificationError(f"{where}: a {kind} class cannot have {b} bits")
    expected = first + sum(INPUTS_PER_KIND[k] for k in kinds) + (2 if a["sparse"] else 0)
    if len(node.inputs) != expected:
        raise VerificationError(f"{where} has {len(node.inputs)} inputs; its classes need {expected}")
    perm = node.inputs[first - 1].const_value if node.inputs[first - 1] is not None else None
    if perm is not None and perm.size != sum(sizes):
        raise VerificationError(f"{where}: perm has {perm.size} entries for {sum(sizes)} channels")
    for c in MixedMatMulView.of(node).classes:
        codes = c.inputs[0].const_value
        if codes is not None and codes.shape[0] != c.stop - c.start:
            raise VerificationError(f"{where}: a {c.kind} class of {c.stop - c.start} rows stores {codes.shape[0]}")
        zero = c.inputs[2].const_value if c.kind == "uniform" else None
        if zero is not None and zero.dtype not in (ir.DataType.FLOAT16, ir.DataType.UINT8):
            raise VerificationError(f"{where}: a uniform class's zero point must be float16 or uint8, got {zero.dtype}")
        if zero is not None and zero.dtype == ir.DataType.UINT8 and zero.size and int(zero.numpy().max()) >= 1 << c.bits:
            raise VerificationError(f"{where}: an integer zero point of a {c.bits}-bit class must be below {1 << c.bits}")


def _bit_allocation_reference(w, bits, **_format):
    return (np.asarray(w),)


def _check_bit_allocation(node: ir.Node) -> None:
    w, bits = node.inputs
    where = f"node '{node.name}' (qc.BitAllocation)"
    if bits is None or bits.const_value is None or bits.const_value.dtype != ir.DataType.UINT8:
        raise VerificationError(f"{where}: bits must be a uint8 initializer")
    if w.shape is not None and len(w.shape) == 2 and isinstance(w.shape[0], int) and bits.const_value.size != w.shape[0]:
        raise VerificationError(f"{where}: {bits.const_value.size} bit widths for {w.shape[0]} input channels")
    values = set(np.unique(bits.const_value.numpy()).tolist())
    if not values <= set(range(1, 9)) | {FP16_BITS}:
        raise VerificationError(f"{where}: bit widths must be 1..8 or 16, got {sorted(values)}")


BIT_ALLOCATION = register(
    OpSchema(
        op_type="BitAllocation",
        inputs=("W", "bits"),
        outputs=("W_out",),
        attributes={
            "group_size": Attr("int", 128),
            "codebook": Attr("string", "kmeans"),
            "outliers_weight": Attr("float", 0.0),
            "zero_points": Attr("string", "fractional"),
        },
        doc="marks W [K, N] with the bits chosen for each input channel (uint8 [K]; 16 = fp16) and the format budgeted for",
        reference=_bit_allocation_reference,
        check=_check_bit_allocation,
    )
)

# the storage of a mixed weight, shared by the op that multiplies by it and the op that gives it
MIXED_STORAGE = {
    "kinds": Attr("strings"),
    "bits": Attr("ints"),
    "sizes": Attr("ints"),
    "group_size": Attr("int", 128),
    "sparse": Attr("int", 0),
}

MIXED_MATMUL = register(
    OpSchema(
        op_type="MixedMatMul",
        inputs=("X", "perm", "class_inputs"),
        outputs=("Y",),
        attributes=dict(MIXED_STORAGE),
        doc="weight-only linear with per-channel bit classes (uniform, codebook, fp16) and sparse fp16 outliers",
        reference=_mixed_matmul_reference,
        check=_check_mixed_storage,
        variadic=True,
    )
)

MIXED_WEIGHT = register(
    OpSchema(
        op_type="MixedWeight",
        inputs=("perm", "class_inputs"),
        outputs=("W",),
        attributes=dict(MIXED_STORAGE),
        doc="a weight [K, N] stored as qc.MixedMatMul stores it (per-channel bit classes, sparse fp16 outliers), rows in channel order",
        reference=_mixed_weight_reference,
        check=_check_mixed_storage,
        variadic=True,
    )
)
