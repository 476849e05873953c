"""int8 Conv kernels rounded by GPTQ (`quantize{rounding=gptq}`, `w8a8{conv-rounding=gptq}`): each output
channel's scale kept, the codes chosen so that the kernel's output error on the calibration patches is
least; against round-to-nearest on the same grid, and against the float model's outputs."""

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch

import qcompiler
from qcompiler.passes.gptq import PATCH_ROWS, _patches, gptq_fixed_grid, output_error
from qcompiler.pipeline.spec import parse_pipeline

WEIGHTS_ONLY = "canonicalize,calibrate,quantize{{activations=none bias-correction=conv{rounding}}},lower-ort"


def _correlated(rng, rows: int, k: int) -> np.ndarray:
    """Rows of k features that share a few directions (as neighbouring pixels and channels do)."""
    return rng.normal(0, 1, (rows, 4)) @ rng.normal(0, 1, (4, k)) + 0.1 * rng.normal(0, 1, (rows, k))


def _nearest(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / scales), -127, 127)


def test_fixed_grid_gptq_on_uncorrelated_inputs_is_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (40, 6))
    scales = np.abs(w).max(axis=0) / 127
    hessian = np.diag(rng.uniform(0.5, 2.0, 40))
    np.testing.assert_array_equal(gptq_fixed_grid(w, hessian, scales, 127), _nearest(w, scales))


def test_fixed_grid_gptq_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(1)
    x = _correlated(rng, 2000, 300)  # more rows than one lazy block of GPTQ
    hessian = x.T @ x / len(x)
    w = rng.normal(0, 1, (300, 8))
    scales = np.abs(w).max(axis=0) / 127
    codes = gptq_fixed_grid(w, hessian.copy(), scales, 127)
    assert codes.min() >= -127 and codes.max() <= 127
    gptq_error = output_error(w - codes * scales, hessian)
    nearest_error = output_error(w - _nearest(w, scales) * scales, hessian)
    assert gptq_error < 0.5 * nearest_error


