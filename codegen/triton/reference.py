"""NumPy references for the Triton quantized-linear kernels, and the packers that make their formats.

Everything here is plain NumPy (no torch, no triton), so a reader can check a kernel against a
dozen lines of array code, and the emitter can pack weights without a GPU.

Layout convention (METHODS.md, "Notation"): a linear is ``Y = X W (+ bias)`` with ``X [M, K]`` and
``W [K, N]`` (ONNX MatMul layout; torch's ``nn.Linear.weight`` is ``W.T``).

Packed code format ("k-strided words"), shared by the uniform and the codebook families
-------------------------------------------------------------------------------------
Codes of ``b`` bits, ``C = codes_per_word(b)`` codes in one int32 (16 for 2 bits, 10 for 3 bits,
8 for 4 bits, 4 for 8 bits).  ``R = PACK_ROWS = 32``.  K is padded with code 0 to ``Kp``, a multiple
of the K tile ``T = C * R``.  The packed tensor is int32 ``[Kp // C, N]`` (N contiguous, so a row of
words is one coalesced load) and::

    packed[t*R + r, n] = sum_i  code[t*T + i*R + r, n] << (b*i)      i = 0 .. C-1, r = 0 .. R-1

so one 32-bit load yields ``C`` codes, and "code i of the R words of tile t" is the contiguous K
range ``[t*T + i*R, t*T + (i+1)*R)``.  A kernel therefore extracts whole K chunks with one shift and
one mask (no gather, no reshape) and feeds them to ``tl.dot`` against a contiguous slice of X.
Because R = 32 divides every group size (32, 64, 128), a chunk never straddles a quantization group.
3-bit: 10 codes per word in bits 0..29, bits 30..31 are zero (3.2 bits per weight in memory).
A package does not store these words: it stores each class's codes tight at their own width
(:func:`pack_tight`, 3.0 bits per 3-bit weight, no padding rows) and builds the words at load.

Uniform (family ``w{b}a16``): ``w[k, n] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]``, scale and
zero fp16 ``[K // g, N]`` (asymmetric; the zero point may be fractional).
Codebook (family ``lut{b}a16``): ``w[k, n] = lut[grp, n, q[k, n]]`` with an fp16 table ``[G, N, 2**b]``:
``G = 1`` (one table per output column, SqueezeLLM style) or ``G = K // g`` (one per group).
Sparse outliers: a CSC matrix (``col_ptr`` int32 ``[N + 1]``, ``row_idx`` int16 when K < 32768 else
int32, ``values`` fp16) of *corrections* ``S``; the layer computes ``X (W_q + S)``.  Storing the
residual ``w - deq(q)`` (rather than the raw weight) means the dense codes need no special value.
W8A8: ``Y = (Xq Wq^T) * sx[:, None] * sw[None, :]`` with ``Xq`` int8 ``[M, K]`` and a per-token fp32
scale ``sx [M]``, ``Wq`` int8 stored transposed ``[N, K]`` (K contiguous, the layout int8 tensor-core
instructions want) with a per-output-channel fp32 scale ``sw [N]``, int32 accumulation.

Mixed layers (one launch per layer): the classes' K tiles sorted by kind with a per-tile table,
see :class:`MixedLayout` and :func:`pack_mixed`.

Epilogue activations: ``none``, ``relu``, ``gelu`` (exact, erf; torch's default), ``gelu_tanh``
(the tanh approximation, written as ``x * sigmoid(2u)``), ``silu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qcompiler.dialect.mixed_ops import MixedClass

PACK_ROWS = 32
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
_CODES_PER_WORD = {2: 16, 3: 10, 4: 8, 8: 4}


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds (10 for 3 bits: bits 30, 31 unused)."""
    if bits not in _CODES_PER_WORD:
        raise ValueError(f"unsupported code width {bits}; expected one of {sorted(_CODES_PER_WORD)}")
    return _CODES_PER_WORD[bits]


def k_tile(bits: int) -> int:
    """The K range covered by one row-block of ``PACK_ROWS`` words."""
    return codes_per_word(bits) * PACK_ROWS


