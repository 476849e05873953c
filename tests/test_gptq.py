"""`gptq`: error-compensating rounding after quantize-weights, against round-to-nearest."""

import numpy as np
import pytest

from qcompiler.analysis import execute
from qcompiler.dialect.mixed_ops import mixed_weight, split_class_inputs
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_text
from qcompiler.passes.gptq import _columns_of, gptq_round, rounding_order, trial_columns
from qcompiler.passes.quantize_weights import kmeans_codebook, uniform_groups
from qcompiler.pipeline.spec import format_pass, parse_pipeline
from test_flexround import _model, _run, _with_op_the_interpreter_lacks

UNIFORM3 = "calibrate,allocate-bits{avg-bits=8 candidates=3 other-widths=expand group-size=32 outliers-act=0 outliers-weight=0},quantize-weights{grid=minmax}"


def _correlated(count=4, rows=64, seed=5, k=64):
    """Inputs whose channels are correlated (as real activations are): where GPTQ's compensation pays."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.6 * rng.normal(0, 1, (k, k)) / np.sqrt(k)
    return [{"X": (rng.normal(0, 1, (rows, k)) @ mix).astype(np.float32)} for _ in range(count)]


def _layer(seed, k, n):
    """Correlated calibration inputs x [512, k], a weight w [k, n] and H = x^T x / rows."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([b["X"] for b in _correlated(count=8, k=k)]).astype(np.float64)
    w = rng.normal(0, 0.2, (k, n))
    return x, w, x.T @ x / len(x)


def _weight(arrays, kinds, bits, sizes):
    """The dequantized weight of a layer's class arrays (groups of 32 rows, no outliers)."""
    return mixed_weight(*split_class_inputs(arrays, kinds, bits, sizes, 0), 32)


def _layer_error(x, w, w_hat):
    return float(np.sum((x @ (w - w_hat)) ** 2))


def test_gptq_round_beats_round_to_nearest_on_the_layer_output():
    x, w, h = _layer(0, 64, 48)
    codes, scale, zero = uniform_groups(w, np.diag(h), 3, 32, "minmax")
    rtn = _weight([codes, scale, zero], ["uniform"], [3], [64])
    arrays = gptq_round(w, h, ["uniform"], [3], [64], 32, [codes, scale, zero], 0, grid="minmax")
    assert [a.dtype for a in arrays] == [codes.dtype, scale.dtype, zero.dtype]
    assert [a.shape for a in arrays] == [codes.shape, scale.shape, zero.shape]
    gptq = _weight(arrays, ["uniform"], [3], [64])
    assert _layer_error(x, w, gptq) < 0.8 * _layer_error(x, w, rtn)


def test_codebook_class_is_refitted_and_beats_nearest_entries():
    x, w, h = _layer(3, 64, 16)
    codes, book = kmeans_codebook(w, np.diag(h), 3)
    rtn = _weight([codes, book], ["codebook"], [3], [64])
    arrays = gptq_round(w, h, ["codebook"], [3], [64], 32, [codes, book], 0)
    assert arrays[1].shape == book.shape and arrays[1].dtype == np.float16
    assert _layer_error(x, w, _weight(arrays, ["codebook"], [3], [64])) < 0.9 * _layer_error(x, w, rtn)


def test_fp16_rows_after_low_bit_rows_absorb_their_error():
    """With the last 16 rows in fp16, their stored values move to cancel the 2-bit rows' error."""
    x, w, h = _layer(1, 48, 24)
    codes, scale, zero = uniform_groups(w[:32], np.diag(h)[:32], 2, 32, "minmax")
    originals = [codes, scale, zero, w[32:].astype(np.float16)]
    kinds, bits, sizes = ["uniform", "fp16"], [2, 16], [32, 16]
    rtn = _weight(originals, kinds, bits, sizes)
    arrays = gptq_round(w, h, kinds, bits, sizes, 32, originals, 0, grid="minmax")
    assert not np.array_equal(arrays[3], originals[3])
    assert _layer_error(x, w, _weight(arrays, kinds, bits, sizes)) < 0.75 * _layer_error(x, w, rtn)


def test_sparse_outliers_keep_their_positions_and_store_the_updated_weight():
    x, w, h = _layer(2, 64, 16)
    codes, scale, zero = uniform_groups(w, np.diag(h), 3, 32, "minmax")
    index = np.array([[0, 3], [40, 7], [63, 0]], np.int32)
    originals = [codes, scale, zero, index, w[index[:, 0], index[:, 1]].astype(np.float16)]
    arrays = gptq_round(w, h, ["uniform"], [3], [64], 32, originals, 1, grid="minmax")
    np.testing.assert_array_equal(arrays[3], index)
    assert arrays[4][0] == np.float16(w[0, 3])  # the first row is rounded before any update reaches it
    assert arrays[4][1] != np.float16(w[40, 7])  # later rows have moved by then


