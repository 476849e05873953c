"""Mixed precision for Conv layers: the kernel allocated as its im2col matrix, stored as a
`qc.MixedWeight`, expanded to a float32 kernel when ONNX Runtime loads the model."""

import numpy as np
import pytest

from qcompiler.analysis import bitcost, execute
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.codegen.ort.emit import weight_bytes
from qcompiler.ir import parse, to_text, verify
from qcompiler.ir.layers import conv_as_linear, weighted_convs
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import parse_pipeline


def _values(a: np.ndarray) -> str:
    return ",".join(f"{v:.5f}" for v in a.ravel())


def _conv_net(seed: int = 0):
    """A stem Conv, a depthwise 3x3 (9 rows a kernel, fewer than a group), a grouped 3x3 and a
    pointwise Conv, the layers a mobile conv net is made of; 28,672 weights."""
    rng = np.random.default_rng(seed)
    stem = rng.normal(0, 0.2, (32, 3, 3, 3)).astype(np.float32)
    depthwise = rng.normal(0, 0.3, (32, 1, 3, 3)).astype(np.float32)
    grouped = rng.normal(0, 0.1, (64, 16, 3, 3)).astype(np.float32)
    pointwise = rng.normal(0, 0.1, (160, 64, 1, 1)).astype(np.float32)
    pointwise[:, 5] *= 8  # one input channel with large weights
    bias = rng.normal(0, 0.1, 64).astype(np.float32)
    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 3, 12, 12] X) => (float[N, 160, 12, 12] Y)
    <float[32,3,3,3] Ws = {{{_values(stem)}}}, float[32,1,3,3] Wd = {{{_values(depthwise)}}},
     float[64,16,3,3] Wg = {{{_values(grouped)}}}, float[64] Bg = {{{_values(bias)}}},
     float[160,64,1,1] Wp = {{{_values(pointwise)}}}>
    {{
      a = Conv <pads: ints = [1, 1, 1, 1]> (X, Ws)
      ar = Relu (a)
      b = Conv <group: int = 32, pads: ints = [1, 1, 1, 1]> (ar, Wd)
      br = Relu (b)
      c = Conv <group: int = 2, pads: ints = [1, 1, 1, 1]> (br, Wg, Bg)
      cr = Relu (c)
      Y = Conv (cr, Wp)
    }}""")


WEIGHTS = 32 * 27 + 32 * 9 + 64 * 16 * 9 + 160 * 64


def _compile(model, pipeline):
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    with using(CompileContext(calibration=data)):
        return run_pipeline(model, parse_pipeline(pipeline))


def test_a_kernel_held_as_its_matrix_computes_the_same():
    """`conv_as_linear` stores the kernel [O, C/g, kh, kw] as [C/g * kh * kw, O] and rebuilds it with
    Transpose + Reshape: the same outputs, and the matrix's rows are channel-major."""
    model = _conv_net()
    feeds = synthetic_inputs(model, seed=3)
    before = execute.run(model, feeds)["Y"]
    grouped = weighted_convs(model.graph)[2]
    kernel = grouped.inputs[1].const_value.numpy().copy()
    for conv in weighted_convs(model.graph):
        conv_as_linear(model.graph, conv, "test")
    verify(model)
    assert weighted_convs(model.graph) == []  # every kernel is now computed, so a second rewrite finds none
    matrix = model.graph.initializers["Wg"].const_value.numpy()
    assert matrix.shape == (16 * 9, 64)
    np.testing.assert_array_equal(matrix[9 * 2 + 3 * 1 + 2], kernel[:, 2, 1, 2])  # row (channel 2, tap (1, 2))
    np.testing.assert_allclose(execute.run(model, feeds)["Y"], before, rtol=1e-6, atol=1e-6)


def test_row_energy_is_the_channels_energy_averaged_over_the_groups():
    model = _conv_net()
    grouped = conv_as_linear(model.graph, weighted_convs(model.graph)[2], "test")
    channel_energy = np.arange(32, dtype=np.float64)  # channels 0..15 feed group 0, 16..31 group 1
    rows = grouped.row_energy(channel_energy)
    assert rows.shape == (16 * 9,)
    np.testing.assert_array_equal(rows[:9], np.full(9, (0 + 16) / 2))
    np.testing.assert_array_equal(rows[9 * 15:], np.full(9, (15 + 31) / 2))


