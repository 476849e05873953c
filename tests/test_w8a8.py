"""SmoothQuant, scale folding, int8 quantization and the ORT lowering, on small graphs."""

import numpy as np
import pytest

from qcompiler.analysis import execute
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.codegen.ort.emit import weight_bytes
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_text, verify
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import parse_pipeline

# Pre-LN block with an outlier channel (gamma 20 on channel 1): Q and K share the normed input.
BLOCK = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 8] X) => (float[N, 8] Y)
<float[8] gamma = {1, 20, 1, 1, 0.5, 1, 1, 2}, float[8] beta = {0, 1, 0, 0, 0, 0, 0, 0},
 float[8,8] Wq = {W}, float[8,8] Wk = {W}, float[8,8] Wo = {W}>
{
  H = LayerNormalization <axis = -1> (X, gamma, beta)
  Q = MatMul (H, Wq)
  K = MatMul (H, Wk)
  S = Add (Q, K)
  G = Relu (S)
  O = MatMul (G, Wo)
  Y = Add (O, X)
}
"""


def _block():
    rng = np.random.default_rng(1)
    text = BLOCK
    for _ in range(3):
        text = text.replace("{W}", "{" + ",".join(f"{v:.4f}" for v in rng.normal(0, 0.3, 64)) + "}", 1)
    return parse(text)


def _run(model, pipeline, batches=8):
    data = [synthetic_inputs(model, seed=s) for s in range(batches)]
    with using(CompileContext(calibration=data)):
        return run_pipeline(model, parse_pipeline(pipeline))


def _outputs(model, seed=50):
    return execute.run(model, synthetic_inputs(model, seed=seed))["Y"]


def test_smooth_and_fold_are_exact():
    model = _block()
    expected = _outputs(model)
    records = _run(model, "calibrate,smooth{alpha=0.85},fold-scales")
    np.testing.assert_allclose(_outputs(model), expected, rtol=1e-5, atol=1e-5)
    smooth, fold = records[1].stats, records[2].stats
    assert smooth["groups"] == 2  # {Q, K} share H; Wo reads G
    assert fold["smoothing_folded"] == 1  # into the LayerNorm
    assert fold["smoothing_kept"] == 1 and "Relu" in next(iter(fold["kept"].values()))
    assert "qc.ChannelScale" not in to_text(model)


def test_unfoldable_smoothing_can_be_undone_instead_of_kept_as_a_mul():
    model = _block()
    expected = _outputs(model)
    wo = model.graph.initializers["Wo"].const_value.numpy().copy()
    records = _run(model, "calibrate,smooth{alpha=0.85},fold-scales{unfoldable=unsmooth}")
    np.testing.assert_allclose(_outputs(model), expected, rtol=1e-5, atol=1e-5)
    fold = records[2].stats
    assert fold["smoothing_folded"] == 1 and fold["smoothing_kept"] == 0
    assert fold["smoothing_undone"] == 1 and "Relu" in next(iter(fold["undone"].values()))
    text = to_text(model)
    assert " Mul (" not in text and "ChannelScale" not in text
    reader = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[0].name == "G")
    np.testing.assert_allclose(reader.inputs[1].const_value.numpy(), wo, rtol=1e-6)  # the smoothing is undone


def test_smoothing_flattens_the_outlier_channel():
    model = _block()
    stats = _run(model, "calibrate,smooth{alpha=0.85}")[1].stats["layers"]["H"]
    assert stats["act_absmax_after"] < stats["act_absmax_before"] / 2


def test_auto_alpha_is_on_the_grid_and_recorded():
    from qcompiler.analysis.calibration import STATS_KEY
    from qcompiler.passes.smooth import ALPHA_GRID, choose_alpha, smoothing_scale

    model = _block()
    weights = {name: model.graph.initializers[name].const_value.numpy().copy() for name in ("Wq", "Wk", "Wo")}
    layers = _run(model, "calibrate,smooth{alpha=auto}")[1].stats["layers"]
    assert sorted(layers) == ["G", "H"]  # both groups searched: {Q, K} read H, O reads G
    values = {v.name: v for node in model.graph for v in node.outputs}
    for x_name, members in (("H", ("Wq", "Wk")), ("G", ("Wo",))):
        alpha, stats = layers[x_name]["alpha"], values[x_name].meta[STATS_KEY]
        w = [weights[m] for m in members]
        w_absmax = np.max(np.abs(np.concatenate(w, axis=1)), axis=1)
        assert alpha in ALPHA_GRID
        assert alpha == choose_alpha(stats, w, w_absmax)  # the grid point the search picks
        # recorded is applied: the graph divides the input by the scale of the recorded alpha
        inverse = model.graph.initializers[f"{x_name}.smooth_inv"].const_value.numpy()
        np.testing.assert_allclose(1 / inverse, smoothing_scale(stats.absmax, w_absmax, alpha), rtol=1e-5)


@pytest.mark.parametrize("pipeline", ["calibrate,smooth", "calibrate,smooth,fold-scales", "calibrate,quantize", "canonicalize"])
def test_second_run_changes_nothing(pipeline):
    model = _block()
    _run(model, pipeline)
    text = to_text(model)
    records = _run(model, pipeline.replace("calibrate,", "") or pipeline)
    assert not any(r.modified for r in records if r.name != "calibrate")
    assert to_text(model) == text


def test_w8a8_error_is_small_and_lowering_matches_reference():
    model = _block()
    expected = _outputs(model)
    _run(model, "calibrate,smooth{alpha=auto},fold-scales,quantize")
    verify(model)
    reference = _outputs(model)  # qc ops through their numpy references
    assert execute.drift({"Y": expected}, {"Y": reference})["rel_l2"] < 0.02
    run_pipeline(model, parse_pipeline("lower-ort{act-format=u8}"))
    assert "qc." not in to_text(model)
    lowered = _outputs(model)  # ONNX Runtime, integer kernels
    np.testing.assert_allclose(lowered, reference, rtol=1e-3, atol=1e-3)


LINEARS_WITH_BIAS = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 8] X) => (float[N, 8] Y, float[N, 4] Z)
<float[8,8] W = {W}, float[8] b = {1, -1, 0.5, 0, 2, 0, 0, -3}, float[8,4] V = {W}, float[4] c = {0, 1, 2, 3}>
{
  P = MatMul (X, W)
  Y = Add (P, b)
  R = MatMul (X, V)
  Z = Add (c, R)
}
"""


