"""Every Triton kernel family against its NumPy reference (CPU, TRITON_INTERPRET=1, small shapes).

Tolerances (normwise relative error ||y - ref|| / ||ref||, reference in float64):
  fp32 activations: 1e-5 (fp32 accumulation; observed ~1e-7),
  fp16: 3e-3 (the dequantised tile is rounded to fp16 for tl.dot, output rounded to fp16),
  bf16: 2e-2 (the same with 8 mantissa bits), W8A8 (exact int32 products, fp16 output): 2e-3.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qcompiler.codegen.triton import kernels as qk  # noqa: E402
from qcompiler.codegen.triton import reference as ref  # noqa: E402

K = 256
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # sigmoid(-big)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(y: torch.Tensor, r: np.ndarray) -> float:
    y = y.float().numpy().astype(np.float64)
    assert np.isfinite(y).all()
    return float(np.linalg.norm(y - r) / np.linalg.norm(r))


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _sparse_t(sp):
    return (_t(sp.col_ptr), _t(sp.row_idx), _t(sp.values))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", ref.BITS)
@pytest.mark.parametrize("k", [32, 200, 640])
def test_pack_round_trip(bits, k, rng):
    q = rng.integers(0, 1 << bits, size=(k, 24))
    packed = ref.pack_codes(q, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (ref.padded_k(k, bits) // ref.codes_per_word(bits), 24)
    np.testing.assert_array_equal(ref.unpack_codes(packed, bits, k), q)


def test_pack_layout_is_k_strided():
    # code i of word (t, r) is row t*T + i*32 + r: for 4 bits, word 0 holds rows 0, 32, 64, ... 224
    q = np.zeros((256, 1), np.int64)
    q[[0, 32, 224], 0] = [1, 2, 15]
    w = ref.pack_codes(q, 4).view(np.uint32)
    assert w[0, 0] == 1 | (2 << 4) | (15 << 28)
    assert not w[1:].any()


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        ref.pack_codes(np.full((32, 2), 8), 3)


def test_quantizers_round_trip(rng):
    w = rng.standard_normal((K, 16)).astype(np.float32)
    u = ref.quantize_uniform(w, 8, 32)
    assert np.abs(u.dequantize() - w).max() <= u.scale.astype(np.float32).max() * 0.51
    c = ref.quantize_codebook(w, 4)
    d = c.dequantize()
    assert np.isin(d[:, 3], c.lut[0, 3].astype(np.float32)).all()
    sp = ref.extract_outliers(w, d, 0.05)
    assert sp.nnz == round(0.05 * w.size)
    before = np.abs(d - w)
    after = np.abs(d + sp.to_dense() - w)
    assert after.max() <= np.sort(before.ravel())[-sp.nnz - 1] + 1e-3


# ----------------------------------------------------------------------- uniform (w{b}a16_g{g})


def _uniform_case(rng, bits, group, m, n=96, dtype=torch.float32, **kw):
    w = rng.standard_normal((K, n)).astype(np.float32)
    u = ref.quantize_uniform(w, bits, group)
    x = rng.standard_normal((m, K)).astype(np.float32)
    xt = _t(x).to(dtype)
    fn = getattr(qk, f"qc_gemm_w{bits}a16_g{group}")
    y = fn(xt, _t(u.packed), _t(u.scale), _t(u.zero), **kw)
    assert y.shape == (m, n) and y.dtype == dtype
    return y, xt.float().numpy(), u


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("bits", ref.BITS)
def test_uniform_bits(bits, m, rng):
    y, x, u = _uniform_case(rng, bits, 128, m)
    assert _rel(y, ref.ref_gemm_uniform(x, u)) < TOL[torch.float32]


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits,m", [(3, 1), (4, 5), (2, 1), (8, 33)])
def test_uniform_groups(bits, group, m, rng):
    y, x, u = _uniform_case(rng, bits, group, m, n=72)  # N not a multiple of the column tile
    assert _rel(y, ref.ref_gemm_uniform(x, u)) < TOL[torch.float32]


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("m", [1, 33])
def test_uniform_epilogue(act, m, rng):
    bias = rng.standard_normal(96).astype(np.float32)
    y, x, u = _uniform_case(rng, 4, 128, m, bias=_t(bias), act=act)
    assert _rel(y, ref.ref_gemm_uniform(x, u, bias=bias, act=act)) < TOL[torch.float32]


def test_gelu_variants_differ(rng):
    # the two GELUs are distinct functions; each kernel matches its own reference (above)
    y = np.linspace(-3, 3, 7)
    assert np.abs(ref.apply_act(y, "gelu") - ref.apply_act(y, "gelu_tanh")).max() > 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_uniform_half_precision(dtype, m, rng):
    y, x, u = _uniform_case(rng, 4, 128, m, dtype=dtype, act="silu")
    assert _rel(y, ref.ref_gemm_uniform(x, u, act="silu")) < TOL[dtype]


@pytest.mark.parametrize("config", [
    dict(BM=1, BN=64, SPLIT_K=1, USE_DOT=False),  # GEMV, no split
    dict(BM=1, BN=32, SPLIT_K=3, USE_DOT=False),  # uneven split of 4 K tiles over 3 programs
    dict(BM=16, BN=64, SPLIT_K=4, USE_DOT=True),  # tensor-core decode tile at M = 1
    dict(BM=16, BN=32, SPLIT_K=8, USE_DOT=True),  # more splits than K tiles: empty programs
])
def test_uniform_configs(config, rng):
    y, x, u = _uniform_case(rng, 8, 64, 1, config=config, act="relu")
    assert _rel(y, ref.ref_gemm_uniform(x, u, act="relu")) < TOL[torch.float32]


def test_split_k_counters_reset(rng):
    _uniform_case(rng, 4, 128, 5)
    _uniform_case(rng, 4, 128, 1)
    for ws in qk._WS.values():
        assert int(ws.counters.abs().sum()) == 0


def test_leading_dims_and_errors(rng):
    w = rng.standard_normal((K, 64)).astype(np.float32)
    u = ref.quantize_uniform(w, 4, 64)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    y = qk.qc_gemm_w4a16_g64(_t(x), _t(u.packed), _t(u.scale), _t(u.zero))
    assert y.shape == (2, 3, 64)
    assert _rel(y.reshape(6, 64), ref.ref_gemm_uniform(x.reshape(6, K), u)) < 1e-5
    with pytest.raises(ValueError, match="K=128"):
        qk.qc_gemm_w4a16_g64(_t(x[..., :128]), _t(u.packed), _t(u.scale), _t(u.zero))
    with pytest.raises(ValueError, match="activation"):
        qk.qc_gemm_w4a16_g64(_t(x), _t(u.packed), _t(u.scale), _t(u.zero), act="tanh")


# ------------------------------------------------------------------------------ codebook (LUT)


@pytest.mark.parametrize("bits,group,impl,m", [
    (2, None, 0, 1), (3, None, 0, 5), (4, None, 0, 33), (3, None, 1, 1), (8, None, 1, 5),
    (3, 64, 0, 1), (4, 128, 0, 5), (2, 32, 1, 33), (8, 128, 1, 1),
])
def test_codebook(bits, group, impl, m, rng):
    n = 80
    w = rng.standard_normal((K, n)).astype(np.float32)
    c = ref.quantize_codebook(w, bits, group=group, iters=3)
    x = rng.standard_normal((m, K)).astype(np.float32)
    name = f"qc_gemm_lut{bits}a16" + ("" if group is None else f"_g{group}")
    y = getattr(qk, name)(_t(x), _t(c.packed), _t(c.lut), lut_impl=impl, act="gelu_tanh")
    assert _rel(y, ref.ref_gemm_codebook(x, c, act="gelu_tanh")) < TOL[torch.float32]


def test_codebook_select_tree_limited_to_4_bits(rng):
    c = ref.quantize_codebook(rng.standard_normal((K, 8)).astype(np.float32), 8, iters=1)
    with pytest.raises(ValueError, match="at most 4-bit"):
        qk.qc_gemm_lut8a16(torch.zeros(1, K), _t(c.packed), _t(c.lut), lut_impl=0)


# ------------------------------------------------------------------------- sparse fp16 outliers


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("family", ["uniform", "codebook"])
def test_sparse_outliers_fused(family, m, rng):
    n = 72
    w = rng.standard_normal((K, n)).astype(np.float32)
    w[rng.integers(0, K, 20), rng.integers(0, n, 20)] *= 8  # a few real outliers
    x = rng.standard_normal((m, K)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    if family == "uniform":
        q = ref.quantize_uniform(w, 3, 64)
        sp = ref.extract_outliers(w, q.dequantize(), 0.01)
        y = qk.qc_gemm_w3a16_g64(_t(x), _t(q.packed), _t(q.scale), _t(q.zero), sparse=_sparse_t(sp), bias=_t(bias))
        r = ref.ref_gemm_uniform(x, q, sparse=sp, bias=bias)
    else:
        q = ref.quantize_codebook(w, 3, iters=3)
        sp = ref.extract_outliers(w, q.dequantize(), 0.01)
        y = qk.qc_gemm_lut3a16(_t(x), _t(q.packed), _t(q.lut), sparse=_sparse_t(sp), bias=_t(bias))
        r = ref.ref_gemm_codebook(x, q, sparse=sp, bias=bias)
    assert sp.row_idx.dtype == np.int16
    assert _rel(y, r) < TOL[torch.float32]
    # the correction matters: without it the result is measurably different
    assert np.linalg.norm(r - (x.astype(np.float64) @ q.dequantize() + bias)) > 1e-3 * np.linalg.norm(r)


# ------------------------------------------------------------------------------------- W8A8


@pytest.mark.parametrize("m,act", [(1, "none"), (5, "relu"), (33, "gelu")])
def test_w8a8(m, act, rng):
    n = 80
    w = rng.standard_normal((K, n)).astype(np.float32)
    x = rng.standard_normal((m, K)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    wq_t, sw = ref.quantize_per_channel_int8(w)
    xq, sx = ref.quantize_per_token_int8(x)
    y = qk.qc_gemm_w8a8(_t(xq), _t(sx), _t(wq_t), _t(sw), bias=_t(bias), act=act)
    assert y.dtype == torch.float16
    assert _rel(y, ref.ref_gemm_w8a8(xq, sx, wq_t, sw, bias=bias, act=act)) < 2e-3


def test_quantize_per_token_int8(rng):
    x = rng.standard_normal((7, 300)).astype(np.float32)
    x[2] *= 50
    x[3, 5] = 0.0
    x[4] = 0.0
    xq, sx = qk.qc_quantize_per_token_int8(_t(x))
    rq, rs = ref.quantize_per_token_int8(x)
    np.testing.assert_allclose(sx.numpy(), rs, rtol=1e-6)
    assert (xq.numpy().astype(int) - rq.astype(int)).__abs__().max() <= 1  # division order may flip a tie
    assert (xq.numpy() == rq).mean() > 0.99


def test_w8a8_pipeline_matches_float(rng):
    # quantize X with the Triton kernel, multiply with the int8 kernel: close to the float product
    w = rng.standard_normal((K, 64)).astype(np.float32)
    x = rng.standard_normal((5, K)).astype(np.float32)
    wq_t, sw = ref.quantize_per_channel_int8(w)
    xq, sx = qk.qc_quantize_per_token_int8(_t(x))
    y = qk.qc_gemm_w8a8(xq, sx, _t(wq_t), _t(sw), out_dtype=torch.float32)
    assert _rel(y, x.astype(np.float64) @ w) < 2e-2


# ------------------------------------------------------------------------------------ accounting


def test_effective_bits():
    assert ref.effective_bits(4096, 4096, bits=4, group=128) == pytest.approx(4.25)
    assert ref.effective_bits(4096, 4096, bits=4, group=128, zero=False) == pytest.approx(4.125)
    # 3 bits: 10 codes per word (3.2 bits) and K padded from 4096 to 4160
    assert ref.effective_bits(4096, 4096, bits=3, lut_groups=1) == pytest.approx(3.2 * 4160 / 4096 + 128 / 4096)


# ------------------------------------------------------------- mixed layers: one launch, every class


def _devices():
    cuda_ok = torch.cuda.is_available() and not qk.interpreting()
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not cuda_ok, reason="needs a CUDA GPU and TRITON_INTERPRET unset")])]


def _mixed_classes(rng, spec, n, group):
    """Classes (kind, bits, rows) laid out one after the other along K, random codes and metadata."""
    classes, row = [], 0
    for kind, bits, rows in spec:
        if kind == "uniform":
            g = -(-rows // group)
            arrays = (rng.integers(0, 1 << bits, (rows, n)), (rng.random((g, n)) * 0.1 + 0.01).astype(np.float16),
                      (rng.random((g, n)) * ((1 << bits) - 1)).astype(np.float16))  # fractional zero points
        elif kind == "codebook":
            arrays = (rng.integers(0, 1 << bits, (rows, n)), rng.standard_normal((n, 1 << bits)).astype(np.float16))
        else:
            arrays = (rng.standard_normal((rows, n)).astype(np.float16) * np.float16(0.1),)
        classes.append(ref.MixedClass(kind, bits, row, row + rows, arrays))
        row += rows
    return classes, row


# On a GPU each test compiles one configuration per path (the benchmark's correctness sweep uses the
# same ones); autotuning would compile all of them for every kinds mask, minutes for this file.
GPU_CONFIGS = {"gemv": dict(BM=1, BN=64, SPLIT_K=4, USE_DOT=False, num_warps=4),
               "decode": dict(BM=16, BN=64, SPLIT_K=2, USE_DOT=True, num_warps=4),
               "prefill": dict(BM=64, BN=64, SPLIT_K=1, USE_DOT=True, num_warps=4)}


def _run_mixed(layout, x, device="cpu", **kw):
    if device == "cuda":
        kw.setdefault("config", GPU_CONFIGS[qk._path(x.shape[0])])

    def t(a):
        return None if a is None else (a if isinstance(a, torch.Tensor) else _t(a)).to(device)

    return qk.qc_gemm_mixed_a16(t(x), t(layout.words), t(layout.tiles), t(layout.seg), kinds=layout.kinds_mask,
                                group=layout.group, scale=t(layout.scale), zero=t(layout.zero), lut=t(layout.lut),
                                dense=None if layout.dense is None else t(layout.dense).float(), **kw).cpu()


MIXES = {  # (kind, bits, rows): class sizes not multiples of any tile, so every class ends in padding
    "w2+w4": [("uniform", 2, 100), ("uniform", 4, 60)],
    "w3+w8": [("uniform", 3, 70), ("uniform", 8, 150)],  # two 8-bit tiles: the second starts at class row 128
    "w2+w3+w4+w8": [("uniform", 4, 50), ("uniform", 2, 40), ("uniform", 8, 30), ("uniform", 3, 40)],
    "w1+w5+w6 (stored 2, 8, 8)": [("uniform", 1, 64), ("uniform", 5, 40), ("uniform", 6, 24)],
    "lut2+lut3+w4": [("codebook", 2, 40), ("uniform", 4, 48), ("codebook", 3, 30)],
    "lut4+lut8+fp16+w3": [("codebook", 4, 36), ("fp16", 16, 40), ("codebook", 8, 30), ("uniform", 3, 50)],
}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_mixed_one_launch(mix, m, device, rng):
    n = 48
    classes, k = _mixed_classes(rng, MIXES[mix], n, 64)
    layout = ref.pack_mixed(classes, 64, n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = _run_mixed(layout, x, device)
    assert y.shape == (m, n)
    assert _rel(y, ref.ref_gemm_mixed(x, classes, 64)) < TOL[torch.float32]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("m,act,group", [(1, "gelu", 32), (5, "silu", 128), (5, "relu", 64), (33, "none", 64)])
def test_mixed_outliers_and_epilogue(m, act, group, device, rng):
    n = 40  # not a multiple of the column tile
    classes, k = _mixed_classes(rng, MIXES["w2+w3+w4+w8"] + [("fp16", 16, 12)], n, group)
    layout = ref.pack_mixed(classes, group, n)
    rows, cols = rng.integers(0, k, 30), rng.integers(0, n, 30)
    dense = np.zeros((k, n), np.float32)
    dense[rows, cols] = rng.standard_normal(30) * 2
    sp = ref.sparse_from_dense(dense)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = _run_mixed(layout, x, device, bias=_t(bias).to(device), act=act,
                   sparse=tuple(a.to(device) for a in _sparse_t(sp)))
    r = ref.ref_gemm_mixed(x, classes, group, bias=bias, act=act, sparse=sp)
    assert _rel(y, r) < TOL[torch.float32]
    # the outliers and the bias are really added
    assert np.linalg.norm(r - ref.ref_gemm_mixed(x, classes, group, act=act)) > 1e-2 * np.linalg.norm(r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_half_precision(dtype, rng):
    classes, k = _mixed_classes(rng, MIXES["w3+w8"], 32, 64)
    layout = ref.pack_mixed(classes, 64, 32)
    x = _t(rng.standard_normal((5, k)).astype(np.float32)).to(dtype)
    y = _run_mixed(layout, x)
    assert y.dtype == dtype
    assert _rel(y, ref.ref_gemm_mixed(x.float().numpy(), classes, 64)) < TOL[dtype]


@pytest.mark.parametrize("config", [
    dict(BM=1, BN=64, SPLIT_K=1, USE_DOT=False),  # GEMV, every tile in one program
    dict(BM=1, BN=32, SPLIT_K=2, USE_DOT=False),  # a split boundary between the two 8-bit tiles
    dict(BM=16, BN=32, SPLIT_K=8, USE_DOT=True),  # more splits than tiles: empty programs
])
def test_mixed_configs(config, rng):
    classes, k = _mixed_classes(rng, MIXES["w3+w8"], 64, 32)
    layout = ref.pack_mixed(classes, 32, 64)
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = _run_mixed(layout, x, config=config, act="relu")
    assert _rel(y, ref.ref_gemm_mixed(x, classes, 32, act="relu")) < TOL[torch.float32]
    for ws in qk._WS.values():
        assert int(ws.counters.abs().sum()) == 0


def test_mixed_layout(rng):
    classes, k = _mixed_classes(rng, MIXES["lut4+lut8+fp16+w3"], 8, 32)
    layout = ref.pack_mixed(classes, 32, 8)
    kinds = [ref.MIXED_KINDS.index(kind) for kind in
             [("uniform", 3), ("codebook", 4), ("codebook", 8), ("fp16", 16)]]
    assert layout.kinds_mask == sum(1 << j for j in kinds)
    assert layout.kinds_mask == qk.mixed_kinds_mask([("uniform", 3), ("codebook", 4), ("codebook", 8), ("fp16", 16)])
    assert ref.MIXED_KINDS == qk.MIXED_KINDS
    # tiles sorted by kind: w3 (50 rows: one 320-row tile), lut4 (one 256-row tile), lut8 (one 128-row
    # tile), fp16 (40 rows: two 32-row tiles); no words for the fp16 tiles
    assert np.diff(layout.seg).tolist() == [0, 1, 0, 0, 0, 0, 1, 1, 2]
    assert layout.words.shape == (3 * 32, 8)
    start = {c.kind + str(c.bits): c.start for c in classes}
    assert layout.tiles[:, 0].tolist() == [start["uniform3"], start["codebook4"], start["codebook8"], start["fp1616"],
                                           start["fp1616"] + 32]
    assert layout.tiles[:, 1].tolist() == [start["uniform3"] + 50, start["codebook4"] + 36, start["codebook8"] + 30,
                                           start["fp1616"] + 40, start["fp1616"] + 40]
    assert layout.dense.shape == (40, 8)  # the fp16 rows as they are (the kernel masks past a class's end)
    assert layout.scale.shape == (2, 8)  # the w3 class's 50 rows: 2 groups of 32, none for its padding


def test_mixed_bad_input(rng):
    classes, k = _mixed_classes(rng, MIXES["w2+w4"], 32, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        ref.pack_mixed(classes, 48, 32)
    layout = ref.pack_mixed(classes, 64, 32)
    x = _t(np.zeros((1, k), np.float32))
    with pytest.raises(ValueError, match="uniform tiles need scale and zero"):
        qk.qc_gemm_mixed_a16(x, _t(layout.words), _t(layout.tiles), _t(layout.seg), kinds=layout.kinds_mask, group=64)
    with pytest.raises(ValueError, match="layout disagrees"):
        qk.qc_gemm_mixed_a16(x, _t(layout.words[:32]), _t(layout.tiles), _t(layout.seg[:4]), kinds=layout.kinds_mask,
                             group=64, scale=_t(layout.scale), zero=_t(layout.zero))