@pytest.mark.parametrize("budget", [4.0, 5.0, 6.0])
def test_every_conv_is_stored_within_the_budget_and_the_artifact_computes_the_ir(budget):
    """With `allocate-bits`, each Conv's kernel becomes a qc.MixedWeight (the depthwise one too, its
    9 rows one group); the lowered model stores at most the budget per source weight, holds no qc op,
    and ONNX Runtime computes what the references of the IR compute, to float32 round-off."""
    model = _conv_net()
    feeds = synthetic_inputs(model, seed=5)
    expected = execute.run(model, feeds)["Y"]
    records = _compile(model, f"calibrate,allocate-bits{{avg-bits={budget}}},quantize-weights")
    verify(model)
    assert to_text(model).count("qc.MixedWeight") == 4
    assert records[1].stats["predicted_bits_per_weight"] <= budget
    reference = execute.run(model, feeds)["Y"]
    _compile(model, "lower-ort")
    assert "qc." not in to_text(model)
    stored = weight_bytes(model, WEIGHTS)["effective_bits_per_weight"]
    assert budget - 1.0 <= stored <= budget  # the lowering's constants are priced for every candidate class
    scale = np.abs(reference).max()
    np.testing.assert_allclose(execute.run(model, feeds)["Y"], reference, rtol=1e-5, atol=1e-5 * scale)
    assert execute.drift({"Y": expected}, {"Y": reference})["rel_l2"] < {4.0: 0.8, 5.0: 0.4, 6.0: 0.2}[budget]


def test_more_bits_less_error():
    errors = []
    for budget in (4.0, 5.0, 6.0):
        model = _conv_net()
        records = _compile(model, f"calibrate,allocate-bits{{avg-bits={budget}}},quantize-weights")
        errors.append(records[1].stats["predicted_error"])
    assert errors[0] > errors[1] > errors[2]


def test_bias_correction_removes_the_mean_error_the_kernels_make():
    """The quantized kernels shift each output channel's mean; `quantize-weights` moves the Conv's bias
    (created where it has none) against it, so the output means of the mixed model are closer to float's."""
    means = {}
    for correct in ("true", "false"):
        model = _conv_net()
        feeds = synthetic_inputs(model, seed=5)
        expected = execute.run(model, feeds)["Y"]
        records = _compile(model, f"calibrate,allocate-bits{{avg-bits=4}},quantize-weights{{bias-correction={correct}}}")
        actual = execute.run(model, feeds)["Y"]
        means[correct] = float(np.abs((actual - expected).mean(axis=(0, 2, 3))).mean())
        shifted = [layer for layer in records[2].stats["per_layer"].values() if "bias_shift_max" in layer]
        assert len(shifted) == (4 if correct == "true" else 0)
    assert means["true"] < 0.5 * means["false"]


def test_convs_false_leaves_every_conv_in_float():
    model = _conv_net()
    records = _compile(model, "calibrate,allocate-bits{avg-bits=4 convs=false},quantize-weights")
    assert records[1].stats["layers"] == 0
    assert "qc." not in to_text(model)


def test_a_conv_is_priced_as_the_expand_route_stores_it():
    """Codes as tight bit-planes at any width, an fp16 scale and a uint8 (integer) or fp16 zero point per group and column."""
    assert bitcost.EXPANDED.class_bits("uniform", 3, 9, 32, 128, "auto") == 3 * 16 * 32 + 32 * 32  # 9 rows padded to 16
    assert bitcost.EXPANDED.class_bits("uniform", 4, 200, 10, 128, "auto") == 4 * 200 * 10 + 24 * 10 * 2
    assert set(bitcost.EXPANDED.packed_widths) == set(range(1, 9))