@pytest.mark.parametrize("shape, rule", [
    ((4, 5, 130, 100), {"kernel": [3, 2], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 1], "group": 1}),
    ((2, 4, 20000), {"kernel": [5], "strides": [1], "dilations": [2], "pads": [4, 0], "group": 1}),
])
def test_sampled_patches_times_the_kernel_are_the_conv_outputs_at_those_positions(shape, rule):
    """Past `PATCH_ROWS` positions only every k-th patch is gathered, in batch then position order."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = torch.randn(6, shape[1], *rule["kernel"])
    if len(rule["kernel"]) == 2:
        top, left, bottom, right = rule["pads"]
        want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [left, right, top, bottom]), w,
                                          stride=rule["strides"], dilation=rule["dilations"])
        want = want.permute(0, 2, 3, 1).reshape(-1, 6)
    else:
        want = torch.nn.functional.conv1d(torch.nn.functional.pad(x, rule["pads"]), w, stride=rule["strides"],
                                          dilation=rule["dilations"]).permute(0, 2, 1).reshape(-1, 6)
    step = -(-len(want) // PATCH_ROWS)
    assert step > 1
    torch.testing.assert_close(_patches(x, rule) @ w.reshape(6, -1).T, want[::step], atol=1e-4, rtol=1e-4)


def _conv_net(tmp_path, names=("conv1", "relu", "conv2")):
    """Conv 3x3 (8 -> 16) -> Relu -> Conv 3x3 (16 -> 4), with biases; its nodes named `names`."""
    rng = np.random.default_rng(3)
    arrays = {"w1": rng.normal(0, 0.2, (16, 8, 3, 3)), "b1": rng.normal(0, 0.1, 16),
              "w2": rng.normal(0, 0.2, (4, 16, 3, 3)), "b2": rng.normal(0, 0.1, 4)}
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["h"], name=names[0], pads=[1] * 4),
             oh.make_node("Relu", ["h"], ["r"], name=names[1]),
             oh.make_node("Conv", ["r", "w2", "b2"], ["y"], name=names[2], pads=[1] * 4)]
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arrays.items()]
    graph = oh.make_graph(nodes, "convs", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8, 16, 16])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4, 16, 16])], inits)
    path = tmp_path / "convs.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _smooth_images(seed: int, count: int) -> np.ndarray:
    """Images whose neighbouring pixels and channels are correlated: blurred noise, 3 channels mixed into 8
    the same way for every seed, plus a little noise."""
    mixing = np.random.default_rng(0).normal(0, 1, (3, 8))
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 1, (count, 3, 16, 16)).astype(np.float32))
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).numpy()
    noise = 0.05 * rng.normal(0, 1, (count, 8, 16, 16))
    return (np.einsum("nchw,cd->ndhw", x, mixing) + noise).astype(np.float32)


def _relative_error(model_path, reference_path, x) -> float:
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = run(reference_path)
    return float(np.linalg.norm(run(model_path) - expected) / np.linalg.norm(expected))


def test_gptq_rounded_kernels_are_closer_to_float_on_held_out_images_with_the_same_scales(tmp_path):
    path = _conv_net(tmp_path)
    calibration = [{"x": _smooth_images(seed, 8)} for seed in range(4)]
    held_out = _smooth_images(99, 8)
    built = {}
    for label, rounding in (("nearest", ""), ("gptq", " rounding=gptq")):
        built[label] = qcompiler.compile(str(path), tmp_path / label, pipeline=WEIGHTS_ONLY.format(rounding=rounding),
                                         calibration=calibration, drift=False)
    stats = next(r.stats for r in built["gptq"].records if r.name == "quantize")
    assert {name: entry["rounding"] for name, entry in stats["per_layer"].items()} == {"conv1": "gptq", "conv2": "gptq"}
    assert stats["kernels_by_gptq"] == 2
    check = stats["gptq_check"]  # every 4th calibration batch held out of H, the model's outputs compared there
    assert check["checked_on"] == "1 held-out batches" and check["output_error_gptq"] < check["output_error_nearest"]
    scales = {label: {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / label / "model.onnx")).graph.initializer
                      if "scale" in i.name} for label in built}
    assert scales["gptq"].keys() == scales["nearest"].keys() and scales["gptq"]
    for name, value in scales["nearest"].items():
        np.testing.assert_array_equal(scales["gptq"][name], value)
    errors = {label: _relative_error(tmp_path / label / "model.onnx", path, held_out) for label in built}
    assert errors["gptq"] < 0.8 * errors["nearest"]


def test_the_check_quantizes_each_kernel_of_a_graph_whose_nodes_are_unnamed(tmp_path):
    """The model-level check finds each Conv in its copy of the model by its output, not by its (empty) name:
    the same check, the same artifact as the named graph's."""
    calibration = [{"x": _smooth_images(seed, 8)} for seed in range(4)]
    checks, artifacts = [], []
    for label, names in (("named", ("conv1", "relu", "conv2")), ("unnamed", ("", "", ""))):
        (tmp_path / label).mkdir()
        path = _conv_net(tmp_path / label, names)
        result = qcompiler.compile(str(path), tmp_path / label / "out", pipeline=WEIGHTS_ONLY.format(rounding=" rounding=gptq"),
                                   calibration=calibration, drift=False)
        checks.append(next(r.stats for r in result.records if r.name == "quantize")["gptq_check"])
        artifacts.append(onnx.load(str(tmp_path / label / "out" / "model.onnx")))
    assert checks[0] == checks[1]
    initializers = [{i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer} for a in artifacts]
    assert [n.endswith(".q") for n in initializers[0]].count(True) == 2
    for name, value in initializers[0].items():
        if name.endswith(".q"):
            np.testing.assert_array_equal(initializers[1][name], value)


def test_a_conv_with_too_few_patches_for_its_kernel_rows_keeps_round_to_nearest(tmp_path):
    """One 16 x 16 image: 256 patches for the 72 kernel rows of conv1 (and the 144 of conv2); an H of so few
    patches would be fitted, not learned from."""
    path = _conv_net(tmp_path)
    tiny = [{"x": _smooth_images(0, 1)}]
    result = qcompiler.compile(str(path), tmp_path / "tiny", pipeline=WEIGHTS_ONLY.format(rounding=" rounding=gptq"),
                               calibration=tiny, drift=False)
    per_layer = next(r.stats for r in result.records if r.name == "quantize")["per_layer"]
    assert per_layer["conv1"]["rounding"] == "nearest: 256 patches for 72 kernel rows"
    assert per_layer["conv2"]["rounding"] == "nearest: 256 patches for 144 kernel rows"
    qcompiler.compile(str(path), tmp_path / "nearest", pipeline=WEIGHTS_ONLY.format(rounding=""), calibration=tiny, drift=False)
    assert (tmp_path / "tiny" / "model.onnx").read_bytes() == (tmp_path / "nearest" / "model.onnx").read_bytes()


