"""What the Triton package stores for a mixed layer, the cost model `allocate-bits` prices for
`--target triton` (`Target.cost_model`). It differs from ONNX Runtime's (`qcompiler.analysis.bitcost`):

- codes of b bits stored tight at b bits (`reference.pack_tight`: one bit stream a class, its last
  byte padded), which the package lays out as its kernels' int32 words of width kb (the next of 2,
  3, 4, 8 at or above b, rows padded to a whole K tile) once, at load: 8 * ceil(b * rows * N / 8);
- uniform classes: an fp16 scale and an fp16 zero point per group and column, whatever zero points
  the allocation chose (32 * N * ceil(rows / group));
- codebook classes: the codes as above and an fp16 table of 2^kb entries per column (kb: the
  kernel width);
- fp16 classes: 16 bits a weight;
- sparse outliers in CSC: an int16 row and an fp16 value (32 bits; the int32 column pointers are
  a per-layer constant);
- the permutation: int32 per input channel.
The time each class route takes (`cost=latency`) is in `kernel_costs.json` beside this file.
"""

from __future__ import annotations

import math

from qcompiler.analysis import bitcost
from qcompiler.codegen.triton.reference import BITS, kernel_width

SPARSE_BITS = 16 + 16
PERM_BITS = 32


def code_bits(bits: int, rows: int, cols: int) -> int:
    """Codes as the package stores them: one tight stream of `bits`-bit codes, whole bytes."""
    return 8 * math.ceil(bits * rows * cols / 8)


class TritonStorageCost(bitcost.StorageCost):
    name = "triton"
    kernels = "the Triton package's kernels"
    packed_widths = BITS
    perm_bits = PERM_BITS
    holds_blocks = False
    smallest_group = 32  # the kernels read codes in packs of 32 rows (emit.PACK_ROWS); fewer run as fp16 weights

    def class_bits(self, kind: str, bits: int, rows: int, cols: int, group_size: int, zero_points: str,
                   whole_blocks: bool = False) -> int:  # the package holds its codes tight: no blocks to price
        if rows == 0:
            return 0
        if kind == "fp16":
            return bitcost.FP16 * rows * cols
        if kind == "codebook":
            return code_bits(bits, rows, cols) + bitcost.FP16 * cols * (1 << kernel_width(bits))
        return code_bits(bits, rows, cols) + 2 * bitcost.FP16 * cols * math.ceil(rows / group_size)

    def per_row_bits(self, bits: int, cols: int, group_size: int, codebook: bool, zero_points: str) -> float:
        if bits == bitcost.FP16:
            return bitcost.FP16 * cols
        codes = bits * cols
        return codes if codebook else codes + 2 * bitcost.FP16 * cols / group_size

    def sparse_bits(self, candidates, codebook: bool, zero_points: str) -> int:
        return SPARSE_BITS

    def route(self, kind: str, bits: int, zero_points: str) -> str:
        if kind == "fp16":
            return "fp16"
        return f"{'lut' if kind == 'codebook' else 'w'}{kernel_width(bits)}"


TRITON = TritonStorageCost()
