"""calibrate: streaming per-channel statistics, histogram and sample rules, clip ranges, the pass."""

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.printer
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from qcompiler.analysis.calibration import (
    CALIBRATION_KEY,
    STATS_KEY,
    Histogram,
    TensorStats,
    _row_keys,
    collect,
    quantizable_inputs,
    stats_of,
)
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_proto, to_text
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.passbase import model_properties
from qcompiler.pipeline.spec import format_pipeline, parse_pipeline

F = onnx.TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers) -> ir.Model:
    graph = oh.make_graph(nodes, "g", inputs, outputs, [onh.from_array(a, n) for n, a in initializers.items()])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def mlp() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """X [N, T, 8] -> MatMul W1 -> Tanh -> MatMul W2 -> Y; plus a MatMul of two activations."""
    rng = np.random.default_rng(1)
    weights = {
        "W1": rng.standard_normal((8, 6)).astype(np.float32),
        "W2": rng.standard_normal((6, 4)).astype(np.float32),
    }
    nodes = [
        oh.make_node("MatMul", ["X", "W1"], ["H"]),
        oh.make_node("Tanh", ["H"], ["R"]),
        oh.make_node("MatMul", ["R", "W2"], ["Y"]),
        oh.make_node("Transpose", ["X"], ["XT"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["X", "XT"], ["S"]),  # no constant weight: not quantizable
    ]
    model = _model(
        nodes,
        [oh.make_tensor_value_info("X", F, ["N", "T", 8])],
        [oh.make_tensor_value_info("Y", F, ["N", "T", 4]), oh.make_tensor_value_info("S", F, ["N", "T", "T"])],
        weights,
    )
    return model, weights


def convnet() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """image [N, 3, 6, 6] -> Conv -> Relu -> Conv; and a Gemm with constant B reading a flat input."""
    rng = np.random.default_rng(2)
    weights = {
        "K1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "K2": rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
        "B": rng.standard_normal((5, 3)).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["image", "K1"], ["C1"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["C1"], ["A1"]),
        oh.make_node("Conv", ["A1", "K2"], ["out"]),
        oh.make_node("Gemm", ["flat", "B"], ["G"], transA=1),
    ]
    model = _model(
        nodes,
        [oh.make_tensor_value_info("image", F, ["N", 3, 6, 6]), oh.make_tensor_value_info("flat", F, [5, "M"])],
        [oh.make_tensor_value_info("out", F, ["N", 2, 6, 6]), oh.make_tensor_value_info("G", F, ["M", 3])],
        weights,
    )
    return model, weights


def mlp_batches(n: int, batch: int = 4, seq: int = 5, seed: int = 0, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((batch, seq, 8)).astype(np.float32) * scale
        x[..., 3] *= 20  # an outlier channel
        out.append({"X": x})
    return out


# --------------------------------------------------------------------------------------------
# Which tensors


def test_quantizable_inputs_finds_constant_weight_consumers():
    assert quantizable_inputs(mlp()[0]) == {"X": -1, "R": -1}
    assert quantizable_inputs(convnet()[0]) == {"image": 1, "A1": 1, "flat": 0}


def test_quantizable_inputs_skips_integer_and_constant_activations():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (int32[N, 2] I) => (int32[N, 2] Y, float[2, 2] Z)
        <int32[2,2] W = {1, 2, 3, 4}, float[2,2] C = {1, 2, 3, 4}, float[2,2] D = {1, 0, 0, 1}>
        {
          Y = MatMul (I, W)
          Z = MatMul (C, D)
        }
        """
    )
    assert quantizable_inputs(model) == {}


# --------------------------------------------------------------------------------------------
# Statistics against numpy over all the data


def _reference(arrays: list[np.ndarray], axis: int):
    moved = [np.moveaxis(a.astype(np.float64), axis, -1) for a in arrays]
    flat = np.concatenate([m.reshape(-1, m.shape[-1]) for m in moved])
    return flat


def test_stats_match_numpy_over_all_data():
    model, w = mlp()
    batches = mlp_batches(7)
    stats = collect(model, batches, quantizable_inputs(model), sample_rows=16, bins=256)
    xs = [b["X"] for b in batches]
    rs = [np.tanh(x @ w["W1"]) for x in xs]
    for name, arrays in (("X", xs), ("R", rs)):
        ref = _reference(arrays, -1)
        st = stats[name]
        rtol = 1e-12 if name == "X" else 1e-5  # R is recomputed here in numpy, not by ORT
        np.testing.assert_allclose(st.absmax, np.abs(ref).max(0), rtol=rtol)
        np.testing.assert_allclose(st.channel_min, ref.min(0), rtol=rtol)
        np.testing.assert_allclose(st.channel_max, ref.max(0), rtol=rtol)
        np.testing.assert_allclose(st.mean_abs, np.abs(ref).mean(0), rtol=rtol)
        np.testing.assert_allclose(st.mean_sq, (ref**2).mean(0), rtol=rtol)
        assert st.count == ref.shape[0] == 7 * 4 * 5
        assert st.min == pytest.approx(ref.min(), rel=rtol) and st.max == pytest.approx(ref.max(), rel=rtol)
        assert st.histogram.total == ref.size
        assert st.sample.shape == (16, ref.shape[1]) and st.sample.dtype == np.float32
        assert st.absmax.dtype == np.float64 and st.channel_axis == -1
    # Every sampled row is a real row of the data.
    flat = _reference(xs, -1).astype(np.float32)
    for row in stats["X"].sample:
        assert (flat == row).all(axis=1).any()


def test_scaled_stats_are_the_stats_of_the_scaled_data():
    model, _ = mlp()
    batches = mlp_batches(3)
    stats = collect(model, batches, {"X": -1}, sample_rows=16, bins=256)["X"]
    c = np.linspace(0.25, 4.0, batches[0]["X"].shape[-1])
    scaled = collect(model, [{"X": (b["X"] * c).astype(np.float32)} for b in batches], {"X": -1}, sample_rows=16, bins=256)["X"]
    derived = stats.scaled(c)
    for field in ("absmax", "channel_min", "channel_max", "mean_abs", "mean_sq", "sample"):
        np.testing.assert_allclose(getattr(derived, field), getattr(scaled, field), rtol=1e-6, atol=1e-7)
    assert derived.clip_range("minmax") == pytest.approx(scaled.clip_range("minmax"), rel=1e-6)
    with pytest.raises(ValueError, match="needs a histogram"):
        derived.clip_range("percentile")
    with pytest.raises(ValueError, match="positive"):
        stats.scaled(-c)


def test_conv_and_gemm_stats_use_their_channel_axis():
    model, w = convnet()
    rng = np.random.default_rng(3)
    batches = [
        {"image": rng.standard_normal((2, 3, 6, 6)).astype(np.float32), "flat": rng.standard_normal((5, 4)).astype(np.float32)}
        for _ in range(3)
    ]
    stats = collect(model, batches, quantizable_inputs(model), sample_rows=8)
    image = _reference([b["image"] for b in batches], 1)
    np.testing.assert_allclose(stats["image"].absmax, np.abs(image).max(0), rtol=1e-12)
    np.testing.assert_allclose(stats["image"].mean_sq, (image**2).mean(0), rtol=1e-12)
    assert stats["image"].count == 3 * 2 * 6 * 6 and stats["image"].channels == 3
    assert stats["A1"].channels == 4 and stats["A1"].min == 0.0  # after Relu
    flat = _reference([b["flat"] for b in batches], 0)  # Gemm transA=1: channels on axis 0
    np.testing.assert_allclose(stats["flat"].mean_abs, np.abs(flat).mean(0), rtol=1e-12)
    assert stats["flat"].channels == 5


def test_collect_does_not_touch_the_model():
    model, _ = mlp()
    before = to_text(model)
    outputs = [v.name for v in model.graph.outputs]
    collect(model, mlp_batches(2), quantizable_inputs(model))
    assert to_text(model) == before
    assert [v.name for v in model.graph.outputs] == outputs


def test_collect_streams_a_generator_and_reports_progress():
    model, _ = mlp()
    seen = []
    stats = collect(model, (b for b in mlp_batches(3)), {"R": -1}, progress=lambda *a: seen.append(a))
    assert seen == [(1, 4), (2, 8), (3, 12)]
    assert stats["R"].count == 60


# --------------------------------------------------------------------------------------------
# Determinism and memory


def test_two_runs_are_bit_for_bit_identical():
    model, _ = mlp()
    tensors = quantizable_inputs(model)
    a = collect(model, mlp_batches(5), tensors, sample_rows=32)
    b = collect(model, mlp_batches(5), tensors, sample_rows=32)
    assert all(a[name].equals(b[name]) for name in tensors)


def test_sample_and_histogram_do_not_depend_on_batch_size():
    rng = np.random.default_rng(5)
    data = (rng.standard_normal((96, 8)) * np.linspace(0.1, 30, 96)[:, None]).astype(np.float32)
    by_4 = stats_of(np.split(data, 24), sample_rows=20, bins=64)
    by_32 = stats_of(np.split(data, 3), sample_rows=20, bins=64)
    assert np.array_equal(by_4.sample, by_32.sample)
    assert by_4.histogram == by_32.histogram
    # The sample is the rows with the 20 smallest keys, kept in data order.
    positions = [int(np.flatnonzero((data == row).all(axis=1))[0]) for row in by_4.sample]
    assert positions == sorted(np.argsort(_row_keys(0, None, 96)[0])[:20].tolist())


def test_memory_does_not_grow_with_tokens():
    model, _ = mlp()
    tensors = quantizable_inputs(model)
    small = collect(model, mlp_batches(10), tensors, sample_rows=64)
    large = collect(model, mlp_batches(100, seed=1), tensors, sample_rows=64)
    for name in tensors:
        assert large[name].count == 10 * small[name].count
        assert large[name].nbytes == small[name].nbytes


# --------------------------------------------------------------------------------------------
# The histogram


def test_histogram_is_independent_of_order_and_growth():
    rng = np.random.default_rng(6)
    chunks = [rng.standard_normal(1000) * scale for scale in (0.01, 1, 100, 0.5, 1e4)]
    forward, backward, direct = Histogram(64), Histogram(64), Histogram(64)
    for chunk in chunks:
        forward.add(chunk)
    for chunk in reversed(chunks):
        backward.add(chunk)
    direct.add(np.concatenate(chunks))
    assert forward == backward == direct
    assert forward.total == 5000
    absmax = max(np.abs(c).max() for c in chunks)
    assert forward.width * 32 > absmax >= forward.width * 16  # the smallest power-of-two width that fits


def test_histogram_bins_are_exact():
    h = Histogram(8)
    h.add(np.array([0.0, -0.0, 0.5, 1.0, -1.0, 3.9, -3.5]))
    assert h.width == 1.0  # bins cover [-4, 4) in steps of 1
    assert h.counts.tolist() == [1, 0, 0, 1, 3, 1, 0, 1]
    assert h.folded().tolist() == [4, 1, 0, 2]  # |x| bins; -1.0 sits in [-1, 0), so it folds into [0, 1)
    h.add(np.array([4.0]))  # |x| must stay below bins/2 * width: the width doubles
    assert h.width == 2.0 and h.counts.tolist() == [0, 0, 1, 1, 4, 1, 1, 0]


def test_histogram_counts_leading_zeros():
    h = Histogram(8)
    h.add(np.zeros(5))
    assert h.exponent is None and h.total == 5
    h.add(np.array([2.0]))
    assert h.counts[4] == 5 and h.total == 6


# --------------------------------------------------------------------------------------------
# Clipping ranges


@pytest.fixture(scope="module")
def gaussian() -> TensorStats:
    rng = np.random.default_rng(7)
    return stats_of([rng.standard_normal((4096, 16)) for _ in range(8)], sample_rows=0)


@pytest.fixture(scope="module")
def heavy_tailed() -> TensorStats:
    rng = np.random.default_rng(8)
    return stats_of([rng.standard_t(2, size=(25_000, 8))], sample_rows=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_clips_heavy_tails(heavy_tailed, symmetric):
    lo_m, hi_m = heavy_tailed.clip_range("minmax", symmetric=symmetric)
    lo_p, hi_p = heavy_tailed.clip_range("percentile", percentile=99.9, symmetric=symmetric)
    assert lo_m < lo_p < 0 < hi_p < hi_m
    values = np.abs(np.random.default_rng(8).standard_t(2, size=(25_000, 8)))
    if symmetric:  # the histogram's percentile is the data's, to a bin width
        assert hi_p == pytest.approx(np.percentile(values, 99.9), abs=2 * heavy_tailed.histogram.width)


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_and_mse_stay_inside_the_data_range(heavy_tailed, gaussian, method, symmetric):
    for st in (heavy_tailed, gaussian):
        lo, hi = st.clip_range(method, symmetric=symmetric)
        lo_m, hi_m = st.clip_range("minmax", symmetric=symmetric)
        assert lo_m <= lo < 0 < hi <= hi_m
    # At 4 bits, heavy tails get clipped well inside the observed range.
    lo, hi = heavy_tailed.clip_range(method, bits=4, symmetric=symmetric)
    assert hi - lo < 0.25 * (heavy_tailed.max - heavy_tailed.min)


def test_mse_range_on_a_gaussian(gaussian):
    sigma = np.sqrt(gaussian.mean_sq.mean())
    # MSE-optimal clipping of a Gaussian (Banner et al., ACIQ, 2019): about 4 sigma at 8 bits,
    # 2.5 sigma at 4 bits, 1.2 sigma for the ternary grid (2 bits, codes -1, 0, 1).
    t8 = gaussian.clip_range("mse", bits=8, symmetric=True)[1] / sigma
    t4 = gaussian.clip_range("mse", bits=4, symmetric=True)[1] / sigma
    t2 = gaussian.clip_range("mse", bits=2, symmetric=True)[1] / sigma
    assert 3.0 < t8 < 4.5 and 2.2 < t4 < 2.8 and 1.1 < t2 < 1.35
    lo, hi = gaussian.clip_range("mse", bits=8)
    assert 3.0 < -lo / sigma < 4.5 and 3.0 < hi / sigma < 4.5
    t_kl = gaussian.clip_range("entropy", bits=8, symmetric=True)[1] / sigma
    assert 3.0 < t_kl < 5.0


def test_one_sided_data_keeps_its_lower_end():
    rng = np.random.default_rng(9)
    st = stats_of([np.maximum(rng.standard_normal((20_000, 4)), 0.0)], sample_rows=0)
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = st.clip_range(method)
        assert lo == 0.0 and 2.0 < hi <= st.max


def test_all_zero_tensor_has_an_empty_range():
    st = stats_of([np.zeros((10, 3))])
    assert st.clip_range("mse") == (0.0, 0.0) and st.outlier_ratio() is None


def test_clip_range_rejects_bad_arguments(gaussian):
    with pytest.raises(UserError, match="unknown calibration method 'kl'"):
        gaussian.clip_range("kl")
    with pytest.raises(UserError, match="percentile must be in"):
        gaussian.clip_range("percentile", percentile=30)


# --------------------------------------------------------------------------------------------
# The pass


def _graph_text(model: ir.Model) -> str:
    """The graph's text form (the model's metadata, where the manager records properties, left out)."""
    return onnx.printer.to_text(to_proto(model).graph)


def test_pass_attaches_stats_through_a_pipeline():
    model, _ = mlp()
    text = _graph_text(model)
    batches = mlp_batches(4)
    passes = parse_pipeline("calibrate{method=percentile percentile=99.9}")
    assert format_pipeline(passes) == "calibrate{method=percentile percentile=99.9 sample-rows=512 bins=2048}"
    with using(CompileContext(calibration=batches, calibration_source="test.npz")):
        records = run_pipeline(model, passes)
    record = records[0]
    assert record.modified is False  # the graph does not change; see the pass docstring
    assert _graph_text(model) == text
    assert "calibrated" in model_properties(model)
    values = {v.name: v for node in model.graph for v in node.inputs if v is not None}
    for name in ("X", "R"):
        assert isinstance(values[name].meta[STATS_KEY], TensorStats)
    assert model.meta[CALIBRATION_KEY] == {"method": "percentile", "percentile": 99.9, "bins": 2048, "samples": 16, "source": "test.npz"}
    stats = record.stats
    assert stats["tensors"] == 2 and stats["samples"] == 16 and stats["batches"] == 4
    assert stats["top_outliers"][0]["tensor"] == "X"  # channel 3 is 20x the others
    assert stats["top_outliers"][0]["outlier_ratio"] > 10
    json.dumps(stats, allow_nan=False)


def test_second_run_attaches_identical_stats():
    model, _ = mlp()
    with using(CompileContext(calibration=mlp_batches(3))):
        first = CalibratePass()(model)
        x = model.graph.inputs[0].meta[STATS_KEY]
        second = CalibratePass()(model)
    assert not first.modified and not second.modified
    assert first.stats == second.stats
    assert model.graph.inputs[0].meta[STATS_KEY].equals(x)


def test_pass_needs_calibration_data():
    model, _ = mlp()
    with pytest.raises(UserError, match="calibrate needs calibration data; give --calib FILE"):
        run_pipeline(model, [CalibratePass()])


def test_pass_names_bad_calibration_input():
    model, _ = mlp()
    batches = mlp_batches(3)
    batches[1]["X"][2, 0, 0] = np.nan
    with using(CompileContext(calibration=batches)):
        with pytest.raises(UserError, match="calibration input 'X' has NaN at sample 6 \\(batch 1, row 2\\)"):
            run_pipeline(model, [CalibratePass()])


@pytest.mark.parametrize(
    "text, message",
    [
        ("calibrate{percentile=40}", "'percentile' of pass 'calibrate' must be in \\(50, 100\\], got 40"),
        ("calibrate{percentile=100.5}", "must be in \\(50, 100\\]"),
        ("calibrate{bins=1001}", "'bins' of pass 'calibrate' must be a multiple of 4"),
        ("calibrate{bins=16}", "'bins' of pass 'calibrate' must be a multiple of 4 from 64"),
        ("calibrate{sample-rows=-1}", "'sample-rows' of pass 'calibrate' must be an integer from 0"),
        ("calibrate{method=kl}", "option 'method' of pass 'calibrate' must be one of minmax, percentile, entropy, mse"),
    ],
)
def test_bad_options(text, message):
    with pytest.raises(UserError, match=message):
        parse_pipeline(text)


def test_bad_options_from_the_api():
    with pytest.raises(UserError, match="percentile"):
        CalibratePass(percentile=0.5)


# --------------------------------------------------------------------------------------------
# Real model


@pytest.mark.slow
def test_minilm_calibration_on_sts_sentences():
    from pathlib import Path

    from qcompiler import models
    from qcompiler.analysis.calib_data import load_calibration
    from qcompiler.driver.capture import resolve
    from qcompiler.passes.canonicalize import CanonicalizePass

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "sts-pairs-dev.tsv"
    if not data.exists():
        pytest.skip(f"{data} not present")
    model, _ = resolve("minilm-l6")
    CanonicalizePass()(model)
    batches = load_calibration(data, 32, model, bundled=models.get("minilm-l6"))
    with using(CompileContext(calibration=batches)):
        result = CalibratePass(method="mse")(model)
    assert result.stats["tensors"] == 24  # Q/K/V input, attention output, FFN in, FFN out per layer
    assert result.stats["samples"] == 32
    ranges = [row["range"] for row in result.stats["top_outliers"]]
    assert all(lo <= 0 <= hi for lo, hi in ranges)