def test_every_fourth_column_rounded_alone_is_the_full_roundings_columns():
    """damp=auto's candidates round only `trial_columns`: each output column's rounding (its
    updates, uniform grids, codebook, fp16 values, outliers) is independent of the others'."""
    x, w, h = _layer(6, 96, 64)
    e = np.diag(h)
    kinds, bits, sizes = ["codebook", "uniform", "fp16"], [3, 4, 16], [32, 48, 16]
    index = np.array([[2, 5], [40, 8], [50, 9], [70, 60]], np.int32)
    originals = [*kmeans_codebook(w[:32], e[:32], 3), *uniform_groups(w[32:80], e[32:80], 4, 16, "mse"),
                 w[80:].astype(np.float16), index, w[index[:, 0], index[:, 1]].astype(np.float16)]
    full = gptq_round(w, h, kinds, bits, sizes, 16, originals, 1)
    cols = trial_columns(64)
    np.testing.assert_array_equal(cols, np.arange(0, 64, 4))
    part = gptq_round(w[:, cols], h, kinds, bits, sizes, 16, _columns_of(originals, kinds, cols, 1), 1)
    np.testing.assert_array_equal(part[-2], [[40, 2], [70, 15]])  # the outliers in those columns, renumbered
    np.testing.assert_array_equal(part[-1], full[-1][[1, 3]])
    np.testing.assert_array_equal(mixed_weight(*split_class_inputs(part, kinds, bits, sizes, 1), 16),
                                  mixed_weight(*split_class_inputs(full, kinds, bits, sizes, 1), 16)[:, cols])


def test_act_order_rounds_each_class_by_decreasing_energy_and_keeps_the_spans():
    energy = np.array([1.0, 5.0, 3.0, 5.0, 0.5, 2.0, 9.0])
    np.testing.assert_array_equal(rounding_order(energy, [4, 3], "act"), [1, 3, 2, 0, 6, 5, 4])
    assert rounding_order(energy, [4, 3], "class") is None


def _uneven(seed, k, n):
    """Like `_layer`, with input channels whose scales span two decades (as a transformer's do)."""
    x, w, _ = _layer(seed, k, n)
    x = x * np.geomspace(0.1, 10.0, k)[np.random.default_rng(seed).permutation(k)]
    return x, w, x.T @ x / len(x)


def test_act_order_lowers_the_layer_error_with_the_same_layout():
    """The most active channels rounded first leave more rows to absorb their error: a lower
    output error than rounding in stored order, in the same classes, groups and arrays."""
    x, w, h = _uneven(4, 96, 32)
    kinds, bits, sizes = ["uniform", "uniform"], [2, 4], [64, 32]
    e = np.diag(h)
    low, high = uniform_groups(w[:64], e[:64], 2, 32, "minmax"), uniform_groups(w[64:], e[64:], 4, 32, "minmax")
    originals = [*low, *high]
    stored = gptq_round(w, h, kinds, bits, sizes, 32, originals, 0, grid="minmax", order="class")
    active = gptq_round(w, h, kinds, bits, sizes, 32, originals, 0, grid="minmax", order="act")
    assert [(a.shape, a.dtype) for a in active] == [(a.shape, a.dtype) for a in originals]
    assert _layer_error(x, w, _weight(active, kinds, bits, sizes)) < 0.9 * _layer_error(x, w, _weight(stored, kinds, bits, sizes))


def test_act_order_keeps_the_sparse_outliers_positions_and_rounds_the_most_active_row_first():
    x, w, h = _uneven(2, 64, 16)
    first, last = int(np.argmax(np.diag(h))), int(np.argmin(np.diag(h)))
    codes, scale, zero = uniform_groups(w, np.diag(h), 3, 32, "minmax")
    index = np.array(sorted([[first, 3], [last, 7]]), np.int32)
    originals = [codes, scale, zero, index, w[index[:, 0], index[:, 1]].astype(np.float16)]
    arrays = gptq_round(w, h, ["uniform"], [3], [64], 32, originals, 1, grid="minmax", order="act")
    np.testing.assert_array_equal(arrays[3], index)
    stored = dict(zip(map(tuple, index.tolist()), arrays[4]))
    assert stored[(first, 3)] == np.float16(w[first, 3])  # rounded first: no update has reached it
    assert stored[(last, 7)] != np.float16(w[last, 7])  # rounded last: every other row's update has


