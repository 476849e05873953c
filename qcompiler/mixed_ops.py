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

A uniform class whose zero point is uint8 (an integer on the code grid) has the same meaning; it is
the form `lower-ort` can hand to ONNX Runtime's `com.microsoft.MatMulNBits` (2, 4 and 8 bits).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.errors import VerificationError
from qcompiler.op_registry import Attr, OpSchema, attributes_of, register

KINDS = ("uniform", "codebook", "fp16")
INPUTS_PER_KIND = {"uniform": 3, "codebook": 2, "fp16": 1}
FP16_BITS = 16


def dequantize_uniform(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int) -> np.ndarray:
    groups = np.arange(codes.shape[0]) // group_size
    return (codes.astype(np.float32) - zero.astype(np.float32)[groups]) * scale.astype(np.float32)[groups]


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


def mixed_weight(class_inputs: list[np.ndarray], kinds, sizes, group_size: int, sparse: int) -> np.ndarray:
    """The dequantized weight [K, N] in permuted row order."""
    blocks = []
    for kind, index, _, _ in class_slices(kinds, sizes):
        args = class_inputs[index : index + INPUTS_PER_KIND[kind]]
        if kind == "uniform":
            blocks.append(dequantize_uniform(*args, group_size))
        elif kind == "codebook":
            blocks.append(dequantize_codebook(*args))
        else:
            blocks.append(args[0].astype(np.float32))
    w = np.concatenate(blocks, axis=0)
    if sparse:
        indices, values = class_inputs[-2], class_inputs[-1]
        w[indices[:, 0].astype(np.int64), indices[:, 1].astype(np.int64)] = values.astype(np.float32)
    return w


def _mixed_matmul_reference(x, perm, *rest, kinds=(), bits=(), sizes=(), group_size=128, sparse=0):
    w = mixed_weight(list(rest), kinds, sizes, group_size, sparse)
    return ((np.asarray(x)[..., np.asarray(perm, np.int64)] @ w).astype(np.asarray(x).dtype),)


def _check_mixed_matmul(node: ir.Node) -> None:
    a = attributes_of(node)
    where = f"node '{node.name}' (qc.MixedMatMul)"
    kinds, bits, sizes = list(a["kinds"]), list(a["bits"]), list(a["sizes"])
    if not (len(kinds) == len(bits) == len(sizes)) or not kinds:
        raise VerificationError(f"{where}: kinds, bits and sizes must have one entry per class")
    for kind, b in zip(kinds, bits):
        if kind not in KINDS:
            raise VerificationError(f"{where}: unknown class kind '{kind}'; kinds: {', '.join(KINDS)}")
        if (kind == "fp16") != (b == FP16_BITS) or not (1 <= b <= 8 or b == FP16_BITS):
            raise VerificationError(f"{where}: a {kind} class cannot have {b} bits")
    expected = 2 + sum(INPUTS_PER_KIND[k] for k in kinds) + (2 if a["sparse"] else 0)
    if len(node.inputs) != expected:
        raise VerificationError(f"{where} has {len(node.inputs)} inputs; its classes need {expected}")
    perm = node.inputs[1].const_value if node.inputs[1] is not None else None
    if perm is not None and perm.size != sum(sizes):
        raise VerificationError(f"{where}: perm has {perm.size} entries for {sum(sizes)} channels")
    for (kind, index, start, stop), b in zip(class_slices(kinds, sizes), bits):
        codes = node.inputs[2 + index].const_value
        if codes is not None and codes.shape[0] != stop - start:
            raise VerificationError(f"{where}: a {kind} class of {stop - start} rows stores {codes.shape[0]}")
        zero = node.inputs[4 + index].const_value if kind == "uniform" else None
        if zero is not None and zero.dtype not in (ir.DataType.FLOAT16, ir.DataType.UINT8):
            raise VerificationError(f"{where}: a uniform class's zero point must be float16 or uint8, got {zero.dtype}")
        if zero is not None and zero.dtype == ir.DataType.UINT8 and zero.size and int(zero.numpy().max()) >= 1 << b:
            raise VerificationError(f"{where}: an integer zero point of a {b}-bit class must be below {1 << b}")


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

MIXED_MATMUL = register(
    OpSchema(
        op_type="MixedMatMul",
        inputs=("X", "perm", "class_inputs"),
        outputs=("Y",),
        attributes={
            "kinds": Attr("strings"),
            "bits": Attr("ints"),
            "sizes": Attr("ints"),
            "group_size": Attr("int", 128),
            "sparse": Attr("int", 0),
        },
        doc="weight-only linear with per-channel bit classes (uniform, codebook, fp16) and sparse fp16 outliers",
        reference=_mixed_matmul_reference,
        check=_check_mixed_matmul,
        variadic=True,
    )
)
