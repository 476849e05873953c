"""Block-wise learning after `quantize` (int8 weights and activations): flexround and tune-scales on
`qc.DequantizeWeight` weights and `qc.QuantizeActivation` grids, the float stream's biases, learning
on image tiles, and the torch interpreter's rules for the ops a conv net's input handling uses."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.analysis import execute
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_text
from qcompiler.ir.meta import FLOAT_BIAS_KEY, FLOAT_WEIGHT_KEY
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import check_order, parse_pipeline

W8A8 = "calibrate,quantize{bias-correction=conv conv-method=mse}"


def _conv_net(seed=0):
    """Three 3x3 convs with ReLUs between them, spatial size free: Y = C3(relu(C2(relu(C1 X))))."""
    rng = np.random.default_rng(seed)

    def arr(shape, scale):
        return ",".join(f"{v:.5f}" for v in rng.normal(0, scale, shape).ravel())

    conv = 'pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]'
    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 3, H, W] X) => (float[N, 3, H, W] Y)
    <float[8,3,3,3] W1 = {{{arr((8, 3, 3, 3), 0.3)}}}, float[8] B1 = {{{arr(8, 0.1)}}},
     float[8,8,3,3] W2 = {{{arr((8, 8, 3, 3), 0.15)}}}, float[8] B2 = {{{arr(8, 0.1)}}},
     float[3,8,3,3] W3 = {{{arr((3, 8, 3, 3), 0.15)}}}, float[3] B3 = {{{arr(3, 0.1)}}}>
    {{ A = Conv <{conv}> (X, W1, B1)
       B = Relu (A)
       C = Conv <{conv}> (B, W2, B2)
       D = Relu (C)
       Y = Conv <{conv}> (D, W3, B3) }}""")


def _data(count=4, size=16, seed=5):
    rng = np.random.default_rng(seed)
    return [{"X": rng.normal(0, 1, (2, 3, size, size)).astype(np.float32)} for _ in range(count)]


def _run(model, pipeline, data=None):
    with using(CompileContext(calibration=data or _data())):
        return {r.name: r for r in run_pipeline(model, parse_pipeline(pipeline))}


def _error(model, feeds):
    got, want = execute.run(model, feeds)["Y"], execute.run(_conv_net(), feeds)["Y"]
    return float(np.mean((got - want) ** 2))


def test_quantize_keeps_the_float_weight_and_the_bias_it_corrected():
    model = _conv_net()
    _run(model, W8A8)
    dequantize = [n for n in model.graph if n.op_type == "DequantizeWeight"]
    # the last conv writes the graph output: ONNX Runtime would run it in float, so it stays float
    assert len(dequantize) == 2 and all(FLOAT_WEIGHT_KEY in n.meta for n in dequantize)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    original = _conv_net().graph.initializers["B1"].const_value.numpy()
    np.testing.assert_array_equal(convs[0].meta[FLOAT_BIAS_KEY], original)
    assert not np.array_equal(convs[0].inputs[2].const_value.numpy(), original)  # corrected


@pytest.mark.parametrize("pass_", ["flexround{steps=100 regions=0 lr=0.0001}", "tune-scales{steps=100 regions=0 lr=0.0001}"])
def test_learning_after_quantize_lowers_the_block_loss_and_the_output_error(pass_):
    rtn, learned = _conv_net(), _conv_net()
    _run(rtn, W8A8)
    stats = _run(learned, f"{W8A8},{pass_}")[pass_.split("{")[0]].stats
    assert stats["layers"] == 2 and stats["blocks_improved"] == 1
    (block,) = stats["per_block"]
    assert block["kept"] == "learned" and block["loss_after"] < block["loss_before"]
    # every static grid: the input and the two ReLU outputs
    assert block["activation_grids_learned"] == 3
    feeds = _data(count=1, seed=99)[0]  # not calibration data
    assert _error(learned, feeds) < _error(rtn, feeds)


def test_flexround_moves_int8_codes_and_grid_scales_tune_scales_only_scales():
    base, flex, scales = _conv_net(), _conv_net(), _conv_net()
    _run(base, W8A8)
    _run(flex, f"{W8A8},flexround{{steps=100 regions=0 lr=0.0001}}")
    _run(scales, f"{W8A8},tune-scales{{steps=100 regions=0 lr=0.0001 act-grids=false}}")

    def arrays(model, suffix):
        return {k: v.const_value.numpy() for k, v in model.graph.initializers.items() if k.endswith(suffix)}

    def grids(model):
        return [n.attributes["scale"].value for n in model.graph if n.op_type == "QuantizeActivation"]

    assert all(a.dtype == np.int8 for a in arrays(flex, ".q").values())
    assert any(not np.array_equal(a, b) for a, b in zip(arrays(base, ".q").values(), arrays(flex, ".q").values()))
    assert grids(flex) != grids(base)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(base, ".q").values(), arrays(scales, ".q").values()))
    assert any(not np.array_equal(a, b) for a, b in zip(arrays(base, ".scale").values(), arrays(scales, ".scale").values()))
    assert grids(scales) == grids(base)  # act-grids=false