@pytest.mark.parametrize("order", ["class", "act"])
def test_pass_lowers_the_output_error_and_the_lowering_computes_it(order):
    data = _correlated()
    rtn, compensated = _model(), _model()
    _run(rtn, UNIFORM3, data)
    stats = _run(compensated, f"{UNIFORM3},gptq{{regions=1 order={order}}}", data)["gptq"].stats
    assert stats["blocks"] == 2 and stats["layers"] == 4
    assert all(b["kept"] == "learned" and b["loss_after"] < 0.9 * b["loss_before"] for b in stats["per_block"])
    feeds = _correlated(count=1, seed=99)[0]  # not calibration data
    float_y = execute.run(_model(), feeds)["Y"]

    def error(model):
        return float(np.mean((execute.run(model, feeds)["Y"] - float_y) ** 2))

    assert error(compensated) < error(rtn)
    expected = execute.run(compensated, feeds)["Y"]
    _run(compensated, "lower-ort", data)
    np.testing.assert_allclose(execute.run(compensated, feeds)["Y"], expected, rtol=1e-4, atol=1e-4)


def test_auto_damping_is_chosen_on_held_out_batches_and_pays_where_tokens_are_few():
    """48 fitting tokens for inputs of 64 channels: an H that GPTQ with the usual damping fits to the
    calibration data; damp=auto chooses a larger damping for every input, from the held-out batch,
    and the model's error on other data is lower than with the usual 0.01."""
    data = _correlated(count=4, rows=16)
    auto, usual = _model(), _model()
    stats = _run(auto, f"{UNIFORM3},gptq{{regions=1 damp=auto}}", data)["gptq"].stats
    _run(usual, f"{UNIFORM3},gptq{{regions=1}}", data)
    assert sum(stats["damp_chosen"].values()) == 4 and stats["damp_chosen"]["0.01"] == 0  # inputs X, B, D, F
    feeds = _correlated(count=1, rows=512, seed=99)[0]
    float_y = execute.run(_model(), feeds)["Y"]

    def error(model):
        return float(np.mean((execute.run(model, feeds)["Y"] - float_y) ** 2))

    assert error(auto) < error(usual)


@pytest.mark.parametrize("damp", ["0.01", "auto"])
def test_same_data_same_ir(damp):
    a, b = _model(), _model()
    _run(a, f"{UNIFORM3},gptq{{regions=1 damp={damp}}}", _correlated())
    _run(b, f"{UNIFORM3},gptq{{regions=1 damp={damp}}}", _correlated())
    assert to_text(a, elide_over=None) == to_text(b, elide_over=None)


@pytest.mark.parametrize(("limit", "rounded"), [(16384, True), (16383, False)])
def test_max_weights_keeps_round_to_nearest_above_it(limit, rounded, caplog):
    """The four 64 x 64 layers hold 16384 weights: a limit below that leaves the IR as quantize-weights
    wrote it, says why, and warns; at the limit the pass rounds."""
    rtn, limited = _model(), _model()
    _run(rtn, UNIFORM3, _correlated())
    stats = _run(limited, f"{UNIFORM3},gptq{{regions=1 max-weights={limit}}}", _correlated())["gptq"].stats
    same = to_text(rtn, elide_over=None) == to_text(limited, elide_over=None)
    assert same is not rounded
    if not rounded:
        assert stats == {"skipped": "16384 weights in mixed layers, over max-weights=16383"}
        assert "kept round-to-nearest" in caplog.text


def test_mixed_preset_rounds_with_gptq_up_to_its_size_limit():
    names = {"auto": "gptq{damp=auto grid=mse sequential=1 regions=2 order=class max-weights=600000000 unsupported=skip}",
             "gptq": "gptq{damp=auto grid=mse sequential=1 regions=2 order=class max-weights=0 unsupported=error}", "nearest": None}
    for rounding, expected in names.items():
        passes = parse_pipeline(f"mixed{{avg-bits=3 rounding={rounding}}}")
        assert [format_pass(p) for p in passes if p.name == "gptq"] == ([expected] if expected else [])
    assert [p.name for p in parse_pipeline("mixed{avg-bits=3}")] == [p.name for p in parse_pipeline("mixed{avg-bits=3 rounding=auto}")]


@pytest.mark.parametrize(("options", "message"), [("damp=0", "damp must be"), ("damp=2", "damp must be"), ("damp=best", "damp"),
                                                  ("sequential=2", "sequential must be"), ("regions=0", "regions must be"),
                                                  ("order=random", "order"), ("max-weights=-1", "max-weights must be")])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        parse_pipeline(f"{UNIFORM3},gptq{{{options}}}")