@pytest.mark.parametrize("attributes", [
    "pads: ints = [1, 1, 1, 1]",
    "pads: ints = [0, 1, 2, 1], strides: ints = [2, 1]",
    "group: int = 4, dilations: ints = [2, 2], pads: ints = [2, 2, 2, 2]",
])
def test_block_interpreter_runs_conv_as_onnx_runtime_does(attributes):
    """The torch interpreter that learned rounding runs blocks with (`torch_exec`) computes ONNX's Conv:
    asymmetric pads, strides, groups and dilations."""
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.2, (8, 2, 3, 3)).astype(np.float32) if "group" in attributes else rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[1, 8, 9, 9] X) => (float[1, 8, ?, ?] Y)
    <float[{','.join(map(str, w.shape))}] W = {{{_values(w)}}}, float[8] B = {{{_values(w[:, 0, 0, 0])}}}>
    {{ Y = Conv <{attributes}> (X, W, B) }}""")
    x = rng.normal(0, 1, (1, 8, 9, 9)).astype(np.float32)
    expected = execute.run(model, {"X": x})["Y"]
    env = run_nodes(list(model.graph), {"X": torch.from_numpy(x)}, lambda node: None, Constants())
    np.testing.assert_allclose(env["Y"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_gptq_runs_on_a_net_with_mixed_convs():
    """`gptq` (like `flexround` and `tune-scales`) runs blocks in the torch interpreter: a mixed Conv's
    kernel is computed there from its stored classes, so the learned-rounding passes run on conv nets."""
    model = _conv_net()
    records = _compile(model, "calibrate,allocate-bits{avg-bits=5},quantize-weights,gptq")
    assert records[-1].name == "gptq"
    assert to_text(model).count("qc.MixedWeight") == 4


def test_block_interpreter_runs_sum():
    """`lower-ort` writes a residual Add read by a LayerNormalization as `Sum`; learned rounding on such a
    model (compiled from an artifact's float graph) runs it."""
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3] A, float[2, 3] B, float[2, 3] C) => (float[2, 3] Y) { Y = Sum (A, B, C) }""")
    feeds = {name: np.arange(6, dtype=np.float32).reshape(2, 3) * (i + 1) for i, name in enumerate("ABC")}
    env = run_nodes(list(model.graph), {k: torch.from_numpy(v) for k, v in feeds.items()}, lambda node: None, Constants())
    np.testing.assert_array_equal(env["Y"].numpy(), feeds["A"] + feeds["B"] + feeds["C"])


def test_conv_hessian_is_the_gram_of_the_patches_per_group():
    """`gptq`'s H of a grouped, strided, asymmetrically padded Conv: the Gram matrix of its im2col
    patches, rows in the kernel matrix's order, one per group; and the input's mean per channel."""
    from qcompiler.passes.gptq import conv_hessians

    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.2, (4, 2, 2, 3)).astype(np.float32)
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[1, 4, 5, 6] X) => (float[1, 4, ?, ?] Y)
    <float[4,2,2,3] W = {{{_values(w)}}}>
    {{ Y = Conv <group: int = 2, strides: ints = [2, 1], pads: ints = [1, 0, 0, 2]> (X, W) }}""")
    conv = conv_as_linear(model.graph, weighted_convs(model.graph)[0], "test")
    x = rng.normal(0, 1, (1, 4, 5, 6)).astype(np.float32)
    hessians, _, means, patches = conv_hessians(model, [conv.conv], [{"X": x}], None)
    assert patches[id(conv.conv)] == len(range(0, 6 - 1, 2)) * (8 - 2)  # output rows x columns
    padded = np.pad(x, ((0, 0), (0, 0), (1, 0), (0, 2)))
    rows = []
    for i in range(0, padded.shape[2] - 1, 2):
        for j in range(padded.shape[3] - 2):
            rows.append(padded[0, :, i:i + 2, j:j + 3].reshape(4, -1))  # [channel, tap]
    patches = np.stack(rows)  # [positions, 4, 6]
    for g in range(2):
        p = patches[:, 2 * g:2 * g + 2].reshape(len(rows), -1).astype(np.float64)
        np.testing.assert_allclose(hessians[id(conv.conv)][g], p.T @ p / len(rows), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means[id(conv.conv)], x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)