def padded_k(k: int, bits: int) -> int:
    t = k_tile(bits)
    return -(-k // t) * t


# ----------------------------------------------------------------------------------------------
# packing


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``q [K, N]`` (0 <= q < 2**bits) into int32 ``[Kp // C, N]`` (module doc)."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{q.min()}, {q.max()}]")
    k, n = q.shape
    c, r = codes_per_word(bits), PACK_ROWS
    kp = padded_k(k, bits)
    qp = np.zeros((kp, n), np.uint32)
    qp[:k] = q
    # [tiles, C, R, N]: code i of word (t, r) is k = t*T + i*R + r
    qp = qp.reshape(kp // (c * r), c, r, n)
    words = np.zeros((kp // (c * r), r, n), np.uint32)
    for i in range(c):
        words |= qp[:, i] << np.uint32(bits * i)
    return words.reshape(kp // c, n).view(np.int32)


def pack_tight(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (0 <= q < 2**bits) as a package stores them: one little-endian bit stream, code i in
    bits ``[i*bits, (i+1)*bits)``, row-major, the last byte zero-padded; uint8
    ``[ceil(q.size * bits / 8)]``.  The package turns the stream into :func:`pack_codes`'s words at
    load (``runtime.code_words``), so no padding row and no spare word bit is stored."""
    q = np.asarray(codes).reshape(-1)
    if q.size and (q.min() < 0 or q.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{q.min()}, {q.max()}]")
    shifts = np.arange(bits, dtype=np.uint8)
    chunk = 1 << 20  # codes at a time: a multiple of 8, so every chunk's stream is whole bytes
    parts = [np.packbits(((q[s:s + chunk].astype(np.uint8)[:, None] >> shifts) & 1).reshape(-1), bitorder="little")
             for s in range(0, q.size, chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 codes ``[k, N]``."""
    packed = np.asarray(packed)
    c, r = codes_per_word(bits), PACK_ROWS
    kw, n = packed.shape
    if kw % r:
        raise ValueError(f"packed rows {kw} are not a multiple of {r}")
    words = packed.view(np.uint32).reshape(kw // r, r, n)
    mask = np.uint32((1 << bits) - 1)
    q = np.stack([(words >> np.uint32(bits * i)) & mask for i in range(c)], axis=1)  # [tiles, C, R, N]
    q = q.reshape(kw * c, n)
    if k > q.shape[0]:
        raise ValueError(f"packed tensor holds {q.shape[0]} rows, {k} requested")
    return q[:k].astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# uniform (asymmetric, grouped) weights


@dataclass
class UniformWeights:
    """Packed asymmetric group-quantized weights (family ``w{bits}a16_g{group}``)."""

    packed: np.ndarray  # int32 [Kp // C, N]
    scale: np.ndarray  # fp16 [K // group, N]
    zero: np.ndarray  # fp16 [K // group, N]
    bits: int
    group: int
    k: int
    n: int

    def codes(self) -> np.ndarray:
        return unpack_codes(self.packed, self.bits, self.k)

    def dequantize(self) -> np.ndarray:
        return dequantize_uniform(self.codes(), self.scale, self.zero, self.group)


def quantize_uniform(w: np.ndarray, bits: int, group: int) -> UniformWeights:
    """Min-max asymmetric quantization of ``w [K, N]`` per (group of ``group`` rows, column).

    ``scale = (max - min) / (2**b - 1)``, ``zero = round(-min / scale)`` (an integer, stored fp16),
    ``q = clip(round(w / scale) + zero, 0, 2**b - 1)``.
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if group % PACK_ROWS or group not in GROUPS:
        raise ValueError(f"group size {group} not supported; expected one of {GROUPS}")
    if k % group:
        raise ValueError(f"K={k} is not a multiple of the group size {group}")
    qmax = (1 << bits) - 1
    wg = w.reshape(k // group, group, n)
    lo = np.minimum(wg.min(axis=1), 0.0)
    hi = np.maximum(wg.max(axis=1), 0.0)
    scale = ((hi - lo) / qmax).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1.0), scale)
    s32 = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s32), 0, qmax).astype(np.float16)
    q = np.clip(np.round(wg / s32[:, None, :]) + zero.astype(np.float32)[:, None, :], 0, qmax)
    q = q.reshape(k, n).astype(np.uint8)
    return UniformWeights(pack_codes(q, bits), scale, zero, bits, group, k, n)


def dequantize_uniform(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """``(q - zero[k // g]) * scale[k // g]`` in fp32, ``[K, N]``."""
    s = np.repeat(np.asarray(scale, np.float32), group, axis=0)[: q.shape[0]]
    z = np.repeat(np.asarray(zero, np.float32), group, axis=0)[: q.shape[0]]
    return (q.astype(np.float32) - z) * s


# ----------------------------------------------------------------------------------------------
# codebook (non-uniform, LUT) weights


@dataclass
class CodebookWeights:
    """Packed codes into per-column (``group=None``) or per-(group, column) fp16 tables."""

    packed: np.ndarray  # int32 [Kp // C, N]
    lut: np.ndarray  # fp16 [G, N, 2**bits]
    bits: int
    group: int | None
    k: int
    n: int

    def codes(self) -> np.ndarray:
        return unpack_codes(self.packed, self.bits, self.k)

    def dequantize(self) -> np.ndarray:
        return dequantize_codebook(self.codes(), self.lut, self.group)


def _kmeans_1d(v: np.ndarray, weight: np.ndarray, nc: int, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D Lloyd k-means over axis 0 of ``v [L, B]`` (B independent problems).

    Initialised at the weighted quantiles' positions (here: plain quantiles), deterministic.
    Returns centroids ``[B, nc]`` (sorted) and assignments ``[L, B]``.
    """
    qs = (np.arange(nc) + 0.5) / nc
    cent = np.quantile(v, qs, axis=0).T.astype(np.float64)  # [B, nc]
    wv = weight[:, None] if weight.ndim == 1 else weight
    for _ in range(iters):
        a = np.abs(v[:, :, None] - cent[None, :, :]).argmin(axis=2)  # [L, B]
        onehot = a[:, :, None] == np.arange(nc)[None, None, :]
        wsum = (onehot * wv[:, :, None]).sum(axis=0)  # [B, nc]
        vsum = (onehot * (wv * v)[:, :, None]).sum(axis=0)
        cent = np.where(wsum > 0, vsum / np.maximum(wsum, 1e-30), cent)
        cent.sort(axis=1)
    a = np.abs(v[:, :, None] - cent[None, :, :]).argmin(axis=2)
    return cent, a


def quantize_codebook(w: np.ndarray, bits: int, group: int | None = None, importance: np.ndarray | None = None,
                      iters: int = 10) -> CodebookWeights:
    """Fit a ``2**bits``-entry table per column (or per group and column) by weighted 1-D k-means.

    ``importance [K]`` weighs each input channel (SqueezeLLM / CMPQ use the activation energy
    ``mean(x_k**2)``); default uniform.  Codes index the fp16-rounded table.
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    nc = 1 << bits
    imp = np.ones(k, np.float64) if importance is None else np.asarray(importance, np.float64)
    if group is None:
        cent, _ = _kmeans_1d(w.astype(np.float64), imp, nc, iters)
        lut = cent.astype(np.float16)[None]  # [1, N, nc]
    else:
        if k % group:
            raise ValueError(f"K={k} is not a multiple of the group size {group}")
        wg = w.reshape(k // group, group, n).transpose(1, 0, 2).reshape(group, -1)  # [g, G*N]
        ig = np.repeat(imp.reshape(k // group, group).T, n, axis=1)  # [g, G*N]
        cent, _ = _kmeans_1d(wg.astype(np.float64), ig, nc, iters)
        lut = cent.astype(np.float16).reshape(k // group, n, nc)
    # assign against the fp16 table the kernel will read
    deq_tab = lut.astype(np.float32)
    rows = np.zeros(k, np.int64) if group is None else np.arange(k) // group
    tab = deq_tab[rows]  # [K, N, nc]
    q = np.abs(w[:, :, None] - tab).argmin(axis=2).astype(np.uint8)
    return CodebookWeights(pack_codes(q, bits), lut, bits, group, k, n)


def dequantize_codebook(q: np.ndarray, lut: np.ndarray, group: int | None) -> np.ndarray:
    """``lut[grp(k), n, q[k, n]]`` in fp32, ``[K, N]``."""
    k, n = q.shape
    lut = np.asarray(lut, np.float32)
    rows = np.zeros(k, np.int64) if group is None else np.arange(k) // group
    return lut[rows[:, None], np.arange(n)[None, :], q.astype(np.int64)]


# ----------------------------------------------------------------------------------------------
# sparse fp16 outlier corrections (CSC)


@dataclass
class SparseOutliers:
    col_ptr: np.ndarray  # int32 [N + 1]
    row_idx: np.ndarray  # int16 (K < 32768) or int32 [nnz], sorted by row within a column
    values: np.ndarray  # fp16 [nnz]
    k: int
    n: int

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def to_dense(self) -> np.ndarray:
        d = np.zeros((self.k, self.n), np.float32)
        cols = np.repeat(np.arange(self.n), np.diff(self.col_ptr))
        d[self.row_idx.astype(np.int64), cols] = self.values.astype(np.float32)
        return d


def _csc(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int, n: int) -> SparseOutliers:
    order = np.lexsort((rows, cols))  # by column, rows ascending within a column
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(cols, minlength=n)
    col_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ridx = rows.astype(np.int16 if k < 32768 else np.int32)
    return SparseOutliers(col_ptr, ridx, np.asarray(vals).astype(np.float16), k, n)


def sparse_from_dense(d: np.ndarray) -> SparseOutliers:
    """CSC of the nonzeros of ``d [K, N]`` (column-major order, rows ascending)."""
    d = np.asarray(d, np.float32)
    rows, cols = np.nonzero(d)
    return _csc(rows, cols, d[rows, cols], *d.shape)


def extract_outliers(w: np.ndarray, w_deq: np.ndarray, fraction: float,
                     importance: np.ndarray | None = None) -> SparseOutliers:
    """Keep the ``fraction`` of weights with the largest ``|w - deq(w)| * sqrt(importance_k)`` as fp16
    corrections ``w - deq(w)`` (METHODS.md, CMPQ "quantization-based outliers")."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    err = w - np.asarray(w_deq, np.float32)
    score = np.abs(err) if importance is None else np.abs(err) * np.sqrt(np.asarray(importance, np.float32))[:, None]
    nnz = int(round(fraction * w.size))
    flat = np.argpartition(score.ravel(), -nnz)[-nnz:] if nnz else np.zeros(0, np.int64)
    rows, cols = np.divmod(flat, n)
    return _csc(rows, cols, err[rows, cols], k, n)


# ----------------------------------------------------------------------------------------------
# W8A8


def quantize_per_token_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``sx = max|x_row| / 127``, ``xq = clip(round_half_even(x / sx), -127, 127)``."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1)
    sx = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.round(x / sx[:, None]), -127, 127).astype(np.int8)
    return xq, sx


def quantize_per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of ``w [K, N]``; returns ``wq_t`` int8 ``[N, K]`` and ``sw [N]``."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0)
    sw = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    wq = np.clip(np.round(w / sw[None, :]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(wq.T), sw


# ----------------------------------------------------------------------------------------------
# the references of what the kernels compute


def apply_act(y: np.ndarray, act: str) -> np.ndarray:
    if act == "none":
        return y
    if act == "relu":
        return np.maximum(y, 0)
    if act == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))
    if act == "gelu_tanh":  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        u = math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)
        return 0.5 * y * (1.0 + np.tanh(u))
    if act == "silu":
        return y / (1.0 + np.exp(-y))
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _epilogue(acc: np.ndarray, x: np.ndarray, bias, act: str, sparse: SparseOutliers | None) -> np.ndarray:
    if sparse is not None:
        acc = acc + x.astype(np.float64) @ sparse.to_dense().astype(np.float64)
    if bias is not None:
        acc = acc + np.asarray(bias, np.float64)[None, :]
    return apply_act(acc, act)


def ref_gemm_uniform(x: np.ndarray, wq: UniformWeights, bias=None, act: str = "none",
                     sparse: SparseOutliers | None = None) -> np.ndarray:
    """``act(X ((q - z) s + S) + bias)`` in float64 (the kernels accumulate fp32, see the tests' tolerances)."""
    w = wq.dequantize().astype(np.float64)
    return _epilogue(np.asarray(x, np.float64) @ w, x, bias, act, sparse)


def ref_gemm_codebook(x: np.ndarray, wc: CodebookWeights, bias=None, act: str = "none",
                      sparse: SparseOutliers | None = None) -> np.ndarray:
    """``act(X (lut[q] + S) + bias)`` in float64."""
    w = wc.dequantize().astype(np.float64)
    return _epilogue(np.asarray(x, np.float64) @ w, x, bias, act, sparse)


def ref_gemm_w8a8(xq: np.ndarray, sx: np.ndarray, wq_t: np.ndarray, sw: np.ndarray, bias=None,
                  act: str = "none") -> np.ndarray:
    """``act((Xq Wq^T) sx sw + bias)``: exact int64 product, then the scales, in float64."""
    acc = xq.astype(np.int64) @ wq_t.astype(np.int64).T
    y = acc.astype(np.float64) * np.asarray(sx, np.float64)[:, None] * np.asarray(sw, np.float64)[None, :]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
    return apply_act(y, act)


# ----------------------------------------------------------------------------------------------
# mixed-precision layers: every class in one launch


MIXED_KINDS = (("uniform", 2), ("uniform", 3), ("uniform", 4), ("uniform", 8), ("codebook", 2), ("codebook", 3),
               ("codebook", 4), ("codebook", 8), ("fp16", 16))


def kernel_width(bits: int) -> int:
    """The narrowest kernel code width holding ``bits``-bit codes (1 -> 2, 5..7 -> 8)."""
    for b in BITS:
        if b >= bits:
            return b
    raise ValueError(f"no kernel code width holds {bits}-bit codes; widths: {BITS}")


@dataclass
class MixedLayout:
    """A mixed layer in the one-launch kernel's layout (``kernels.qc_gemm_mixed_a16``).

    The K tiles of every class, sorted by kind (``MIXED_KINDS`` order, then class order): a tile is
    32 rows of packed words (``T = codes_per_word(b) * 32`` rows of K) or, for fp16 classes, 32 rows.
    ``words`` int32 [packed tiles * 32, N] (tile t at rows 32t ..; fp16 tiles, last, have none), ``tiles``
    int32 [tiles, 4] = (first X row, end of the class's X rows, metadata base, first row within the
    class), ``seg`` int32 [len(MIXED_KINDS) + 1] (kind j's tiles are seg[j] .. seg[j + 1]),
    ``scale``/``zero`` fp16 [G, N] (each uniform class's groups; base = the class's first group row),
    ``lut`` fp16 flat (each codebook class's [N, 2**kb] table; base = its offset), ``dense`` fp16
    [D, N] (each fp16 class's rows; base = the tile's first row).  Nothing is stored for the padding
    rows past a class's end: the kernel masks X there, and the scales, zeros and fp16 rows of a
    32-row chunk that lies wholly past it."""

    words: np.ndarray
    tiles: np.ndarray
    seg: np.ndarray
    scale: np.ndarray | None
    zero: np.ndarray | None
    lut: np.ndarray | None
    dense: np.ndarray | None
    group: int
    kinds_mask: int
    segments: list = field(default_factory=list)  # (codes [rows, N], bits, kernel width) of each class in `words`, in order


def pack_mixed(classes: list[MixedClass], group: int, n: int) -> MixedLayout:
    """Lay the classes out for the one-launch kernel (see :class:`MixedLayout`)."""
    if group % PACK_ROWS and any(c.kind == "uniform" for c in classes):
        raise ValueError(f"uniform classes need a group size that is a multiple of {PACK_ROWS}, got {group}")
    words, tiles, scales, zeros, luts, dense, segments = [], [], [], [], [], [], []
    seg, mask = [0], 0
    n_groups = n_lut = n_dense = 0
    for j, (kind, width) in enumerate(MIXED_KINDS):
        for c in classes:
            if c.kind != kind or (kind != "fp16" and kernel_width(c.bits) != width):
                continue
            mask |= 1 << j
            rows = c.stop - c.start
            if kind == "fp16":
                for t in range(-(-rows // PACK_ROWS)):
                    tiles.append((c.start + t * PACK_ROWS, c.stop, n_dense + t * PACK_ROWS, t * PACK_ROWS))
                dense.append(np.asarray(c.inputs[0], np.float16))
                n_dense += rows
                continue
            packed = pack_codes(np.asarray(c.inputs[0], np.int64), width)
            segments.append((np.asarray(c.inputs[0]), c.bits, width))
            tile_rows = k_tile(width)
            n_tiles = packed.shape[0] // PACK_ROWS
            if kind == "uniform":
                _, scale, zero = c.inputs
                if scale.shape[0] != -(-rows // group) or zero.shape != scale.shape:
                    raise ValueError(f"a uniform class of {rows} rows needs {-(-rows // group)} groups of {group}, "
                                     f"has scale {scale.shape} and zero {zero.shape}")
                scales.append(np.asarray(scale, np.float16))
                zeros.append(np.asarray(zero, np.float16))
                base = n_groups
                n_groups += scale.shape[0]
            else:
                table = np.asarray(c.inputs[1], np.float16)
                lut = np.zeros((n, 1 << width), np.float16)
                lut[:, : table.shape[1]] = table
                luts.append(lut.reshape(-1))
                base = n_lut
                n_lut += lut.size
            for t in range(n_tiles):
                tiles.append((c.start + t * tile_rows, c.stop, base, t * tile_rows))
            words.append(packed)
        seg.append(len(tiles))
    if not tiles:
        raise ValueError("a mixed layer needs at least one class")
    return MixedLayout(
        np.concatenate(words).astype(np.int32) if words else np.zeros((0, n), np.int32), np.asarray(tiles, np.int32),
        np.asarray(seg, np.int32),
        np.concatenate(scales) if scales else None, np.concatenate(zeros) if zeros else None,
        np.concatenate(luts) if luts else None, np.concatenate(dense) if dense else None, group, mask, segments)


def ref_gemm_mixed(x: np.ndarray, classes: list[MixedClass], group: int, bias=None, act: str = "none",
                   sparse: SparseOutliers | None = None) -> np.ndarray:
    """``act(X (concat_c W_c + S) + bias)`` in float64, X in the layer's stored channel order."""
    w = np.concatenate([c.dequantize(group) for c in sorted(classes, key=lambda c: c.start)]).astype(np.float64)
    return _epilogue(np.asarray(x, np.float64) @ w, x, bias, act, sparse)


# ----------------------------------------------------------------------------------------------
# accounting


def effective_bits(k: int, n: int, *, bits: int, group: int | None = None, zero: bool = True,
                   lut_groups: int | None = None, nnz: int = 0, row_index_bytes: int = 2) -> float:
    """Stored bits per weight, every byte of metadata counted (METHODS.md, CMPQ):
    packed codes (K padded to the word tile) + fp16 scales/zeros or fp16 tables + CSC outliers."""
    total = padded_k(k, bits) // codes_per_word(bits) * n * 32
    if group is not None and lut_groups is None:
        total += (k // group) * n * 16 * (2 if zero else 1)
    if lut_groups is not None:
        total += lut_groups * n * (1 << bits) * 16
    if nnz:
        total += nnz * (16 + 8 * row_index_bytes) + (n + 1) * 32
    return total / (k * n)