@pytest.mark.parametrize("learner", ["gptq{regions=1}", "flexround{steps=20 regions=1 seed=3}", "tune-scales{steps=20 regions=1}"])
def test_float_targets_computed_again_when_read_give_the_same_ir(monkeypatch, learner):
    """A block's float targets over the limit (a model's logits) are recomputed each time they are read:
    the same values, so the same learned weights and losses as when held."""
    from qcompiler.analysis import reconstruct

    reads = []  # per read: was it computed again?
    read = reconstruct.FloatTargets.__getitem__
    monkeypatch.setattr(reconstruct.FloatTargets, "__getitem__", lambda self, b: reads.append(self.held is None) or read(self, b))
    held, recomputed = _model(), _model()
    held_stats = _run(held, f"{UNIFORM3},{learner}", _correlated())
    assert reads and not any(reads)
    reads.clear()
    monkeypatch.setattr(reconstruct, "HELD_TARGET_BYTES", 0)
    recomputed_stats = _run(recomputed, f"{UNIFORM3},{learner}", _correlated())
    assert reads and all(reads)
    assert to_text(held, elide_over=None) == to_text(recomputed, elide_over=None)
    name = learner.split("{")[0]
    assert held_stats[name].stats["per_block"] and all(
        (a["loss_before"], a["loss_after"]) == (b["loss_before"], b["loss_after"])
        for a, b in zip(held_stats[name].stats["per_block"], recomputed_stats[name].stats["per_block"]))


def _pooled_encoder(seq=64, k=64, n=32, seed=0):
    """An encoder's head: token features [batch, seq, k] masked by an attention mask, the first token's
    vector pooled ([batch, k], as wide as the sequence is long) and projected."""
    rng = np.random.default_rng(seed)

    def arr(shape):
        return ",".join(f"{v:.5f}" for v in rng.normal(0, 0.2, shape).ravel())

    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[B, {seq}, {k}] X, int64[B, {seq}] attention_mask) => (float[B, {n}] Y)
    <float[{k},{k}] W1 = {{{arr((k, k))}}}, float[{k},{n}] W2 = {{{arr((k, n))}}}, int64 first = {{0}}, int64[1] last = {{-1}}>
    {{ M = Cast <to: int = 1> (attention_mask)
       U = Unsqueeze (M, last)
       XM = Mul (X, U)
       H = MatMul (XM, W1)
       P = Gather <axis: int = 1> (H, first)
       Y = MatMul (P, W2) }}""")


def test_a_pooled_input_as_wide_as_the_sequence_is_not_read_as_tokens():
    """The pooled [batch, 64] input of the last layer, beside a [batch, 64] attention mask with padding:
    its rows are whole samples, not token positions, so every sample's row enters H (before, the mask
    was applied to it and the batches' H differed in size)."""
    rng = np.random.default_rng(1)
    data = []
    for lengths in ([64, 40, 17, 64], [33, 64, 64, 9]):
        mask = (np.arange(64)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        data.append({"X": rng.normal(0, 1, (4, 64, 64)).astype(np.float32), "attention_mask": mask})
    model = _pooled_encoder()
    stats = _run(model, f"{UNIFORM3},gptq{{regions=1}}", data)["gptq"].stats
    assert stats["layers"] == 2


@pytest.mark.parametrize("unsupported", ["error", "skip"])
def test_a_model_the_block_interpreter_cannot_run_is_refused_or_kept_round_to_nearest(unsupported, caplog):
    """`Hardmax` has no rule: gptq refuses the model by default and names the op; with unsupported=skip
    (the mixed preset's rounding=auto) it keeps the rounding quantize-weights wrote and says why."""
    rtn, model = _with_op_the_interpreter_lacks(), _with_op_the_interpreter_lacks()
    _run(rtn, UNIFORM3, _correlated())
    if unsupported == "error":
        with pytest.raises(UserError, match="cannot run Hardmax"):
            _run(model, f"{UNIFORM3},gptq{{unsupported=error}}", _correlated())
        return
    stats = _run(model, f"{UNIFORM3},gptq{{unsupported=skip}}", _correlated())["gptq"].stats
    assert stats == {"skipped": "the block interpreter cannot run Hardmax"}
    assert "kept round-to-nearest" in caplog.text
    assert to_text(rtn, elide_over=None) == to_text(model, elide_over=None)


def test_3d_patches_times_the_kernel_are_the_conv3d_outputs():
    """gptq's H of a 3D Conv is built on these patches: channel-major then taps, as the kernel's rows;
    pads, strides and dilations as ONNX gives them ([d0, h0, w0, d1, h1, w1])."""
    import torch

    from qcompiler.passes.gptq import _patches

    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 6, 7, 5), torch.randn(4, 3, 3, 2, 3)
    rule = {"kernel": [3, 2, 3], "strides": [2, 1, 1], "dilations": [1, 2, 1], "pads": [1, 0, 1, 1, 1, 0], "group": 1}
    want = torch.nn.functional.conv3d(torch.nn.functional.pad(x, [1, 0, 0, 1, 1, 1]), w, stride=[2, 1, 1], dilation=[1, 2, 1])
    got = _patches(x, rule) @ w.reshape(4, -1).T
    torch.testing.assert_close(got, want.permute(0, 2, 3, 4, 1).reshape(-1, 4), atol=1e-5, rtol=1e-5)
