"""`smooth{alpha=auto}`'s search: its error model is the quantizer `quantize` will apply (the
calibrated range, or per token), on every sample row, whatever their order."""

import dataclasses

import numpy as np

from qcompiler.analysis.calibration import stats_of
from qcompiler.dialect.qc_ops import quantize_activation
from qcompiler.passes.quantize import asymmetric_params, quantize_weight_per_channel
from qcompiler.passes.smooth import SmoothPass, choose_alpha, search_task, smoothed_range, smoothing_scale
from qcompiler.pipeline.spec import parse_pipeline


def _rows(seed=3, k=32, n=16):
    """Typical rows (channel 3 large), a few rare spike rows on channel 7, and a weight."""
    rng = np.random.default_rng(seed)
    typical = (rng.normal(0, 1, (2048, k)) * np.where(np.arange(k) == 3, 10.0, 1.0)).astype(np.float32)
    spikes = np.zeros((8, k), np.float32)
    spikes[:, 7] = 60.0 * rng.choice([-1, 1], 8)
    w = rng.normal(0, 0.2, (k, n)).astype(np.float32)
    return typical, spikes, w


def _static_error(x, w, stats, weight_absmax, alpha):
    """Output MSE of the group as `quantize` will run it: x / s on the calibrated static grid, W s per channel."""
    s = smoothing_scale(stats.absmax, weight_absmax, alpha)
    inverse = (1 / s).astype(np.float32)
    lo = float((stats.channel_min * inverse).min())
    hi = float((stats.channel_max * inverse).max())
    scale, zero_point = asymmetric_params(lo, hi)
    q, w_scale = quantize_weight_per_channel(w * s[:, None], 1)
    y = quantize_activation(x * inverse, "static", scale, zero_point) @ (q * w_scale)
    return float(np.mean((y - x @ w) ** 2))


def test_the_calibrated_range_beats_the_sample_range_on_held_out_rows():
    typical, spikes, w = _rows()
    calibrated = stats_of([typical, spikes])  # every row: the range quantize will use
    stats = dataclasses.replace(calibrated, sample=typical[:256])  # a sample that missed the spikes
    of_sample = stats_of([typical[:256]])
    sample_range = dataclasses.replace(stats, channel_min=of_sample.channel_min, channel_max=of_sample.channel_max)
    weight_absmax = np.abs(w).max(axis=1)
    aware = choose_alpha(stats, [w], weight_absmax)
    blind = choose_alpha(sample_range, [w], weight_absmax)  # what a range taken from the sample rows picks
    assert aware != blind
    held_out = typical[256:]
    assert _static_error(held_out, w, calibrated, weight_absmax, aware) < 0.8 * _static_error(held_out, w, calibrated, weight_absmax, blind)


def test_per_token_search_ignores_the_per_tensor_range_and_static_does_not():
    typical, spikes, w = _rows()
    stats = dataclasses.replace(stats_of([typical, spikes]), sample=typical[:256])
    of_sample = stats_of([typical[:256]])
    narrow = dataclasses.replace(stats, channel_min=of_sample.channel_min, channel_max=of_sample.channel_max)
    weight_absmax = np.abs(w).max(axis=1)
    assert choose_alpha(stats, [w], weight_absmax, "per-token") == choose_alpha(narrow, [w], weight_absmax, "per-token")
    assert choose_alpha(stats, [w], weight_absmax, "static") != choose_alpha(narrow, [w], weight_absmax, "static")


def test_the_search_does_not_depend_on_row_order():
    typical, spikes, w = _rows(seed=5)
    stats = dataclasses.replace(stats_of([typical, spikes]), sample=typical[:512])
    shuffled = dataclasses.replace(stats, sample=typical[:512][np.random.default_rng(0).permutation(512)])
    weight_absmax = np.abs(w).max(axis=1)
    a, b = search_task(stats, [w], weight_absmax), search_task(shuffled, [w], weight_absmax)
    assert a.sample.tobytes() == b.sample.tobytes()  # one canonical order
    assert len(a.sample) == 512  # every sample row, none strided away
    for mode in ("static", "per-token"):
        assert choose_alpha(stats, [w], weight_absmax, mode) == choose_alpha(shuffled, [w], weight_absmax, mode)


def test_smoothed_range_is_the_range_quantize_gives_the_smoothed_tensor():
    typical, spikes, _ = _rows()
    stats = stats_of([typical, spikes])
    inverse = (1 / np.linspace(0.5, 4.0, stats.channels)).astype(np.float32)
    scaled = stats.scaled(inverse)  # what smooth attaches to the smoothed tensor, and quantize's min-max range reads
    assert smoothed_range(stats.channel_min, stats.channel_max, inverse) == (scaled.min, scaled.max)


def test_w8a8_preset_tells_smooth_its_activation_mode():
    for preset, mode in (("w8a8", "static"), ("w8a8{act-mode=per-token}", "per-token"), ("w8a8{act-mode=dynamic}", "dynamic")):
        smooth = next(p for p in parse_pipeline(preset) if isinstance(p, SmoothPass))
        assert smooth.act_mode == mode
