"""What a mixed-precision weight costs in stored bits, and what each channel's quantization costs
in error: the model `allocate-bits` optimises and `quantize-weights` reports against.

Stored bits of a layer W [K, N] (every byte counted, as `lower-ort` emits them):
- uniform class of b bits with fractional (fp16) zero points: b * K_c * N codes as bit-planes (K_c
  padded to a multiple of 8), plus per group of `group_size` rows and per column an fp16 scale and
  an fp16 zero point: 32 * N * ceil(K_c / g);
- uniform class of b bits with integer zero points (the `com.microsoft.MatMulNBits` route): stored
  in containers of c = `container_bits(b)` bits, the next width the CPU kernel runs (2, 4, 8: a
  3-bit class costs 4 bits a weight, a 5- to 7-bit class 8): codes packed per column along K,
  8 * ceil(K_c * c / 8) * N (stored tight; the last block's padding is added at load and resident,
  as are the float32 scales the kernel reads: see the manifest's `mixed_layers`; a class of
  `STORED_WHOLE_FROM` blocks or more is stored in whole blocks, c * g * ceil(K_c / g) * N, the
  padding in the file; with `whole_blocks`, `allocate-bits{blocks=whole}`, every class is priced
  so, as resident, so that it pays for the rows of its last block whether it fills them or not), an fp16 scale per
  group and column, and the c-bit zero points packed per column, 8 * ceil(G * c / 8) * N (none
  with `zero-points=none`: symmetric codes whose zero point is the kernel's default 2^(b-1));
- codebook class of b bits: the codes as bit-planes, plus N * 2^b fp16 centroids;
- fp16 class (activation outliers): 16 * K_c * N;
- sparse outliers: two uint16 indices (32) plus an fp16 value (16), or, on the MatMulNBits route,
  where they are added as float32 corrections to the classes' product, a float32 value (32);
- the permutation: 16 bits per input channel (uint16).

Error of giving channel k b bits: E_k * ||w_k - Q_b(w_k)||^2 with E_k = mean(x_k^2) from
calibration, Q_b the min-max grid of the channel's group (rows in groups of `group_size` in their
original order; an estimate, since the real groups are formed after permutation).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from qcompiler.errors import UserError

FP16 = 16
SPARSE_BITS = 16 + 32
SPARSE_BITS_SPLIT = 32 + 32  # float32 correction + two uint16 indices (MatMulNBits route)
PERM_BITS = 16
GROUP_BITS = 32  # fp16 scale + fp16 zero point per group and column
# A MatMulNBits class of this many blocks or more is stored with its last block padded in the file
# (at most 1/16 of its bytes): a Pad folded at session start would make ONNX Runtime hold a copy
# of the class beside its repacked codes (`lower-ort`, docs/real-size.md "Memory at session start").
STORED_WHOLE_FROM = 16


def stored_in_whole_blocks(blocks: int) -> bool:
    """Whether a MatMulNBits class of `blocks` blocks is stored with its last block padded (`STORED_WHOLE_FROM`)."""
    return blocks >= STORED_WHOLE_FROM


NBITS = (2, 4, 8)  # widths ONNX Runtime's MatMulNBits CPU kernel runs (1.32 refuses 3, 5, 6, 7: "Only 2b, 4b and 8b")


def container_bits(bits: int) -> int:
    """The narrowest width MatMulNBits runs that holds `bits`-bit codes (1 -> 2, 3 -> 4, 5..7 -> 8)."""
    return next(c for c in NBITS if c >= bits)


def integer_zero_points(bits: int, zero_points: str) -> bool:
    """Whether a uniform class of `bits` has its zero points on the code grid under the `zero_points`
    policy (`auto`: integer for the widths MatMulNBits runs natively; `integer` for every width, which
    `lower-ort` then stores in `container_bits` containers; `none`: the fixed mid-code 2^(b-1),
    which is not stored)."""
    return zero_points in ("integer", "none") or (zero_points == "auto" and bits in NBITS)


def zero_point_kind(bits: int, zero_points: str) -> str:
    """The grid a uniform class of `bits` is fitted on under the `zero_points` policy: `fractional`
    (fp16 zero points), `integer` (a uint8 code per group) or `symmetric` (every zero point the
    mid-code 2^(b-1), the default of MatMulNBits, so none is stored)."""
    if zero_points == "none":
        return "symmetric"
    return "integer" if integer_zero_points(bits, zero_points) else "fractional"


def nbits_route(kind: str, bits: int, zero_points: str) -> bool:
    """Whether `lower-ort` sends such a class to `com.microsoft.MatMulNBits` (in `container_bits` containers)."""
    return kind == "uniform" and integer_zero_points(bits, zero_points)


def code_bits(bits: int, rows: int, cols: int) -> int:
    """Codes as stored: b bit-planes, 8 rows per byte (a class's rows padded to a multiple of 8)."""
    return bits * 8 * math.ceil(rows / 8) * cols


def uniform_class_bits(bits: int, rows: int, cols: int, group_size: int, zero_points: str = "fractional",
                       whole_blocks: bool = False) -> int:
    """Stored bits of one uniform class; `whole_blocks`: a MatMulNBits class's codes priced in whole
    blocks of `group_size` rows, as the kernel holds them once the session starts."""
    if rows == 0:
        return 0
    groups = math.ceil(rows / group_size)
    if not integer_zero_points(bits, zero_points):
        return code_bits(bits, rows, cols) + GROUP_BITS * cols * groups
    c = container_bits(bits)
    zeros = 0 if zero_points == "none" else 8 * math.ceil(groups * c / 8) * cols
    stored_whole = whole_blocks or stored_in_whole_blocks(groups)
    codes = c * group_size * groups if stored_whole else 8 * math.ceil(rows * c / 8)
    return codes * cols + FP16 * cols * groups + zeros


def table_bits(rows: int, cols: int, bits: int, block_size: int) -> int:
    """Stored bits of an embedding table as `lower-ort` writes it for ONNX Runtime's
    GatherBlockQuantized: each row's codes packed, 8 * ceil(cols * bits / 8), its zero points (one a
    block of `block_size` entries) packed likewise, and a float32 scale a block."""
    blocks = cols // block_size
    return rows * (8 * math.ceil(cols * bits / 8) + 8 * math.ceil(blocks * bits / 8) + 32 * blocks)


def codebook_class_bits(bits: int, rows: int, cols: int) -> int:
    return 0 if rows == 0 else code_bits(bits, rows, cols) + FP16 * cols * (1 << bits)


def class_bits(kind: str, bits: int, rows: int, cols: int, group_size: int, zero_points: str = "fractional",
               whole_blocks: bool = False) -> int:
    if kind == "fp16":
        return FP16 * rows * cols
    if kind == "codebook":
        return codebook_class_bits(bits, rows, cols)
    return uniform_class_bits(bits, rows, cols, group_size, zero_points, whole_blocks)


def class_kind(bits: int, codebook: bool) -> str:
    return "fp16" if bits == FP16 else ("codebook" if codebook and bits <= 4 else "uniform")


def per_row_bits(bits: int, cols: int, group_size: int, codebook: bool, zero_points: str = "fractional") -> float:
    """Marginal stored bits of one more row at `bits` (metadata spread over the rows of a group)."""
    if bits == FP16:
        return FP16 * cols
    if codebook:
        return bits * cols
    if not integer_zero_points(bits, zero_points):
        return bits * cols + GROUP_BITS * cols / group_size
    c = container_bits(bits)
    return c * cols + (FP16 + (0 if zero_points == "none" else c)) * cols / group_size


def sparse_bits(candidates, codebook: bool, zero_points: str) -> int:
    """Stored bits per sparse outlier: the MatMulNBits route stores float32 corrections."""
    split = any(nbits_route(class_kind(b, codebook), b, zero_points) for b in candidates)
    return SPARSE_BITS_SPLIT if split else SPARSE_BITS


def minmax_grid_error(w: np.ndarray, bits: int, group_size: int, zero: str = "fractional") -> np.ndarray:
    """Per-row squared error ||w_k - Q_b(w_k)||^2 of min-max group quantization on the `zero` grid
    (`zero_point_kind`: with `integer`, the range widened to hold 0 and the zero point rounded, as
    stored; with `symmetric`, the mid-code at 0)."""
    q = minmax_grid_quantize(w, bits, group_size, zero)
    return np.sum((w.astype(np.float64) - q) ** 2, axis=1)


def minmax_grid_quantize(w: np.ndarray, bits: int, group_size: int, zero: str = "fractional") -> np.ndarray:
    """W quantized (and dequantized) by min-max groups of `group_size` rows per column, on the
    `zero` grid (`zero_point_kind`)."""
    k, n = w.shape
    out = np.empty((k, n), np.float32)
    levels = (1 << bits) - 1
    integer_zero = zero == "integer"
    for start in range(0, k, group_size):
        block = w[start : start + group_size].astype(np.float64)
        if zero == "symmetric":
            scale = symmetric_scale(block, bits)
            out[start : start + group_size] = (np.clip(np.round(block / scale), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
                                               * scale)
            continue
        lo, hi = block.min(axis=0), block.max(axis=0)
        if integer_zero:
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        if integer_zero:
            code_zero = np.clip(np.round(-lo / scale), 0, levels)
            q = (np.clip(np.round(block / scale + code_zero), 0, levels) - code_zero) * scale
        else:
            q = np.clip(np.round((block - lo) / scale), 0, levels) * scale + lo
        out[start : start + group_size] = q
    return out


def symmetric_scale(block: np.ndarray, bits: int) -> np.ndarray:
    """Per column, the scale of a symmetric b-bit grid (codes -2^(b-1) .. 2^(b-1)-1 about 0) whose
    end -2^(b-1) is the block's value of largest magnitude: negative when that value is positive,
    so that whichever sign is larger gets the grid's longer side (1.0 for an all-zero column)."""
    extreme = np.take_along_axis(block, np.argmax(np.abs(block), axis=0)[None, :], axis=0)[0]
    return np.where(extreme != 0, extreme / -(1 << (bits - 1)), 1.0)


# ----------------------------------------------------------------------------------------------
# A target's cost model: what `allocate-bits` prices. The functions above are ONNX Runtime's
# storage (`lower-ort`); a target whose emitter stores otherwise brings its own `StorageCost`
# (`qcompiler.codegen.Target.cost_model`), and a target with a measured kernel-cost table can
# price time (`allocate-bits{cost=latency}`).


@dataclasses.dataclass(frozen=True)
class KernelCosts:
    """Measured time of one class of a mixed layer on a target, at M=1: `per_weight_ns[route]`, the
    time per weight of the kernel a class of that route runs, and `per_class_us`, the fixed cost of
    one more class (its launch, its column read and its term of the sum). `source`: where the table
    was measured (machine, command), for the record."""

    target: str
    per_weight_ns: dict[str, float]
    per_class_us: float
    source: dict = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, path) -> "KernelCosts":
        body = json.loads(Path(path).read_text())
        return cls(body["target"], {k: float(v) for k, v in body["per_weight_ns"].items()}, float(body["per_class_us"]),
                   body.get("measured", {}))

    def class_us(self, route: str, rows: int, cols: int) -> float:
        """Predicted microseconds of one class of `rows` input channels and `cols` outputs (0 when empty)."""
        if rows == 0:
            return 0.0
        if route not in self.per_weight_ns:
            raise UserError(f"allocate-bits: the {self.target} kernel-cost table has no route '{route}' "
                            f"(it has {', '.join(sorted(self.per_weight_ns))}); re-measure it with benchmarks/kernel_costs.py")
        return self.per_class_us + self.per_weight_ns[route] * rows * cols / 1000.0


class StorageCost:
    """ONNX Runtime's cost model (`lower-ort`'s storage, the module functions above): the stored bits
    of each class, the marginal bits of one more row, a sparse outlier, the permutation, the widths
    run packed, and the route each class takes (the key of its kernel in `kernel_costs`)."""

    name = "ort"
    kernels = "ONNX Runtime's MatMulNBits kernels"  # what runs the packed widths (named in refusals)
    packed_widths: tuple[int, ...] = NBITS
    perm_bits = PERM_BITS
    holds_blocks = True  # the kernels hold a class's codes in whole blocks once the session starts (`whole_blocks`)
    smallest_group = 16  # the fewest rows a scale group may have and still run packed (MatMulNBits' smallest block)

    def __init__(self, kernel_costs: KernelCosts | None = None, name: str | None = None):
        self.kernel_costs = kernel_costs
        self.name = name or type(self).name  # the target whose run prices this way (named in refusals)

    def class_bits(self, kind: str, bits: int, rows: int, cols: int, group_size: int, zero_points: str,
                   whole_blocks: bool = False) -> int:
        """Stored bits of one class; `whole_blocks`: a MatMulNBits class priced in whole blocks (as resident)."""
        return class_bits(kind, bits, rows, cols, group_size, zero_points, whole_blocks)

    def per_row_bits(self, bits: int, cols: int, group_size: int, codebook: bool, zero_points: str) -> float:
        return per_row_bits(bits, cols, group_size, codebook, zero_points)

    def sparse_bits(self, candidates, codebook: bool, zero_points: str) -> int:
        return sparse_bits(candidates, codebook, zero_points)

    def route(self, kind: str, bits: int, zero_points: str) -> str:
        """The kernel a class runs on: `nbits<c>` (MatMulNBits in c-bit containers), `fp16` (cast at
        every run, float MatMul), `float32` (expanded at load: codebooks, fractional zero points)."""
        if kind == "fp16":
            return "fp16"
        if nbits_route(kind, bits, zero_points):
            return f"nbits{container_bits(bits)}"
        return "float32"


ORT = StorageCost()


class ExpandedStorageCost(StorageCost):
    """What `lower-ort`'s expand route stores for a weight rebuilt in float32 when the session starts
    (the route of every mixed Conv, `qc.MixedWeight`): codes of any width as tight bit-planes
    (`code_bits`), an fp16 scale and a zero point per group and column (uint8 when integer, else
    fp16), codebooks and fp16 classes as above, sparse outliers as two uint16 indices and an fp16
    value. Nothing runs packed, so every width 1..8 is allowed."""

    name = "ort"
    kernels = "ONNX Runtime's float kernels (weights expanded at load)"
    packed_widths = tuple(range(1, 9))
    holds_blocks = False

    def class_bits(self, kind: str, bits: int, rows: int, cols: int, group_size: int, zero_points: str,
                   whole_blocks: bool = False) -> int:  # expanded at load: no blocks held
        if kind != "uniform" or rows == 0:
            return class_bits(kind, bits, rows, cols, group_size, zero_points)
        return code_bits(bits, rows, cols) + self._group_bits(bits, zero_points) * cols * math.ceil(rows / group_size)

    def per_row_bits(self, bits: int, cols: int, group_size: int, codebook: bool, zero_points: str) -> float:
        if bits == FP16 or codebook:
            return per_row_bits(bits, cols, group_size, codebook, zero_points)
        return bits * cols + self._group_bits(bits, zero_points) * cols / group_size

    def sparse_bits(self, candidates, codebook: bool, zero_points: str) -> int:
        return SPARSE_BITS

    def route(self, kind: str, bits: int, zero_points: str) -> str:
        return "float32"

    @staticmethod
    def _group_bits(bits: int, zero_points: str) -> int:
        return FP16 + (8 if integer_zero_points(bits, zero_points) else FP16)


EXPANDED = ExpandedStorageCost()
