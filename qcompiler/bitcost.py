"""What a mixed-precision weight costs in stored bits, and what each channel's quantization costs
in error: the model `allocate-bits` optimises and `quantize-weights` reports against.

Stored bits of a layer W [K, N] (every byte counted, as emitted):
- uniform class of b bits: b * K_c * N codes (as bit-planes, K_c padded to a multiple of 8), plus per
  group of `group_size` rows and per column an fp16 scale and an fp16 zero point: 32 * N * ceil(K_c / g);
- codebook class of b bits: the codes likewise, plus N * 2^b fp16 centroids;
- fp16 class (activation outliers): 16 * K_c * N;
- sparse outliers: per value 16 (fp16) + 32 (two uint16 indices);
- the permutation: 16 bits per input channel (uint16).

Error of giving channel k b bits: E_k * ||w_k - Q_b(w_k)||^2 with E_k = mean(x_k^2) from
calibration, Q_b the min-max grid of the channel's group (rows in groups of `group_size` in their
original order; an estimate, since the real groups are formed after permutation).
"""

from __future__ import annotations

import math

import numpy as np

FP16 = 16
SPARSE_BITS = 16 + 32
PERM_BITS = 16
GROUP_BITS = 32  # fp16 scale + fp16 zero point per group and column


def code_bits(bits: int, rows: int, cols: int) -> int:
    """Codes as stored: b bit-planes, 8 rows per byte (a class's rows padded to a multiple of 8)."""
    return bits * 8 * math.ceil(rows / 8) * cols


def uniform_class_bits(bits: int, rows: int, cols: int, group_size: int) -> int:
    if rows == 0:
        return 0
    groups = math.ceil(rows / group_size)
    return code_bits(bits, rows, cols) + GROUP_BITS * cols * groups


def codebook_class_bits(bits: int, rows: int, cols: int) -> int:
    return 0 if rows == 0 else code_bits(bits, rows, cols) + FP16 * cols * (1 << bits)


def class_bits(kind: str, bits: int, rows: int, cols: int, group_size: int) -> int:
    if kind == "fp16":
        return FP16 * rows * cols
    if kind == "codebook":
        return codebook_class_bits(bits, rows, cols)
    return uniform_class_bits(bits, rows, cols, group_size)


def per_row_bits(bits: int, cols: int, group_size: int, codebook: bool) -> float:
    """Marginal stored bits of one more row at `bits` (metadata spread over the rows of a group)."""
    if bits == FP16:
        return FP16 * cols
    if codebook:
        return bits * cols
    return bits * cols + GROUP_BITS * cols / group_size


def fixed_bits(candidates, rows: int, cols: int, codebook: bool, sparse_count: int) -> int:
    """Bits that do not scale with the allocation: permutation, codebooks, sparse outliers."""
    total = PERM_BITS * rows + SPARSE_BITS * sparse_count
    if codebook:  # one table per column for each class that may use one (2-4 bits), counted up front
        total += sum(FP16 * cols * (1 << b) for b in candidates if b <= 4)
    return total


def minmax_grid_error(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Per-row squared error ||w_k - Q_b(w_k)||^2 of asymmetric min-max group quantization."""
    k, n = w.shape
    errors = np.empty(k, np.float64)
    levels = (1 << bits) - 1
    for start in range(0, k, group_size):
        block = w[start : start + group_size].astype(np.float64)
        lo, hi = block.min(axis=0), block.max(axis=0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        q = np.clip(np.round((block - lo) / scale), 0, levels) * scale + lo
        errors[start : start + group_size] = np.sum((block - q) ** 2, axis=1)
    return errors