def test_kernels_keep_round_to_nearest_when_the_models_held_out_error_does_not_fall(tmp_path, monkeypatch):
    """Each kernel's error on its own H fell, the model's outputs did not get closer to float: every
    kernel keeps its nearest codes (a random SqueezeNet calibrated on 8 photos did that)."""
    import qcompiler.passes.quantize as quantize

    path = _conv_net(tmp_path)
    calibration = [{"x": _smooth_images(seed, 8)} for seed in range(4)]
    real, errors = quantize._kernels_error, []

    def reversed_order(*args):  # the nearest kernels measured first, then GPTQ's: GPTQ's made to measure worse
        errors.append(real(*args))
        return errors[-1] if len(errors) == 1 else 2 * errors[0]

    monkeypatch.setattr(quantize, "_kernels_error", reversed_order)
    result = qcompiler.compile(str(path), tmp_path / "gptq", pipeline=WEIGHTS_ONLY.format(rounding=" rounding=gptq"),
                               calibration=calibration, drift=False)
    stats = next(r.stats for r in result.records if r.name == "quantize")
    assert stats["kernels_by_gptq"] == 0 and len(errors) == 2
    assert {e["rounding"] for e in stats["per_layer"].values()} == {"nearest: the model's held-out error did not fall"}
    qcompiler.compile(str(path), tmp_path / "nearest", pipeline=WEIGHTS_ONLY.format(rounding=""), calibration=calibration, drift=False)
    assert (tmp_path / "gptq" / "model.onnx").read_bytes() == (tmp_path / "nearest" / "model.onnx").read_bytes()


def test_w8a8_conv_rounding_sets_quantize_rounding_auto_by_default():
    quantize = {p.name: p for p in parse_pipeline("w8a8{conv-rounding=gptq}")}["quantize"]
    assert quantize.rounding == "gptq"
    assert {p.name: p for p in parse_pipeline("w8a8{conv-rounding=nearest}")}["quantize"].rounding == "nearest"
    assert {p.name: p for p in parse_pipeline("w8a8")}["quantize"].rounding == "auto"


def test_auto_rounds_by_gptq_where_the_convs_h_are_small_and_to_nearest_above(tmp_path, monkeypatch):
    """conv1's H is 72 x 72 and conv2's 144 x 144: 25920 entries. Within the bound auto is gptq (the same
    artifact); above it, round-to-nearest (the same artifact as nearest), the bound named in the statistics."""
    import qcompiler.passes.quantize as quantize

    path = _conv_net(tmp_path)
    calibration = [{"x": _smooth_images(seed, 8)} for seed in range(4)]
    built = {}
    for label, rounding in (("nearest", ""), ("gptq", " rounding=gptq"), ("auto", " rounding=auto")):
        built[label] = qcompiler.compile(str(path), tmp_path / label, pipeline=WEIGHTS_ONLY.format(rounding=rounding),
                                         calibration=calibration, drift=False)
    artifact = {label: (tmp_path / label / "model.onnx").read_bytes() for label in built}
    assert artifact["auto"] == artifact["gptq"] != artifact["nearest"]
    monkeypatch.setattr(quantize, "GPTQ_UP_TO_ENTRIES", 25919)
    result = qcompiler.compile(str(path), tmp_path / "auto-large", pipeline=WEIGHTS_ONLY.format(rounding=" rounding=auto"),
                               calibration=calibration, drift=False)
    assert (tmp_path / "auto-large" / "model.onnx").read_bytes() == artifact["nearest"]
    stats = next(r.stats for r in result.records if r.name == "quantize")
    assert stats["kernels_by_gptq"] == 0
    assert stats["gptq_check"] == {"skipped": "the Convs' H would have 25,920 entries, above 25,919: every kernel rounded to nearest"}
