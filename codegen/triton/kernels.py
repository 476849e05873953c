"""Triton kernels for quantized linears ``Y = X W (+ bias)`` and their launch wrappers.

Formats (packing, scales, tables, CSC outliers, W8A8 layout) are defined, with NumPy references,
in :mod:`reference` beside this file; read its module docstring first.  This module needs only
torch and triton (no NumPy, no qcompiler), so an emitted package can copy it verbatim.

Kernels
-------
``qc_gemm_wq_a16_kernel``
    Weight-only quantized GEMM, 16/32-bit activations.  One body, specialised by constexprs:
    ``MODE`` 0 = uniform asymmetric groups (family ``w{2,3,4,8}a16_g{32,64,128}``), 1 = codebook
    (family ``lut{2,3,4,8}a16``: per-column or per-group fp16 tables); optional CSC fp16 outlier
    correction added in the same launch (``SP_SPLITS`` extra programs per output tile, running beside
    the dense ones and joining the split-K reduction); fused epilogue: bias, activation
    (``relu``, ``gelu`` = erf, ``gelu_tanh``, ``silu``), cast to X's dtype.
    Dequantisation is in registers, per K chunk of 32 rows: one shift and one mask/or put a code into
    the top mantissa bits of 1.0f, so ``f = 1 + q / 2**b`` exactly, and a single FMA gives
    ``(q - z) * s = f * (2**b s) - (2**b s + z s)`` (one rounding; no int->float conversion, which
    runs at a quarter of the FMA rate).  Codebooks: a select tree over the code's bits against the
    table held in registers (``LUT_IMPL`` 0, b <= 4), or a gather from the (L1-resident) table
    (``LUT_IMPL`` 1, any b).  Accumulation is fp32 throughout.
    Paths (``USE_DOT``): tensor-core tiles (``tl.dot`` on the dequantised tile, cast to X's dtype)
    for prefill and small-M decode, or a GEMV path for M == 1 (fp32 FMAs into a [32, BN] register
    accumulator, one cross-thread reduction at the end).
``qc_gemm_mixed_a16_kernel``
    A mixed-precision layer (``qc.MixedMatMul``) in one launch with one fp32 accumulator: the K
    tiles of all its classes (uniform 2/3/4/8-bit groups, per-column codebooks of 2/3/4/8 bits,
    fp16 rows) are sorted by kind, and each program walks its contiguous share of them kind by kind
    (a loop per kind present, each specialised on its width: no per-tile branch); a per-tile table
    gives the X rows a tile multiplies and where its scales, table or fp16 rows start (layout:
    ``reference.MixedLayout``).  Sparse outliers of the whole layer, split-K and the epilogue as in
    the weight-only kernel.
``qc_gemm_w8a8_kernel``
    int8 X (per-token fp32 scale) times int8 W^T ``[N, K]`` (per-output-channel fp32 scale), int32
    ``tl.dot`` accumulation, scales, bias and activation in the epilogue, fp16/bf16 out.
``qc_quantize_per_token_int8_kernel``
    The activation side of W8A8: per-row absmax scale and round-half-even to int8.

Split-K (decode: few output tiles, long K) is done in ONE launch: each of the ``SPLIT_K`` programs of
an output tile writes its fp32 (int32 for W8A8) partial to a workspace, bumps a per-tile counter
(acq_rel atomic after a CTA barrier, CUTLASS's serial split-K semaphore pattern), and the last one
to arrive sums the partials in fixed order (deterministic), resets the counter to 0 and runs the
epilogue, so activation epilogues stay fused.  Workspaces are cached per device; one workspace must
not be used by two streams at once (launch from one stream, or pass ``workspace=``).

Configurations: decode (M == 1: GEMV configs; 2 <= M <= 16: BM = 16 tensor-core tiles) use split-K;
prefill uses larger ``tl.dot`` tiles.  Each set is a ``triton.autotune`` over a short list keyed by
(M bucket, N, K, the specialisation constexprs, dtypes), timed by :func:`bench_kernel_cold` (CUDA
graphs, cold L2: eager timing of a decode kernel measures Python launch overhead instead).  Under ``TRITON_INTERPRET=1`` (CPU tests)
autotuning is off and one small fixed configuration per path is used (or the caller's ``config``).

Named entry points: ``qc_gemm_w{b}a16_g{g}`` (b in 2, 3, 4, 8; g in 32, 64, 128),
``qc_gemm_lut{b}a16`` and ``qc_gemm_lut{b}a16_g{g}``, ``qc_gemm_mixed_a16``, ``qc_gemm_w8a8``,
``qc_quantize_per_token_int8``; generic ``qc_gemm_wq_a16`` takes every option.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PACK_ROWS = 32
_CODES_PER_WORD = {2: 16, 3: 10, 4: 8, 8: 4}
ACT_IDS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


AUTOTUNE_DEFAULT = True


def autotuning() -> bool:
    """Whether launches autotune (per GPU, shape bucket and specialisation; the first call of each
    new key runs every configuration). QC_TRITON_AUTOTUNE=0/1 overrides AUTOTUNE_DEFAULT; off, each
    path uses the first configuration of its list (the fastest measured at 8192^2 on an H100)."""
    env = os.environ.get("QC_TRITON_AUTOTUNE")
    return AUTOTUNE_DEFAULT if env is None else env != "0"


def _first_config(kernel_name: str, path: str) -> dict:
    kernel_name = "wq" if kernel_name == "mixed" else kernel_name  # the mixed kernel shares the wq configurations
    src = {("wq", "gemv"): WQ_GEMV_CONFIGS, ("wq", "decode"): WQ_DECODE_CONFIGS,
           ("wq", "prefill"): WQ_PREFILL_CONFIGS, ("w8a8", "decode"): W8_DECODE_CONFIGS,
           ("w8a8", "prefill"): W8_PREFILL_CONFIGS}[(kernel_name, path)][0]
    return {**src.kwargs, "num_warps": src.num_warps, "num_stages": src.num_stages}


def codes_per_word(bits: int) -> int:
    if bits not in _CODES_PER_WORD:
        raise ValueError(f"unsupported code width {bits}; expected one of {sorted(_CODES_PER_WORD)}")
    return _CODES_PER_WORD[bits]


# ================================================================================================
# device helpers


@triton.jit
def _act(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:  # exact GELU (erf)
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 3:  # tanh GELU: 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACT == 4:  # SiLU
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _splitk_reduce(acc, pid_mn, pid_k, ws_ptr, cnt_ptr, SPLIT_K: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr):
    """Serial split-K in one launch: returns (sum of all partials, [BM, BN] mask true iff this program
    arrived last for its tile and so owns the epilogue)."""
    tile = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    base = ws_ptr + pid_mn * (SPLIT_K * BM * BN)
    tl.store(base + pid_k * (BM * BN) + tile, acc)
    tl.debug_barrier()  # every thread's partial is written before the (single-thread) release
    old = tl.atomic_add(cnt_ptr + pid_mn, 1, sem="acq_rel", scope="gpu")
    last = old == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for s in tl.static_range(SPLIT_K):  # fixed order: deterministic
            total += tl.load(base + s * (BM * BN) + tile, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + pid_mn, 0)  # ready for the next launch
    # broadcast through a full tile (the interpreter rejects a scalar-and-tile boolean mask)
    return total, (old + tl.zeros((BM, BN), dtype=tl.int32)) == SPLIT_K - 1


@triton.jit
def _bit(words, P: tl.constexpr):
    return ((words >> P) & 1) != 0


@triton.jit
def _sel4(b0, b1, t0, t1, t2, t3):
    return tl.where(b1, tl.where(b0, t3, t2), tl.where(b0, t1, t0))


@triton.jit
def _lut_select(words, P: tl.constexpr, BITS: tl.constexpr, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11,
                t12, t13, t14, t15):
    """Table lookup by a select tree over the code's bits (code at bit P of each word)."""
    b0 = _bit(words, P)
    b1 = _bit(words, P + 1)
    w = _sel4(b0, b1, t0, t1, t2, t3)
    if BITS >= 3:
        b2 = _bit(words, P + 2)
        w = tl.where(b2, _sel4(b0, b1, t4, t5, t6, t7), w)
        if BITS == 4:
            b3 = _bit(words, P + 3)
            hi = tl.where(b2, _sel4(b0, b1, t12, t13, t14, t15), _sel4(b0, b1, t8, t9, t10, t11))
            w = tl.where(b3, hi, w)
    return w