def test_lowered_model_computes_the_learned_ir_and_the_same_seed_the_same_ir():
    a, b = _conv_net(), _conv_net()
    _run(a, f"{W8A8},flexround{{steps=20 regions=0 seed=3 lr=0.0001}}")
    _run(b, f"{W8A8},flexround{{steps=20 regions=0 seed=3 lr=0.0001}}")
    assert to_text(a) == to_text(b)
    feeds = _data(count=1, seed=42)[0]
    expected = execute.run(a, feeds)["Y"]
    _run(a, "lower-ort")
    assert not any(n.domain == "qc" for n in a.graph)
    # integer kernels round a few activations the other way (a one-step flip moves 27 outputs by up to 0.005)
    diff = np.abs(execute.run(a, feeds)["Y"] - expected)
    assert diff.max() < 0.02 and diff.mean() < 5e-4


def test_tiles_learn_on_crops_and_a_fixed_size_is_refused():
    from qcompiler.analysis.reconstruct import _tiled

    batch = {"X": np.arange(2 * 3 * 20 * 16, dtype=np.float32).reshape(2, 3, 20, 16), "s": np.array([1.0, 2.0], np.float32)}
    tiles = _tiled(batch, 8)
    # 20 rows give two whole tiles (the remainder of 4 is left out), 16 columns two
    assert tiles["X"].shape == (2 * 4, 3, 8, 8) and tiles["s"].tolist() == [1.0, 2.0] * 4
    np.testing.assert_array_equal(tiles["X"][2], batch["X"][0, :, 0:8, 8:16])
    stats = _run(_conv_net(), f"{W8A8},flexround{{steps=5 regions=0 tile=8}}", _data(size=24))["flexround"].stats
    assert stats["layers"] == 2
    fixed = _conv_net()
    fixed.graph.inputs[0].shape = ir.Shape(["N", 3, 16, 16])
    with pytest.raises(UserError, match="tile=8 crops input 'X'.*16 x 16"):
        _run(fixed, f"{W8A8},flexround{{steps=5 tile=8}}")


def test_flexround_needs_quantized_weights():
    with pytest.raises(UserError, match="flexround requires 'quantized' or 'weights-quantized'"):
        check_order(parse_pipeline("calibrate,flexround"))
    check_order(parse_pipeline(f"{W8A8},flexround,lower-ort"))  # either form will do
    check_order(parse_pipeline("calibrate,allocate-bits,quantize-weights,flexround,lower-ort"))
    with pytest.raises(UserError, match="tile must be 0"):
        parse_pipeline(f"{W8A8},flexround{{tile=3}}")


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge"])
def test_interpreter_pads_as_onnx(mode):
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[1, 2, 5, 6] X) => (float[1, 2, 8, 9] Y)
    <int64[8] P = {{0, 0, 1, 2, 0, 0, 2, 1}}>
    {{ Y = Pad <mode: string = "{mode}"> (X, P) }}""")
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 6)).astype(np.float32)
    got = run_nodes(list(model.graph), {"X": torch.from_numpy(x)}, lambda n: None, Constants())["Y"].numpy()
    np.testing.assert_allclose(got, execute.run(model, {"X": x})["Y"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_interpreter_depth_to_space_and_mod_as_onnx(mode):
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 8, 3, 4] X, int64[5] A) => (float[2, 2, 6, 8] Y, int64[5] R)
    <int64 B = {{3}}>
    {{ Y = DepthToSpace <blocksize: int = 2, mode: string = "{mode}"> (X)
       R = Mod (A, B) }}""")
    feeds = {"X": np.random.default_rng(1).normal(size=(2, 8, 3, 4)).astype(np.float32), "A": np.array([-4, -1, 0, 5, 7])}
    got = run_nodes(list(model.graph), {k: torch.from_numpy(v) for k, v in feeds.items()}, lambda n: None, Constants())
    want = execute.run(model, feeds)
    np.testing.assert_array_equal(got["Y"].numpy(), want["Y"])
    np.testing.assert_array_equal(got["R"].numpy(), want["R"])