def test_u8_linears_with_bias_lower_to_one_integer_kernel_that_adds_the_bias():
    rng = np.random.default_rng(2)
    text = LINEARS_WITH_BIAS
    for size in (64, 32):
        text = text.replace("{W}", "{" + ",".join(f"{v:.4f}" for v in rng.normal(0, 0.3, size)) + "}", 1)
    fused, qdq = parse(text), parse(text)
    separate = parse(text)
    _run(separate, "calibrate,quantize,lower-ort{act-format=u8}")
    assert [n.op_type for n in separate.graph] == ["QuantizeLinear", "MatMulIntegerToFloat", "MatMulIntegerToFloat"]
    for model, options in ((fused, "act-format=u8 shared-input=wide weight-format=s8"), (qdq, "act-format=u8 int-kernels=qdq weight-format=s8")):
        _run(model, f"calibrate,quantize,lower-ort{{{options}}}")
    # Y and Z read the same quantized X: one kernel over [W | V] with the biases [b | c], then a Split
    assert [n.op_type for n in fused.graph] == ["QuantizeLinear", "MatMulIntegerToFloat", "Split"]
    wide = next(n for n in fused.graph if n.op_type == "MatMulIntegerToFloat")
    np.testing.assert_array_equal(wide.inputs[6].const_value.numpy(), [1, -1, 0.5, 0, 2, 0, 0, -3, 0, 1, 2, 3])
    assert [n.op_type for n in qdq.graph].count("Add") == 2
    # both store the same int8 codes and per-channel scales: 96 weights in 96 + 4 * 12 bytes
    assert weight_bytes(fused, 96) == weight_bytes(qdq, 96) == {"weight_bytes": 144, "weights": 96, "effective_bits_per_weight": 12.0}
    for name in ("Y", "Z"):
        expected = execute.run(qdq, synthetic_inputs(qdq, seed=50))[name]
        np.testing.assert_allclose(execute.run(fused, synthetic_inputs(fused, seed=50))[name], expected, rtol=1e-5, atol=1e-6)


def _activation_ranges(model):
    return {n.inputs[0].name.removesuffix(".smoothed"): (n.attributes["scale"].value, n.attributes["zero_point"].value)
            for n in model.graph if n.op_type == "QuantizeActivation"}


def test_minmax_ranges_after_smoothing_come_from_the_rescaled_statistics():
    derived, recollected = _block(), _block()
    records = _run(derived, "calibrate,smooth{alpha=0.85},fold-scales,quantize")
    assert records[-1].stats["activation_ranges_recollected"] == 0
    # canonicalize keeps no statistics, so quantize must run the graph again
    records = _run(recollected, "calibrate,smooth{alpha=0.85},fold-scales,canonicalize,quantize")
    assert records[-1].stats["activation_ranges_recollected"] == 2
    ours, theirs = _activation_ranges(derived), _activation_ranges(recollected)
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for name, (scale, zero_point) in ours.items():
        assert scale == pytest.approx(theirs[name][0], rel=1e-5) and abs(zero_point - theirs[name][1]) <= 1