@triton.jit
def _lut_entry(lut_ptr, base, n_mask, C: tl.constexpr, NT: tl.constexpr):
    return tl.load(lut_ptr + base + (C % NT), mask=n_mask, other=0.0).to(tl.float32)[None, :]


# ================================================================================================
# weight-only quantized GEMM (uniform / codebook, + sparse outliers, + epilogue)


@triton.jit
def _wq_main(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, pid_m, offs_m, offs_n, m_mask, n_mask, pid_k,
             M, N, K, NUM_KT, NUM_GROUPS, stride_xm,
             BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, LUT_GROUPED: tl.constexpr,
             LUT_IMPL: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr):
    """The dense part: this program's share (1 / SPLIT_K) of the K tiles, fp32 [BM, BN].

    GEMV with uniform codes and groups that tile T evenly scales once per group instead of once per
    weight: with f = 1 + q / 2**b, sum_k x_k (f_k S + B) = S sum_k x_k f_k + B sum_k x_k, so the
    inner loop is one FMA per code (x f into a per-group accumulator) and the group's scale and
    offset are two FMAs per [R, BN] element per group."""
    R: tl.constexpr = 32  # PACK_ROWS
    C: tl.constexpr = 10 if BITS == 3 else 32 // BITS  # codes per int32 word
    T: tl.constexpr = C * R  # K range of one tile of R words
    NT: tl.constexpr = 1 << BITS
    CMASK: tl.constexpr = (NT - 1) << (23 - BITS)  # code placed in the top mantissa bits
    POST_SCALE: tl.constexpr = (MODE == 0) and (not USE_DOT) and (T % GROUP == 0)
    offs_r = tl.arange(0, R)

    tiles_per_split = tl.cdiv(NUM_KT, SPLIT_K)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, NUM_KT)

    if MODE == 1:
        lut_col = offs_n * NT
        if not LUT_GROUPED:
            if LUT_IMPL == 0:  # per-column table: 2**b vectors held in registers for the whole loop
                t0 = _lut_entry(lut_ptr, lut_col, n_mask, 0, NT)
                t1 = _lut_entry(lut_ptr, lut_col, n_mask, 1, NT)
                t2 = _lut_entry(lut_ptr, lut_col, n_mask, 2, NT)
                t3 = _lut_entry(lut_ptr, lut_col, n_mask, 3, NT)
                t4 = _lut_entry(lut_ptr, lut_col, n_mask, 4, NT)
                t5 = _lut_entry(lut_ptr, lut_col, n_mask, 5, NT)
                t6 = _lut_entry(lut_ptr, lut_col, n_mask, 6, NT)
                t7 = _lut_entry(lut_ptr, lut_col, n_mask, 7, NT)
                t8 = _lut_entry(lut_ptr, lut_col, n_mask, 8, NT)
                t9 = _lut_entry(lut_ptr, lut_col, n_mask, 9, NT)
                t10 = _lut_entry(lut_ptr, lut_col, n_mask, 10, NT)
                t11 = _lut_entry(lut_ptr, lut_col, n_mask, 11, NT)
                t12 = _lut_entry(lut_ptr, lut_col, n_mask, 12, NT)
                t13 = _lut_entry(lut_ptr, lut_col, n_mask, 13, NT)
                t14 = _lut_entry(lut_ptr, lut_col, n_mask, 14, NT)
                t15 = _lut_entry(lut_ptr, lut_col, n_mask, 15, NT)

    w_tile = offs_r[:, None] * N + offs_n[None, :]
    if USE_DOT:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc2 = tl.zeros((R, BN), dtype=tl.float32)
        # GEMV: software-prefetch the next tile of words by hand (one tile in flight during the math)
        # (masks are built as full tensors: the interpreter rejects scalar & tensor masks)
        words_next = tl.load(w_ptr + t_start * (R * N) + w_tile,
                             mask=n_mask[None, :] & ((offs_r * 0 + t_start) < t_end)[:, None], other=0)

    for t in range(t_start, t_end):
        if USE_DOT:
            words = tl.load(w_ptr + t * (R * N) + w_tile, mask=n_mask[None, :], other=0)
        else:
            words = words_next
            words_next = tl.load(w_ptr + (t + 1) * (R * N) + w_tile,
                                 mask=n_mask[None, :] & ((offs_r * 0 + (t + 1)) < t_end)[:, None], other=0)
        for i in tl.static_range(C):
            k0 = t * T + i * R
            grp = tl.minimum(k0 // GROUP, NUM_GROUPS - 1)
            # ---- dequantise the [R, BN] chunk holding rows k0 .. k0 + R of W
            if MODE == 0:
                # scale/zero of this chunk's group; when groups tile T evenly, only at a group's first chunk
                if (T % GROUP != 0) or ((i * R) % GROUP == 0):
                    s = tl.load(s_ptr + grp * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + grp * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    s_hi = s * NT
                    off = -(s_hi + z * s)
                    if POST_SCALE:
                        acc_g = tl.zeros((R, BN), dtype=tl.float32)
                        xs = tl.zeros((R,), dtype=tl.float32)
                if (23 - BITS) - BITS * i >= 0:  # compile-time: move code i to bits 23-b .. 22
                    bits = words << ((23 - BITS) - BITS * i)
                else:
                    bits = words >> (BITS * i - (23 - BITS))
                f = ((bits & CMASK) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 2**b
                if not POST_SCALE:
                    w = f * s_hi[None, :] + off[None, :]  # (q - z) s in one FMA
            else:
                if LUT_IMPL == 0:
                    if LUT_GROUPED:
                        gcol = lut_col + grp * N * NT
                        w = _lut_select(
                            words, BITS * i, BITS,
                            _lut_entry(lut_ptr, gcol, n_mask, 0, NT), _lut_entry(lut_ptr, gcol, n_mask, 1, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 2, NT), _lut_entry(lut_ptr, gcol, n_mask, 3, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 4, NT), _lut_entry(lut_ptr, gcol, n_mask, 5, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 6, NT), _lut_entry(lut_ptr, gcol, n_mask, 7, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 8, NT), _lut_entry(lut_ptr, gcol, n_mask, 9, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 10, NT), _lut_entry(lut_ptr, gcol, n_mask, 11, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 12, NT), _lut_entry(lut_ptr, gcol, n_mask, 13, NT),
                            _lut_entry(lut_ptr, gcol, n_mask, 14, NT), _lut_entry(lut_ptr, gcol, n_mask, 15, NT))
                    else:
                        w = _lut_select(words, BITS * i, BITS, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11,
                                        t12, t13, t14, t15)
                else:
                    code = (words >> (BITS * i)) & (NT - 1)
                    if LUT_GROUPED:
                        gcol = lut_col + grp * N * NT
                    else:
                        gcol = lut_col
                    w = tl.load(lut_ptr + gcol[None, :] + code, mask=n_mask[None, :], other=0.0).to(tl.float32)
            # ---- multiply-accumulate
            kk = k0 + offs_r
            if USE_DOT:
                if EVEN_K:
                    xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None], other=0.0)
                else:
                    xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                                 mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
                if DOT_F32:
                    acc = tl.dot(xa.to(tl.float32), w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xa, w.to(xa.dtype), acc)
            else:
                if EVEN_K:
                    xv = tl.load(x_ptr + pid_m * stride_xm + kk).to(tl.float32)
                else:
                    xv = tl.load(x_ptr + pid_m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
                if POST_SCALE:
                    acc_g += xv[:, None] * f
                    xs += xv
                    if ((i + 1) * R) % GROUP == 0:  # last chunk of the group: apply its scale and offset
                        acc2 += acc_g * s_hi[None, :]  # two FMAs per element and group
                        acc2 += xs[:, None] * off[None, :]
                else:
                    acc2 += xv[:, None] * w
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
    return acc


@triton.jit
def _wq_sparse(x_ptr, xt_ptr, sp_colptr, sp_rows, sp_vals, pid_m, offs_m, offs_n, m_mask, n_mask, sp_id,
               M, stride_xm, BM: tl.constexpr, BN: tl.constexpr, SP_SPLITS: tl.constexpr):
    """The CSC outlier correction X S for this tile's columns, share sp_id of SP_SPLITS, fp32 [BM, BN].

    M == 1 (BM == 1): blocks of SP_J nonzeros per column at once (few dependent round trips).
    M > 1: one nonzero per column per step, gathering rows of X^T ([K, M], M contiguous) so that
    the BM values of one nonzero are one coalesced segment."""
    SP_J: tl.constexpr = 16
    c_start = tl.load(sp_colptr + offs_n, mask=n_mask, other=0)
    c_cnt = tl.load(sp_colptr + offs_n + 1, mask=n_mask, other=0) - c_start
    max_cnt = tl.max(c_cnt, axis=0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if BM == 1:
        jb = tl.arange(0, SP_J)
        for b in range(sp_id * SP_J, max_cnt, SP_SPLITS * SP_J):
            jj = b + jb
            valid = (jj[:, None] < c_cnt[None, :]) & n_mask[None, :]
            idx = c_start[None, :] + jj[:, None]
            kr = tl.load(sp_rows + idx, mask=valid, other=0).to(tl.int32)
            v = tl.load(sp_vals + idx, mask=valid, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + pid_m * stride_xm + kr, mask=valid, other=0.0).to(tl.float32)  # pid_m < M
            acc += tl.sum(xs * v, axis=0)[None, :]
    else:
        for j in range(sp_id, max_cnt, SP_SPLITS):
            valid = (j < c_cnt) & n_mask
            kr = tl.load(sp_rows + c_start + j, mask=valid, other=0).to(tl.int32)
            v = tl.load(sp_vals + c_start + j, mask=valid, other=0.0).to(tl.float32)
            xs_t = tl.load(xt_ptr + kr[:, None] * M + offs_m[None, :], mask=valid[:, None] & m_mask[None, :],
                           other=0.0).to(tl.float32)  # [BN, BM]
            acc += tl.trans(xs_t * v[:, None])
    return acc



@triton.jit
def _a16_store(acc, pid_mn, pid_k, ws_ptr, cnt_ptr, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym,
               SPLIT_K: tl.constexpr, SP_SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):
    """A weight-only launch's end: the split-K (and sparse-split) partials reduced by the last
    program of a tile, then bias, activation and the store."""
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K + SP_SPLITS > 1:
        acc, last = _splitk_reduce(acc, pid_mn, pid_k, ws_ptr, cnt_ptr, SPLIT_K + SP_SPLITS, BM, BN)
        out_mask = out_mask & last
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _act(acc, ACT)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

@triton.jit
def qc_gemm_wq_a16_kernel(
    x_ptr, xt_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, bias_ptr, sp_colptr, sp_rows, sp_vals, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, NUM_KT, NUM_GROUPS, stride_xm, stride_ym,
    M_BUCKET,  # autotune key only
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, LUT_GROUPED: tl.constexpr,
    LUT_IMPL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SP_SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Grid (output tiles, SPLIT_K + SP_SPLITS): programs pid_k < SPLIT_K do a share of the dense K loop,
    the SP_SPLITS others (only with sparse outliers) a share of the outlier correction, concurrently;
    the last of them to finish reduces the partials and runs the epilogue."""
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid_mn % num_m  # M fastest: programs sharing a weight tile run together (L2 reuse)
    pid_n = pid_mn // num_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N

    if SP_SPLITS == 0:
        acc = _wq_main(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, pid_m, offs_m, offs_n, m_mask, n_mask, pid_k,
                       M, N, K, NUM_KT, NUM_GROUPS, stride_xm, BITS, GROUP, MODE, LUT_GROUPED, LUT_IMPL, DOT_F32,
                       BM, BN, SPLIT_K, USE_DOT, EVEN_K)
    else:
        if pid_k < SPLIT_K:
            acc = _wq_main(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, pid_m, offs_m, offs_n, m_mask, n_mask, pid_k,
                           M, N, K, NUM_KT, NUM_GROUPS, stride_xm, BITS, GROUP, MODE, LUT_GROUPED, LUT_IMPL,
                           DOT_F32, BM, BN, SPLIT_K, USE_DOT, EVEN_K)
        else:
            acc = _wq_sparse(x_ptr, xt_ptr, sp_colptr, sp_rows, sp_vals, pid_m, offs_m, offs_n, m_mask, n_mask,
                             pid_k - SPLIT_K, M, stride_xm, BM, BN, SP_SPLITS)

    _a16_store(acc, pid_mn, pid_k, ws_ptr, cnt_ptr, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym,
               SPLIT_K, SP_SPLITS, HAS_BIAS, ACT, BM, BN)


# ================================================================================================
# one launch per mixed-precision layer (classes of different widths laid out along K)

MIXED_KINDS = (("uniform", 2), ("uniform", 3), ("uniform", 4), ("uniform", 8), ("codebook", 2), ("codebook", 3),
               ("codebook", 4), ("codebook", 8), ("fp16", 16))
TILE_FIELDS = 4  # per K tile: first X row, end of its class's X rows, metadata base, row within its class


@triton.jit
def _mixed_segment(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, pid_m, offs_m, offs_n, m_mask,
                   n_mask, lo, hi, N, stride_xm, GROUP: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                   DOT_F32: tl.constexpr, USE_DOT: tl.constexpr):
    """Accumulate K tiles lo .. hi (all of one kind: KIND 0 uniform, 1 codebook, 2 fp16 rows; BITS wide)
    into acc ([BM, BN] with USE_DOT, else the GEMV's [32, BN]).  A tile is 32 words (or 32 fp16 rows)
    of its class; the tile table gives, per tile: the first row of X it multiplies, the end of its
    class's rows in X (rows past it are padding and read X as 0), the base of its metadata (uniform:
    the class's first scale/zero row; codebook: the class's table offset; fp16: the tile's first row
    in the fp16 block) and its first row within its class (uniform: picks the scale group)."""
    R: tl.constexpr = 32  # PACK_ROWS
    C: tl.constexpr = 1 if KIND == 2 else (10 if BITS == 3 else 32 // BITS)
    NT: tl.constexpr = 1 << (BITS if KIND != 2 else 1)
    CMASK: tl.constexpr = (NT - 1) << (23 - BITS) if KIND == 0 else 0
    offs_r = tl.arange(0, R)
    w_tile = offs_r[:, None] * N + offs_n[None, :]
    for t in range(lo, hi):
        x0 = tl.load(tab_ptr + t * 4)
        x_end = tl.load(tab_ptr + t * 4 + 1)
        base = tl.load(tab_ptr + t * 4 + 2)
        row0 = tl.load(tab_ptr + t * 4 + 3)
        if KIND != 2:
            words = tl.load(w_ptr + t * (R * N) + w_tile, mask=n_mask[None, :], other=0)
        for i in tl.static_range(C):
            if KIND == 0:
                # a chunk past its class's end (padding) reads no group: its weights are 0
                grp = base + (row0 + i * R) // GROUP
                g_mask = n_mask & ((offs_n * 0 + x0 + i * R) < x_end)
                s = tl.load(s_ptr + grp * N + offs_n, mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + grp * N + offs_n, mask=g_mask, other=0.0).to(tl.float32)
                s_hi = s * NT
                off = -(s_hi + z * s)
                if (23 - BITS) - BITS * i >= 0:  # compile-time: move code i to bits 23-b .. 22
                    bits = words << ((23 - BITS) - BITS * i)
                else:
                    bits = words >> (BITS * i - (23 - BITS))
                f = ((bits & CMASK) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 2**b
                w = f * s_hi[None, :] + off[None, :]  # (q - z) s in one FMA
            if KIND == 1:
                code = (words >> (BITS * i)) & (NT - 1)
                w = tl.load(lut_ptr + base + offs_n[None, :] * NT + code, mask=n_mask[None, :],
                            other=0.0).to(tl.float32)
            kk = x0 + i * R + offs_r
            k_mask = kk < x_end
            if KIND == 2:
                w = tl.load(d_ptr + (base + offs_r)[:, None] * N + offs_n[None, :],
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            if USE_DOT:
                xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                             other=0.0)
                if DOT_F32:
                    acc = tl.dot(xa.to(tl.float32), w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xa, w.to(xa.dtype), acc)
            else:
                xv = tl.load(x_ptr + pid_m * stride_xm + kk, mask=k_mask, other=0.0).to(tl.float32)
                acc += xv[:, None] * w
    return acc


@triton.jit
def _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n, m_mask,
                n_mask, t_start, t_end, N, stride_xm, J: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                KINDS: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr, USE_DOT: tl.constexpr):
    """This program's share of the tiles of kind J (MIXED_KINDS[J] == (KIND, BITS)): the tiles are
    sorted by kind, seg[J] .. seg[J + 1] are kind J's; compiled only when bit J of KINDS is set."""
    if (KINDS >> J) & 1:
        lo = tl.maximum(tl.load(seg_ptr + J), t_start)
        hi = tl.minimum(tl.load(seg_ptr + J + 1), t_end)
        acc = _mixed_segment(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, pid_m, offs_m, offs_n, m_mask,
                             n_mask, lo, hi, N, stride_xm, GROUP, KIND, BITS, DOT_F32, USE_DOT)
    return acc


@triton.jit
def _mixed_dense(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n, m_mask, n_mask,
                 pid_k, N, NUM_TILES, stride_xm, KINDS: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr):
    """This program's contiguous share (1 / SPLIT_K) of the layer's K tiles, every kind, fp32 [BM, BN]."""
    per = tl.cdiv(NUM_TILES, SPLIT_K)
    t_start = pid_k * per
    t_end = tl.minimum(t_start + per, NUM_TILES)
    if USE_DOT:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((32, BN), dtype=tl.float32)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 0, 0, 2, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 1, 0, 3, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 2, 0, 4, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 3, 0, 8, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 4, 1, 2, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 5, 1, 3, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 6, 1, 4, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 7, 1, 8, KINDS, GROUP, DOT_F32, USE_DOT)
    acc = _mixed_kind(acc, x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                      m_mask, n_mask, t_start, t_end, N, stride_xm, 8, 2, 16, KINDS, GROUP, DOT_F32, USE_DOT)
    if not USE_DOT:
        acc = tl.sum(acc, axis=0)[None, :]
    return acc


@triton.jit
def qc_gemm_mixed_a16_kernel(
    x_ptr, xt_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, bias_ptr, sp_colptr, sp_rows, sp_vals,
    y_ptr, ws_ptr, cnt_ptr,
    M, N, NUM_TILES, stride_xm, stride_ym,
    M_BUCKET,  # autotune key only
    KINDS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SP_SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Grid (output tiles, SPLIT_K + SP_SPLITS): program pid_k < SPLIT_K takes a contiguous share of the
    layer's K tiles (every class, every width) into one fp32 accumulator; the SP_SPLITS others the
    sparse outliers; the last to finish reduces and runs the epilogue once."""
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid_mn % num_m
    pid_n = pid_mn // num_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N

    if SP_SPLITS == 0:
        acc = _mixed_dense(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n, m_mask,
                           n_mask, pid_k, N, NUM_TILES, stride_xm, KINDS, GROUP, DOT_F32, BM, BN, SPLIT_K, USE_DOT)
    else:
        if pid_k < SPLIT_K:
            acc = _mixed_dense(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, d_ptr, tab_ptr, seg_ptr, pid_m, offs_m, offs_n,
                               m_mask, n_mask, pid_k, N, NUM_TILES, stride_xm, KINDS, GROUP, DOT_F32, BM, BN, SPLIT_K,
                               USE_DOT)
        else:
            acc = _wq_sparse(x_ptr, xt_ptr, sp_colptr, sp_rows, sp_vals, pid_m, offs_m, offs_n, m_mask, n_mask,
                             pid_k - SPLIT_K, M, stride_xm, BM, BN, SP_SPLITS)

    _a16_store(acc, pid_mn, pid_k, ws_ptr, cnt_ptr, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym,
               SPLIT_K, SP_SPLITS, HAS_BIAS, ACT, BM, BN)


# ================================================================================================
# W8A8


@triton.jit
def qc_gemm_w8a8_kernel(
    x_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    M_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid_mn % num_m
    pid_n = pid_mn // num_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    num_kt = tl.cdiv(K, BK)
    per = tl.cdiv(num_kt, SPLIT_K)
    t_start = pid_k * per
    t_end = tl.minimum(t_start + per, num_kt)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for t in range(t_start, t_end):
        kk = t * BK + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                    other=0)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :],
                    other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        acc, last = _splitk_reduce(acc, pid_mn, pid_k, ws_ptr, cnt_ptr, SPLIT_K, BM, BN)
        out_mask = out_mask & last
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _act(y, ACT)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def qc_quantize_per_token_int8_kernel(x_ptr, xq_ptr, sx_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    m = tl.max(amax, axis=0)
    scale = tl.where(m > 0, m / 127.0, 1.0)
    tl.store(sx_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        r = v / scale
        r = (r + 12582912.0) - 12582912.0  # round half to even (1.5 * 2**23 trick, |r| <= 127)
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(xq_ptr + row * stride_qm + k0 + offs, r.to(tl.int8), mask=k0 + offs < K)


# ================================================================================================
# configurations


def m_bucket(m: int) -> int:
    """Autotune key for M: 1, 16 (decode), then powers of two up to 1024."""
    if m <= 1:
        return 1
    if m <= 16:
        return 16
    return min(triton.next_power_of_2(m), 1024)


def _cfg(bm, bn, sk, dot, warps, stages, **extra):
    return triton.Config({"BM": bm, "BN": bn, "SPLIT_K": sk, "USE_DOT": dot, **extra}, num_warps=warps,
                         num_stages=stages)


WQ_GEMV_CONFIGS = [  # M == 1 (timed on an H100 at 8192^2: BN 64 / 32 with split-K 4-8 were the fastest)
    _cfg(1, 64, 4, False, 4, 1), _cfg(1, 64, 8, False, 4, 1), _cfg(1, 32, 8, False, 2, 1),
    _cfg(1, 64, 16, False, 4, 1), _cfg(1, 128, 4, False, 8, 1), _cfg(16, 64, 4, True, 4, 2),
]
WQ_DECODE_CONFIGS = [  # 2 <= M <= 16
    _cfg(16, 64, 4, True, 4, 2), _cfg(16, 64, 8, True, 4, 2), _cfg(16, 32, 4, True, 2, 2),
    _cfg(16, 128, 4, True, 4, 2),
]
WQ_PREFILL_CONFIGS = [
    _cfg(32, 64, 2, True, 4, 2), _cfg(64, 64, 1, True, 4, 3), _cfg(64, 128, 1, True, 4, 2),
    _cfg(128, 128, 1, True, 8, 2),
]
# extra programs per output tile that apply the sparse outlier correction concurrently with the dense loop
SP_SPLITS_GEMV = 4
SP_SPLITS_TILED = 8
# the interpreter: one small configuration per path, split-K on so the reduction path is exercised
WQ_INTERP = {"gemv": dict(BM=1, BN=32, SPLIT_K=2, USE_DOT=False), "decode": dict(BM=16, BN=32, SPLIT_K=2, USE_DOT=True),
             "prefill": dict(BM=32, BN=32, SPLIT_K=1, USE_DOT=True)}

W8_DECODE_CONFIGS = [
    triton.Config({"BM": 16, "BN": bn, "BK": bk, "SPLIT_K": 4}, num_warps=4, num_stages=3)
    for bn, bk in ((64, 128), (64, 256), (128, 256))
]
W8_PREFILL_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st)
    for bm, bn, bk, sk, w, st in (
        (64, 128, 128, 1, 4, 4), (128, 128, 128, 1, 8, 4), (128, 256, 64, 1, 8, 4), (64, 256, 128, 1, 4, 4),
        (64, 64, 128, 2, 4, 4),
    )
]
W8_INTERP = {"decode": dict(BM=16, BN=32, BK=64, SPLIT_K=2), "prefill": dict(BM=32, BN=32, BK=64, SPLIT_K=1)}

_WQ_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP", "MODE", "LUT_GROUPED", "LUT_IMPL", "HAS_BIAS", "ACT", "SP_SPLITS",
           "EVEN_K", "DOT_F32"]
_W8_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "ACT"]
_MIXED_KEY = ["M_BUCKET", "N", "NUM_TILES", "KINDS", "GROUP", "HAS_BIAS", "ACT", "SP_SPLITS", "DOT_F32"]


_FLUSH: dict = {}


def bench_kernel_cold(kernel_call, quantiles=None, n: int = 8, reps: int = 5):
    """Autotuning benchmark: GPU time of one launch with a cold L2 and no CPU launch overhead.

    Eager timing (``triton.testing.do_bench``) of a small kernel measures Python launch overhead
    once the GPU runs dry, and a warm L2 flatters memory-bound kernels whose weights fit in it
    (8192 x 8192 at 4 bits is 34 MB; the H100's L2 is 50 MB).  So: two CUDA graphs, ``n`` times
    (read a 128 MB buffer, launch) and ``n`` times (read the buffer), replayed ``reps`` times; the
    launch costs the difference of the medians over ``n``.  Reading (not writing) the buffer
    leaves clean lines, so the kernel pays for no write-backs.  Falls back to ``do_bench``."""
    import statistics

    kernel_call()
    torch.cuda.synchronize()
    try:
        dev = torch.cuda.current_device()
        flush = _FLUSH.get(dev)
        if flush is None:
            flush = _FLUSH[dev] = torch.empty(32 * 2 ** 20, dtype=torch.int32, device="cuda")
            flush.fill_(1)

        def capture(with_kernel):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(n):
                    flush.max()
                    if with_kernel:
                        kernel_call()
            return g

        graphs = (capture(True), capture(False))
        times = ([], [])
        for _ in range(reps + 1):
            for g, acc in zip(graphs, times):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                g.replay()
                e1.record()
                e1.synchronize()
                acc.append(e0.elapsed_time(e1))
        ms = max((statistics.median(times[0][1:]) - statistics.median(times[1][1:])) / n, 1e-4)
    except Exception:  # noqa: BLE001 - graph capture unavailable: eager timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return [ms, ms, ms] if quantiles is not None else ms


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, path: str):
    kernel = {"wq": qc_gemm_wq_a16_kernel, "w8a8": qc_gemm_w8a8_kernel, "mixed": qc_gemm_mixed_a16_kernel}[kernel_name]
    key = {"wq": _WQ_KEY, "w8a8": _W8_KEY, "mixed": _MIXED_KEY}[kernel_name]
    kernel_name = "wq" if kernel_name == "mixed" else kernel_name
    configs = {
        ("wq", "gemv"): WQ_GEMV_CONFIGS, ("wq", "decode"): WQ_DECODE_CONFIGS, ("wq", "prefill"): WQ_PREFILL_CONFIGS,
        ("w8a8", "decode"): W8_DECODE_CONFIGS, ("w8a8", "prefill"): W8_PREFILL_CONFIGS,
    }[(kernel_name, path)]
    try:
        return triton.autotune(configs=configs, key=key, do_bench=bench_kernel_cold)(kernel)
    except TypeError:  # a triton without custom benchmarkers
        return triton.autotune(configs=configs, key=key)(kernel)


def _configs_for(kernel_name: str, path: str) -> list[dict]:
    kernel_name = "wq" if kernel_name == "mixed" else kernel_name
    if interpreting():
        return [(WQ_INTERP if kernel_name == "wq" else W8_INTERP)[path]]
    src = {("wq", "gemv"): WQ_GEMV_CONFIGS, ("wq", "decode"): WQ_DECODE_CONFIGS,
           ("wq", "prefill"): WQ_PREFILL_CONFIGS, ("w8a8", "decode"): W8_DECODE_CONFIGS,
           ("w8a8", "prefill"): W8_PREFILL_CONFIGS}[(kernel_name, path)]
    return [c.kwargs for c in src]


# ================================================================================================
# workspaces for split-K


@dataclass
class Workspace:
    partials: torch.Tensor  # fp32 (or int32) scratch for split-K partial tiles
    counters: torch.Tensor  # int32 zeros; kernels leave them at zero


_WS: dict = {}


def _workspace(device, dtype, n_partials: int, n_tiles: int) -> Workspace:
    key = (str(device), dtype)
    ws = _WS.get(key)
    if ws is None or ws.partials.numel() < n_partials or ws.counters.numel() < n_tiles:
        n_partials = max(n_partials, ws.partials.numel() if ws else 0)
        n_tiles = max(n_tiles, ws.counters.numel() if ws else 0)
        ws = Workspace(torch.empty(max(n_partials, 1), dtype=dtype, device=device),
                       torch.zeros(max(n_tiles, 1), dtype=torch.int32, device=device))
        _WS[key] = ws
    return ws


def _ws_need(configs: list[dict], m: int, n: int, extra_splits: int = 0) -> tuple[int, int]:
    parts, tiles = 0, 0
    for c in configs:
        nt = triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"])
        tiles = max(tiles, nt)
        splits = c["SPLIT_K"] + extra_splits
        if splits > 1:
            parts = max(parts, nt * splits * c["BM"] * c["BN"])
    return parts, tiles


def _path(m: int, gemv: bool = True) -> str:
    if m == 1 and gemv:
        return "gemv"
    return "decode" if m <= 16 else "prefill"


# ================================================================================================
# launch wrappers


@dataclass
class _A16Launch:
    """What a weight-only (16-bit activation) launch needs besides its kernel's own arguments: the
    output, the sparse-outlier operands, the split count they add, X^T for them, the configurations
    and the workspace."""

    kernel_name: str
    m: int
    n: int
    y: torch.Tensor
    sparse: tuple
    sp_splits: int
    xt: torch.Tensor
    dot_f32: bool
    path: str
    configs: list[dict]
    fixed: bool
    workspace: Workspace

    def launch(self, kernel, args: tuple, consts: dict) -> None:
        def grid(meta):
            return (triton.cdiv(self.m, meta["BM"]) * triton.cdiv(self.n, meta["BN"]), meta["SPLIT_K"] + self.sp_splits)

        if self.fixed:
            cfg = dict(self.configs[0])
            kernel[grid(cfg)](*args, **consts, **cfg)
        else:
            _tuned(self.kernel_name, self.path)[grid](*args, **consts)


def _a16_launch(kernel_name: str, x2: torch.Tensor, n: int, dummy: torch.Tensor, sparse, config: dict | None,
                workspace: Workspace | None) -> _A16Launch:
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    dot_f32 = (interpreting() and x2.dtype == torch.bfloat16) or x2.dtype == torch.float32
    path = _path(m, gemv=True)
    sp_splits = 0 if sparse is None else (SP_SPLITS_GEMV if m == 1 else SP_SPLITS_TILED)
    # outliers with M > 1 gather rows of X^T (one extra copy of X, M*K elements)
    xt = x2.t().contiguous() if sparse is not None and m > 1 else x2
    if config is None and not interpreting() and not autotuning():
        config = _first_config(kernel_name, path)
    configs = [config] if config is not None else _configs_for(kernel_name, path)
    if workspace is None:
        parts, tiles = _ws_need(configs, m, n, sp_splits)
        workspace = _workspace(x2.device, torch.float32, parts, tiles)
    return _A16Launch(kernel_name, m, n, y, sparse if sparse is not None else (dummy, dummy, dummy), sp_splits, xt,
                      dot_f32, path, configs, config is not None or interpreting(), workspace)


def qc_gemm_wq_a16(x: torch.Tensor, packed: torch.Tensor, *, bits: int, k: int, group: int | None = None,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                   lut: torch.Tensor | None = None, lut_group: int | None = None, lut_impl: int | None = None,
                   bias: torch.Tensor | None = None, act: str = "none",
                   sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   config: dict | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """``act(X deq(W) (+ X S) + bias)`` for X ``[..., K]``; uniform when ``scale`` is given, codebook
    when ``lut`` is.  ``sparse = (col_ptr, row_idx, values)`` (CSC, see reference).  ``config`` forces
    one configuration (dict with BM, BN, SPLIT_K, USE_DOT and optionally num_warps / num_stages)."""
    if act not in ACT_IDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACT_IDS)}")
    c = codes_per_word(bits)
    if x.shape[-1] != k:
        raise ValueError(f"X has K={x.shape[-1]}, weights were packed for K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kw, n = packed.shape
    tile = c * PACK_ROWS
    if kw != -(-k // tile) * PACK_ROWS:
        raise ValueError(f"X has K={k}, but the packed {bits}-bit weights {tuple(packed.shape)} hold "
                         f"K in ({kw // PACK_ROWS * tile - tile}, {kw // PACK_ROWS * tile}]")
    if scale is not None and group is not None and tuple(scale.shape) != (-(-k // group), n):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {(-(-k // group), n)} for K={k}, group {group}")
    num_kt = kw // PACK_ROWS
    if lut is None:
        if scale is None or zero is None or group is None:
            raise ValueError("uniform weights need scale, zero and group")
        mode, lut_grouped, impl, grp_size, n_groups = 0, False, 0, group, scale.shape[0]
        lut_arg = scale  # unused pointer
    else:
        mode = 1
        lut_grouped = lut_group is not None
        grp_size = lut_group if lut_grouped else PACK_ROWS
        n_groups = lut.shape[0]
        impl = (0 if bits <= 4 else 1) if lut_impl is None else lut_impl
        if impl == 0 and bits > 4:
            raise ValueError("the select-tree lookup handles at most 4-bit codes; use lut_impl=1")
        lut_arg = lut
    if m == 0:
        return x.new_empty((*lead, n))
    dummy = packed
    run = _a16_launch("wq", x2, n, dummy, sparse, config, workspace)
    y, sp, sp_splits, workspace = run.y, run.sparse, run.sp_splits, run.workspace
    args = (x2, run.xt, packed, scale if scale is not None else dummy, zero if zero is not None else dummy, lut_arg,
            bias if bias is not None else dummy, sp[0], sp[1], sp[2], y, workspace.partials, workspace.counters,
            m, n, k, num_kt, n_groups, x2.stride(0), y.stride(0), m_bucket(m))
    consts = dict(BITS=bits, GROUP=grp_size, MODE=mode, LUT_GROUPED=lut_grouped, LUT_IMPL=impl,
                  HAS_BIAS=bias is not None, ACT=ACT_IDS[act], SP_SPLITS=sp_splits, DOT_F32=run.dot_f32,
                  EVEN_K=k % tile == 0)
    run.launch(qc_gemm_wq_a16_kernel, args, consts)
    return y.reshape(*lead, n)


def mixed_kinds_mask(kinds) -> int:
    """The KINDS constexpr of the mixed kernel: bit j set when (kind, width) MIXED_KINDS[j] is present."""
    mask = 0
    for kind in kinds:
        if tuple(kind) not in MIXED_KINDS:
            raise ValueError(f"no mixed-kernel tiles of kind {tuple(kind)}; expected one of {MIXED_KINDS}")
        mask |= 1 << MIXED_KINDS.index(tuple(kind))
    return mask


def qc_gemm_mixed_a16(x: torch.Tensor, words: torch.Tensor, tiles: torch.Tensor, seg: torch.Tensor, *, kinds: int,
                      group: int, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                      lut: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, act: str = "none",
                      sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      config: dict | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """``act(X W (+ X S) + bias)`` of a mixed-precision layer in one launch, X ``[..., K]`` in the
    layer's stored channel order.  ``words`` int32 ``[T' * 32, N]`` (packed tile t is rows 32t .. 32t + 31;
    the fp16 tiles, sorted last, have no words),
    ``tiles`` int32 ``[T, 4]`` and ``seg`` int32 ``[len(MIXED_KINDS) + 1]`` as made by
    ``reference.pack_mixed``; ``kinds`` its ``kinds_mask``; ``scale``/``zero`` fp16 ``[G, N]`` (uniform
    tiles), ``lut`` flat fp16 tables (codebook tiles), ``dense`` float ``[D, N]`` (fp16 tiles)."""
    if act not in ACT_IDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACT_IDS)}")
    if not 0 < kinds < 1 << len(MIXED_KINDS):
        raise ValueError(f"kinds mask {kinds} names no mixed-kernel kind")
    n_tiles = tiles.shape[0]
    if tuple(tiles.shape) != (n_tiles, TILE_FIELDS) or words.shape[0] % PACK_ROWS \
            or words.shape[0] > n_tiles * PACK_ROWS or seg.numel() != len(MIXED_KINDS) + 1:
        raise ValueError(f"mixed layout disagrees: words {tuple(words.shape)}, tiles {tuple(tiles.shape)}, "
                         f"seg {tuple(seg.shape)}; pack it with reference.pack_mixed")
    for j, (kind, _) in enumerate(MIXED_KINDS):
        need = {"uniform": (scale, zero), "codebook": (lut,), "fp16": (dense,)}[kind]
        if (kinds >> j) & 1 and any(a is None for a in need):
            raise ValueError(f"{kind} tiles need " + {"uniform": "scale and zero", "codebook": "lut",
                                                      "fp16": "dense"}[kind])
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], words.shape[1]
    if m == 0:
        return x.new_empty((*lead, n))
    dummy = tiles
    run = _a16_launch("mixed", x2, n, dummy, sparse, config, workspace)
    y, sp, sp_splits, workspace = run.y, run.sparse, run.sp_splits, run.workspace
    args = (x2, run.xt, words, scale if scale is not None else dummy, zero if zero is not None else dummy,
            lut if lut is not None else dummy, dense if dense is not None else dummy, tiles, seg,
            bias if bias is not None else dummy, sp[0], sp[1], sp[2], y, workspace.partials, workspace.counters,
            m, n, n_tiles, x2.stride(0), y.stride(0), m_bucket(m))
    consts = dict(KINDS=kinds, GROUP=group, HAS_BIAS=bias is not None, ACT=ACT_IDS[act], SP_SPLITS=sp_splits,
                  DOT_F32=run.dot_f32)
    run.launch(qc_gemm_mixed_a16_kernel, args, consts)
    return y.reshape(*lead, n)


def qc_gemm_w8a8(xq: torch.Tensor, sx: torch.Tensor, wq_t: torch.Tensor, sw: torch.Tensor, *,
                 bias: torch.Tensor | None = None, act: str = "none", out_dtype: torch.dtype = torch.float16,
                 config: dict | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """``act((Xq Wq^T) * sx * sw + bias)``: Xq int8 ``[M, K]``, sx ``[M]``, Wq^T int8 ``[N, K]``, sw ``[N]``."""
    if act not in ACT_IDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACT_IDS)}")
    if xq.dtype != torch.int8 or wq_t.dtype != torch.int8:
        raise TypeError("qc_gemm_w8a8 takes int8 activations and int8 weights")
    m, k = xq.shape
    n, k2 = wq_t.shape
    if k != k2:
        raise ValueError(f"X has K={k}, W^T has K={k2}")
    if xq.stride(-1) != 1:
        xq = xq.contiguous()
    if wq_t.stride(-1) != 1:
        wq_t = wq_t.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    path = "decode" if m <= 16 else "prefill"
    if config is None and not interpreting() and not autotuning():
        config = _first_config("w8a8", path)
    configs = [config] if config is not None else _configs_for("w8a8", path)
    if workspace is None:
        parts, tiles = _ws_need(configs, m, n)
        workspace = _workspace(xq.device, torch.int32, parts, tiles)
    args = (xq, sx, wq_t, sw, bias if bias is not None else sw, y, workspace.partials, workspace.counters,
            m, n, k, xq.stride(0), wq_t.stride(0), y.stride(0), m_bucket(m))
    consts = dict(HAS_BIAS=bias is not None, ACT=ACT_IDS[act])

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), meta["SPLIT_K"])

    if config is not None or interpreting():
        cfg = dict(configs[0])
        qc_gemm_w8a8_kernel[grid(cfg)](*args, **consts, **cfg)
    else:
        _tuned("w8a8", path)[grid](*args, **consts)
    return y


def qc_quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (``sx = max|x_row| / 127``, round half to even): ``(xq, sx)``."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        qc_quantize_per_token_int8_kernel[(m,)](x2, xq, sx, k, x2.stride(0), xq.stride(0), BLOCK_K=block,
                                                num_warps=4 if block <= 2048 else 8)
    return xq, sx


# ================================================================================================
# named entry points, one per specialisation the emitter uses


def _named_uniform(bits: int, group: int):
    def fn(x, packed, scale, zero, *, bias=None, act="none", sparse=None, config=None):
        k = x.shape[-1]
        return qc_gemm_wq_a16(x, packed, bits=bits, k=k, group=group, scale=scale, zero=zero, bias=bias, act=act,
                              sparse=sparse, config=config)

    fn.__name__ = fn.__qualname__ = f"qc_gemm_w{bits}a16_g{group}"
    fn.__doc__ = (f"Y = act(X ((q - z) s) (+ X S) + bias): {bits}-bit codes, groups of {group} rows, "
                  "fp16 scale and zero per (group, column).")
    return fn


def _named_codebook(bits: int, group: int | None):
    def fn(x, packed, lut, *, bias=None, act="none", sparse=None, lut_impl=None, config=None):
        k = x.shape[-1]
        return qc_gemm_wq_a16(x, packed, bits=bits, k=k, lut=lut, lut_group=group, lut_impl=lut_impl, bias=bias,
                              act=act, sparse=sparse, config=config)

    suffix = "" if group is None else f"_g{group}"
    fn.__name__ = fn.__qualname__ = f"qc_gemm_lut{bits}a16{suffix}"
    fn.__doc__ = (f"Y = act(X lut[q] (+ X S) + bias): {bits}-bit codes into fp16 tables, one per "
                  + ("column." if group is None else f"(group of {group} rows, column)."))
    return fn


__all__ = ["qc_gemm_wq_a16", "qc_gemm_mixed_a16", "qc_gemm_mixed_a16_kernel", "mixed_kinds_mask", "MIXED_KINDS",
           "qc_gemm_w8a8", "qc_quantize_per_token_int8", "qc_gemm_wq_a16_kernel",
           "qc_gemm_w8a8_kernel", "qc_quantize_per_token_int8_kernel", "m_bucket", "codes_per_word", "ACT_IDS"]
for _b in (2, 3, 4, 8):
    _f = _named_codebook(_b, None)
    globals()[_f.__name__] = _f
    __all__.append(_f.__name__)
    for _g in (32, 64, 128):
        for _f in (_named_uniform(_b, _g), _named_codebook(_b, _g)):
            globals()[_f.__name__] = _f
            __all__.append(_f.__name__)
del _b, _g, _f