@pytest.mark.parametrize(("pads", "output_padding", "group"), [([0, 0, 0, 0], [0, 0], 1), ([1, 0, 2, 1], [1, 0], 2)])
def test_interpreter_conv_transpose_as_onnx(pads, output_padding, group):
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    rng = np.random.default_rng(2)
    w = ",".join(f"{v:.5f}" for v in rng.normal(size=(4, 6 // group, 3, 3)).ravel())
    attrs = (f"strides: ints = [2, 2], pads: ints = {pads}, output_padding: ints = {output_padding}, "
             f"group: int = {group}, kernel_shape: ints = [3, 3]")
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[1, 4, 5, 6] X) => (float[1, 6, H, W] Y)
    <float[4, {6 // group}, 3, 3] Wt = {{{w}}}, float[6] B = {{1, 2, 3, 4, 5, 6}}>
    {{ Y = ConvTranspose <{attrs}> (X, Wt, B) }}""")
    x = rng.normal(size=(1, 4, 5, 6)).astype(np.float32)
    got = run_nodes(list(model.graph), {"X": torch.from_numpy(x)}, lambda n: None, Constants())["Y"].numpy()
    np.testing.assert_allclose(got, execute.run(model, {"X": x})["Y"], rtol=1e-5, atol=1e-5)


def test_interpreter_tiles_as_onnx():
    """Tile repeats grouped key/value heads in exported decoders (Llama's repeat_kv)."""
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3, 1, 4] X) => (float[2, 6, 3, 4] Y)
    <int64[4] R = {1, 2, 3, 1}>
    { Y = Tile (X, R) }""")
    x = np.random.default_rng(3).normal(size=(2, 3, 1, 4)).astype(np.float32)
    got = run_nodes(list(model.graph), {"X": torch.from_numpy(x)}, lambda n: None, Constants())["Y"].numpy()
    np.testing.assert_array_equal(got, execute.run(model, {"X": x})["Y"])


def test_an_op_the_interpreter_lacks_is_refused_before_learning():
    model = _conv_net()
    _run(model, W8A8)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.op_type = "Hardmax"  # no rule for it
    with pytest.raises(UserError, match="cannot run Hardmax"):
        _run(model, "flexround{steps=5 regions=0}")


def test_tiles_refuse_an_input_that_is_not_per_sample():
    from qcompiler.analysis.reconstruct import _tiled

    with pytest.raises(UserError, match="input 's'.*tile=0"):
        _tiled({"X": np.zeros((2, 3, 16, 16), np.float32), "s": np.zeros((3,), np.float32)}, 8)


def test_the_float_stream_reads_a_matmul_bias_before_correction():
    """bias-correction=true shifts a MatMul's Add bias; the targets are the float model's, so a
    learner that reached them exactly would undo the shift, not learn towards it."""
    from qcompiler.analysis.reconstruct import _float_biases

    rng = np.random.default_rng(0)
    w = ",".join(f"{v:.5f}" for v in rng.normal(0, 0.3, (16, 8)).ravel())
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, 16] X) => (float[M, 8] Y)
    <float[16, 8] W = {{{w}}}, float[8] B = {{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}}>
    {{ A = MatMul (X, W)
       Y = Add (A, B) }}""")
    data = [{"X": (np.random.default_rng(s).normal(1.0, 1, (32, 16))).astype(np.float32)} for s in range(3)]
    _run(model, "calibrate,quantize{bias-correction=true}", data)
    add = next(n for n in model.graph if n.op_type == "Add")
    stored = next(v for v in add.inputs if v.const_value is not None)
    assert not np.allclose(stored.const_value.numpy(), np.arange(1, 9) / 10)  # corrected
    (name, original), = _float_biases(list(model.graph)).items()
    assert name == stored.name
    np.testing.assert_allclose(original.numpy(), np.arange(1, 9) / 10, rtol=1e-6)


@pytest.mark.parametrize(
    ("op", "attrs"),
    [("MaxPool", "kernel_shape: ints = [3, 3], strides: ints = [2, 2], pads: ints = [0, 0, 1, 1], ceil_mode: int = 1"),
     ("AveragePool", "kernel_shape: ints = [3, 3], strides: ints = [2, 2], pads: ints = [1, 1, 1, 1]"),
     ("AveragePool", "kernel_shape: ints = [2, 2], count_include_pad: int = 1, pads: ints = [1, 1, 1, 1]"),
     ("GlobalAveragePool", ""), ("GlobalMaxPool", "")])
def test_interpreter_pools_as_onnx(op, attrs):
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3, 7, 8] X) => (float[2, F] Y)
    {{ P = {op} {"<" + attrs + ">" if attrs else ""} (X)
       Y = Flatten (P) }}""")
    x = np.random.default_rng(3).normal(size=(2, 3, 7, 8)).astype(np.float32)
    got = run_nodes(list(model.graph), {"X": torch.from_numpy(x)}, lambda n: None, Constants())["Y"].numpy()
    np.testing.assert_allclose(got, execute.run(model, {"X": x})["Y"], rtol=1e-6, atol=1e-6)


def test_interpreter_runs_only_as_far_as_the_wanted_values_and_drops_the_rest():
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3] X) => (float[2, 3] Z)
    { A = Relu (X)
      B = Neg (A)
      C = Add (A, B)
      D = Exp (C)
      Z = Bogus (D) }""")  # a node past the wanted values: never reached
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 3)).astype(np.float32))
    got = run_nodes(list(model.graph), {"X": x}, lambda n: None, Constants(), wanted=["A", "C"])
    assert sorted(got) == ["A", "C"]  # X, B: read by nothing after C; D and Z: past it
    np.testing.assert_array_equal(got["C"].numpy(), (torch.relu(x) - torch.relu(x)).numpy())
    with pytest.raises(NotImplementedError, match="Bogus"):
        run_nodes(list(model.graph), {"X": x}, lambda n: None, Constants())