@pytest.mark.parametrize("mode", ["dynamic", "per-token"])
def test_runtime_activation_modes_lower_exactly(mode):
    model = _block()
    _run(model, f"calibrate,quantize{{act-mode={mode}}}")
    reference = _outputs(model)
    linears = sum(n.op_type == "MatMul" for n in model.graph)
    records = run_pipeline(model, parse_pipeline("lower-ort"))
    np.testing.assert_allclose(_outputs(model), reference, rtol=1e-3, atol=1e-3)
    if mode == "per-token":  # every linear runs the integer kernel, its row scale applied to the output
        assert records[-1].stats["routes"]["MatMulIntegerToFloat(per-token)"] == linears
        assert sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph) == linears
        assert not any(n.op_type == "MatMul" for n in model.graph)


def test_signed_and_unsigned_lowerings_agree():
    results = []
    for fmt in ("u8", "s8"):
        model = _block()
        _run(model, f"calibrate,quantize,lower-ort{{act-format={fmt}}}")
        results.append(_outputs(model))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("smooth,calibrate", "smooth requires 'calibrated'; add 'calibrate' before it"),
        ("calibrate,smooth{alpha=1.5}", "alpha must be in \\[0, 1\\]"),
        ("calibrate,quantize{weights=int4}", "must be one of int8"),
    ],
)
def test_bad_pipelines(pipeline, message):
    with pytest.raises(UserError, match=message):
        from qcompiler.pipeline.spec import check_order

        check_order(parse_pipeline(pipeline))


def test_quantize_without_data_names_the_fix():
    model = _block()
    with pytest.raises(UserError, match="needs calibration data; give --calib FILE"):
        run_pipeline(model, parse_pipeline("calibrate"))


def test_worst_activation_can_stay_in_float():
    model = _block()
    stats = _run(model, "calibrate,quantize{float-inputs=1}")[1].stats
    sqnr = {name: entry["activation_sqnr_db"] for name, entry in stats["per_layer"].items()}
    assert len(stats["activations_in_float"]) == 1 and stats["activations_quantized"] == 1
    kept = stats["activations_in_float"][0]
    readers = [name for name, entry in stats["per_layer"].items() if "activation" not in entry]
    assert readers and all(sqnr[name] == min(sqnr.values()) for name in readers), (kept, sqnr)


def test_alpha_search_keeps_the_same_columns_without_putting_weights_side_by_side():
    import types

    from qcompiler.passes import smooth

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, n)).astype(np.float32) for n in (700, 350, 350)]
    stats = types.SimpleNamespace(sample=rng.standard_normal((40, 16)).astype(np.float32), absmax=np.ones(16),
                                  channel_min=-np.ones(16), channel_max=np.ones(16))
    task = smooth.search_task(stats, weights, np.ones(16))
    side_by_side = np.concatenate(weights, axis=1)
    assert np.array_equal(task.weight, side_by_side[:, :: -(-side_by_side.shape[1] // smooth.SEARCH_COLUMNS)])


def test_per_token_linears_as_nbits_are_one_kernel_each():
    """`lower-ort{int-kernels=nbits}`: each per-token int8 linear becomes one 8-bit MatMulNBits of the
    float input (no zero points, no row-scale ops left). At accuracy level 0 it is the int8 weights
    alone, closer to float than per-token W8A8; at level 4 the kernel quantizes each row per block
    (here one block holds the whole row of 8), the per-token reference's grid."""
    model = _block()
    float_out = _outputs(model)
    _run(model, "calibrate,quantize{act-mode=per-token}")
    reference = _outputs(model)
    for level in (0, 4):
        lowered = model.clone()
        records = run_pipeline(lowered, parse_pipeline(f"lower-ort{{int-kernels=nbits accuracy-level={level}}}"))
        assert records[-1].stats["routes"]["MatMulNBits8(per-token linear)"] == 3
        kernels = [n for n in lowered.graph if n.op_type == "MatMulNBits"]
        # Q and K read one input: one wide kernel, then a Split
        assert len(kernels) == 2 and all(len(n.inputs) == 3 and n.attributes["bits"].value == 8 for n in kernels)
        assert not any(n.op_type in ("MatMul", "QuantizeLinear", "ReduceMax") for n in lowered.graph)
        out = _outputs(lowered)
        if level == 0:
            assert np.linalg.norm(out - float_out) < np.linalg.norm(reference - float_out)
        else:
            assert np.linalg.norm(out - reference) <= 1e-3 * np.linalg.norm(reference)