def test_gptq_lowers_each_mixed_conv_layers_output_error():
    """On a conv net whose inputs have structure (correlated pixels), GPTQ's kernels give each Conv a
    smaller output error on the calibration patches than round-to-nearest, and the whole net a smaller drift."""
    drifts = {}
    for pipeline in ("quantize-weights", "quantize-weights,gptq"):
        model = _conv_net()
        rng = np.random.default_rng(0)
        smooth = lambda: np.cumsum(np.cumsum(rng.normal(0, 0.3, (2, 3, 12, 12)), axis=2), axis=3).astype(np.float32)
        data = [{"X": smooth()} for _ in range(4)]
        held = {"X": smooth()}
        expected = execute.run(model, held)["Y"]
        with using(CompileContext(calibration=data)):
            records = run_pipeline(model, parse_pipeline(f"calibrate,allocate-bits{{avg-bits=4}},{pipeline}"))
        drifts[pipeline] = execute.drift({"Y": expected}, {"Y": execute.run(model, held)["Y"]})["rel_l2"]
        if pipeline.endswith("gptq"):
            convs = records[-1].stats["convs"]
            assert convs["layers"] == 4 and convs["improved"] >= 3 and convs["kept"] == "gptq"
            assert convs["output_error_after"] < convs["output_error_before"]
    assert drifts["quantize-weights,gptq"] < drifts["quantize-weights"]



def test_gptq_keeps_round_to_nearest_kernels_when_the_models_error_does_not_fall(monkeypatch):
    """Each group's GPTQ kernel lowers that layer's error on its patches; when the model's output error
    over the calibration data does not fall with all of them, every kernel and bias is put back."""
    import qcompiler.passes.gptq as gptq

    model = _conv_net()
    _compile(model, "calibrate,allocate-bits{avg-bits=4},quantize-weights")
    graph_text = lambda: [line for line in to_text(model).splitlines() if "qcompiler.properties" not in line]
    rounded_to_nearest = graph_text()
    errors = iter([1.0, 2.0])  # before, after
    monkeypatch.setattr(gptq, "_model_error", lambda *args: next(errors))
    records = _compile(model, "gptq")
    assert records[-1].stats["convs"]["kept"] == "round-to-nearest"
    assert graph_text() == rounded_to_nearest  # every kernel and bias as round-to-nearest left it


def test_gptq_checks_the_models_error_on_batches_held_out_of_h(monkeypatch):
    """With 4 or more calibration batches, every 4th one is held out: H comes from the others and the
    model's error before and after is measured on the held-out ones only, so a rounding that fits the
    calibration data is not kept for it; with fewer, both use every batch."""
    import qcompiler.passes.gptq as gptq

    batches = list(range(10))
    fit, check = gptq.held_out(batches)
    assert check == [3, 7] and fit == [0, 1, 2, 4, 5, 6, 8, 9]
    assert gptq.held_out(batches[:4]) == ([0, 1, 2], [3])
    assert gptq.held_out(batches[:3]) == (batches[:3], batches[:3])

    model = _conv_net()
    rng = np.random.default_rng(0)
    data = [{"X": rng.normal(0, 1, (1, 3, 12, 12)).astype(np.float32) + i} for i in range(8)]
    seen = {"error": [], "hessian": []}
    real_error, real_hessians = gptq._model_error, gptq.conv_hessians
    monkeypatch.setattr(gptq, "_model_error", lambda m, cal, t: seen["error"].append([b["X"][0, 0, 0, 0] for b in cal]) or real_error(m, cal, t))
    monkeypatch.setattr(gptq, "conv_hessians", lambda m, c, cal, t: seen["hessian"].append([b["X"][0, 0, 0, 0] for b in cal]) or real_hessians(m, c, cal, t))
    with using(CompileContext(calibration=data)):
        records = run_pipeline(model, parse_pipeline("calibrate,allocate-bits{avg-bits=4},quantize-weights,gptq"))
    held = [data[3]["X"][0, 0, 0, 0], data[7]["X"][0, 0, 0, 0]]
    assert seen["error"] and all(used == held for used in seen["error"])
    assert seen["hessian"] == [[b["X"][0, 0, 0, 0] for i, b in enumerate(data) if i not in (3, 7)]]
    assert records[-1].stats["convs"].get("checked_on", "2 held-out batches") == "2 held-out batches"
