"""`qcompiler doctor`: the layer emulation equals the quantized model; the sensitive layer ranks first;
the suggested pipeline parses, keeps the layers it names and lowers their error."""

import numpy as np
import pytest

from qcompiler.analysis import execute
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.errors import UserError
from qcompiler.ir import parse
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import parse_pipeline
from qcompiler.tools.cli import main
from qcompiler.tools.doctor import REFINE_ROUNDS, Switchboard, _Stages, diagnose, joined, quantized_layers


def _mlp(k=256, h=256, n=256, wide_second=True, seed=0):
    """X -> A (k x h) -> Relu -> B (h x n). With `wide_second`, B's weights are heavy-tailed (Student t,
    1.5 degrees of freedom), so low-bit grids are coarse for most of them: B costs accuracy."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.1, 0.1, (k, h)).astype(np.float32)  # uniform weights suit a uniform grid
    b = rng.normal(0, 0.1, (h, n)).astype(np.float32)
    if wide_second:
        b = (0.02 * rng.standard_t(1.5, (h, n))).astype(np.float32)
    text = lambda w: ",".join(f"{v:.5f}" for v in w.ravel())  # noqa: E731
    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, {k}] X) => (float[M, {n}] Y)
    <float[{k},{h}] A = {{{text(a)}}}, float[{h},{n}] B = {{{text(b)}}}>
    {{ H = MatMul (X, A)
       R = Relu (H)
       Y = MatMul (R, B) }}""")


def _stages(model, pipeline):
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    stages = _Stages()
    with using(CompileContext(calibration=data)):
        run_pipeline(model, parse_pipeline(pipeline), [stages])
    return stages.float_stage, model


@pytest.mark.parametrize(
    "pipeline",
    [
        "calibrate,quantize",
        "calibrate,quantize{act-mode=per-token}",
        "calibrate,quantize{act-mode=dynamic}",
        "calibrate,smooth{alpha=0.5},fold-scales,quantize",
        "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights",
        "calibrate,allocate-bits{avg-bits=4.5 group-size=32 codebook=kmeans},quantize-weights",
    ],
)
def test_switchboard_with_every_layer_quantized_equals_the_quantized_model(pipeline):
    float_stage, quant = _stages(_mlp(), pipeline)
    layers, skipped = quantized_layers(float_stage, quant)
    assert [layer.name for layer in layers] == ["A", "B"] and skipped == []
    feeds = synthetic_inputs(quant, seed=11)
    board = Switchboard(float_stage, layers, feeds, threads=1)
    expected = execute.run(quant, feeds)["Y"]
    np.testing.assert_allclose(board.run({"A", "B"}), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(board.run(set()), execute.run(float_stage, feeds)["Y"], rtol=1e-5, atol=1e-5)
    assert board.error({"A", "B"}) > 0 and board.error(set()) == 0


def test_doctor_ranks_the_sensitive_layer_first_and_suggests_keeping_it():
    # A is already kept at 8 bits by the pipeline, B gets 3 to 4 bits: B costs the accuracy
    pipeline = "calibrate,allocate-bits{avg-bits=4 candidates=2,3,4,8 other-widths=expand group-size=32 keep=A},quantize-weights"
    result = diagnose(_mlp(), pipeline, calibration=[synthetic_inputs(_mlp(), seed=s) for s in range(4)], max_extra_bits=3.0)
    assert [row["layer"] for row in result["layers"]] == ["B", "A"]
    assert result["layers"][0]["recovered"] > 10 * result["layers"][1]["recovered"]
    suggestion = result["suggestion"]
    assert suggestion["layers"] == ["B"]
    assert suggestion["predicted_error"] < result["error_all_quantized"] / 10
    passes = parse_pipeline(suggestion["pipeline"])
    assert [p for p in passes if p.name == "allocate-bits"][0].keep == ("A", "B")


def test_suggestion_respects_the_extra_bits_limit():
    pipeline = "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights"
    data = [synthetic_inputs(_mlp(), seed=s) for s in range(4)]
    # with room, a layer is given more bits; the cheapest such change adds 0.5 average bits
    roomy = diagnose(_mlp(), pipeline, calibration=data, max_extra_bits=3.0, bits_only=True)["suggestion"]
    assert roomy["pipeline"] is not None and roomy["layers"] and 0.1 < roomy["extra_bits"] <= 3.0
    # every change costs more than 0.1 bits (one more bit over half the weights at least): none fits
    result = diagnose(_mlp(), pipeline, calibration=data, max_extra_bits=0.1, bits_only=True)
    assert all(row["boosted_bits"] - row["bits"] > 0.2 for row in result["layers"])
    assert result["suggestion"]["pipeline"] is None and result["suggestion"]["change"].startswith("none")


def test_learned_rounding_is_suggested_when_weight_rounding_costs_and_it_measures_lower():
    model = _mlp()
    result = diagnose(model, "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights",
                      calibration=[synthetic_inputs(model, seed=s) for s in range(4)], max_extra_bits=0.1)
    assert max(result["passes"], key=lambda p: p["drift_added"])["pass"].startswith("quantize-weights")
    s = result["suggestion"]  # no layer fits in 0.1 extra bits, but learning the rounding costs none
    assert s["added_passes"] == ["flexround"] and s["extra_bits"] == 0.0 and s["layers"] == []
    names = [p.name for p in parse_pipeline(s["pipeline"])]
    assert names[names.index("quantize-weights") + 1] == "flexround"
    (measured,) = s["measured"]
    assert measured["label"] == "with learned rounding" and measured["error"] == s["predicted_error"]
    assert s["predicted_error"] < result["error_all_quantized"]
    # a pipeline that already learns its rounding gets no second rounding pass
    again = diagnose(model, s["pipeline"], calibration=[synthetic_inputs(model, seed=s) for s in range(4)], max_extra_bits=0.1)
    assert "added_passes" not in again["suggestion"]


def test_int8_pipeline_suggestion_keeps_layers_in_float():
    model = _mlp()
    result = diagnose(model, "calibrate,quantize", calibration=[synthetic_inputs(model, seed=s) for s in range(4)])
    assert result["suggestion"]["layers"] and "quantize{" in result["suggestion"]["pipeline"]
    assert "keep=" in result["suggestion"]["pipeline"]


def test_int8_walk_measured_as_one_batch_chooses_what_the_walk_in_process_chooses(monkeypatch):
    """On a Ray executor the walk's prefixes are measured at once; a stand-in executor that runs the
    batch here takes that path."""
    from qcompiler.support import parallel

    model = _mlp()
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    here = diagnose(model, "calibrate,quantize", calibration=data)["suggestion"]

    class Batched:  # an executor that is not InProcess (the batch path), running its tasks here
        workers = 2

        def map(self, fn, items, *, shared=None, names=None):
            return [fn(shared, item) for item in items]

        def close(self):
            pass

    batches = []
    real_errors = Switchboard.errors
    monkeypatch.setattr(Switchboard, "errors", lambda self, queries, executor, label: batches.append(label) or real_errors(
        self, queries, executor, label))
    monkeypatch.setattr(parallel, "executor_for", lambda workers=None, address=None: Batched())
    fanned = diagnose(model, "calibrate,quantize", calibration=data)["suggestion"]
    assert "doctor: layers kept in float" in batches
    assert fanned == here and here["layers"]


def test_cli_apply_writes_a_pipeline_file_that_compile_accepts(tmp_path, capsys):
    import onnx

    from qcompiler.ir import to_proto

    model_path = tmp_path / "mlp.onnx"
    onnx.save(to_proto(_mlp()), str(model_path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32))
    applied = tmp_path / "suggested.pipeline"
    pipeline = "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights"
    assert main(["-q", "doctor", str(model_path), "--pipeline", pipeline, "--calib", str(calib),
                 "--max-extra-bits", "3", "--probe-batches", "2", "--apply", str(applied)]) == 0
    out = capsys.readouterr().out
    assert "ranked by the error recovered" in out and ("suggestion: keep " in out or "suggestion: give " in out)
    assert applied.read_text().startswith("# suggested by qcompiler doctor")
    (allocator,) = [p for p in parse_pipeline("@" + str(applied)) if p.name == "allocate-bits"]
    assert allocator.keep or allocator.boost
    assert main(["-q", "compile", str(model_path), "-o", str(tmp_path / "art"), "--pipeline", f"@{applied}",
                 "--calib", str(calib), "--report", str(tmp_path / "r.json")]) == 0
    import json

    stats = {p["name"]: p["stats"] for p in json.loads((tmp_path / "r.json").read_text())["passes"]}
    assert stats["allocate-bits"]["kept_layers"] == list(allocator.keep)
    assert stats["allocate-bits"]["boosted_layers"] == list(allocator.boost)
    boosted = []
    for entry in stats["allocate-bits"]["per_layer"].values():
        if entry["weight"] in allocator.keep:
            assert entry["bits_histogram"] == {"8": 256}
        elif entry["weight"] in allocator.boost:
            boosted.append(entry["bits_per_weight"])
    if boosted:  # the boosted layers share a budget of 4 + 1 bits (each, or pooled under scope=model)
        assert np.mean(boosted) > 4.5


def test_allocate_bits_keep_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(UserError, match="keep pattern 'C\\*' matches no layer weight"):
        _stages(_mlp(), "calibrate,allocate-bits{avg-bits=4 group-size=32 keep=C*},quantize-weights")


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_allocate_bits_boost_raises_the_named_layers_budget(scope):
    from qcompiler.pipeline.context import CompileContext, using

    model = _mlp()
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    with using(CompileContext(calibration=data)):
        records = run_pipeline(model, parse_pipeline(f"calibrate,allocate-bits{{avg-bits=4 group-size=32 scope={scope} boost=B boost-bits=1.5}}"))
    stats = records[-1].stats
    bits = {v["weight"]: v["bits_per_weight"] for v in stats["per_layer"].values()}
    assert stats["boosted_layers"] == ["B"]
    assert bits["A"] <= 4.0 + 1e-9 and 5.0 < bits["B"] <= 5.5 + 1e-9


def test_kl_metric_is_zero_in_float_and_positive_quantized():
    float_stage, quant = _stages(_mlp(), "calibrate,quantize")
    layers, _ = quantized_layers(float_stage, quant)
    board = Switchboard(float_stage, layers, synthetic_inputs(quant, seed=3), threads=1, metric="kl")
    assert board.error(set()) == pytest.approx(0.0, abs=1e-12)
    assert board.error({"A", "B"}) > 0 and board.error({"A"}) > 0
    with pytest.raises(UserError, match="--metric must be auto, mse or kl"):
        diagnose(_mlp(), "calibrate,quantize", calibration=[synthetic_inputs(_mlp())], metric="l2")


def test_probe_batches_are_joined_and_mismatched_ones_refused():
    model = _mlp()
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    assert diagnose(_mlp(), "calibrate,quantize", calibration=data, probe_batches=3)["measured_on"] == {
        "X": [3 * data[0]["X"].shape[0], 256]}
    padded_differently = [{"input_ids": np.zeros((2, 5), np.int64)}, {"input_ids": np.zeros((2, 7), np.int64)}]
    with pytest.raises(UserError, match="differ in inputs or shape"):
        joined(padded_differently)
    with pytest.raises(UserError, match="--probe-batches must be a positive integer"):
        diagnose(_mlp(), "calibrate,quantize", calibration=data, probe_batches=0)


def test_suggestion_is_measured_as_compiled_and_the_better_budget_scope_is_picked():
    rng = np.random.default_rng(5)
    weights = {"A": rng.uniform(-0.1, 0.1, (128, 128)), "B": 0.02 * rng.standard_t(1.5, (128, 128)), "C": rng.normal(0, 0.1, (128, 128))}
    text = lambda w: ",".join(f"{v:.5f}" for v in w.ravel())  # noqa: E731
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, 128] X) => (float[M, 128] Y)
    <{", ".join(f"float[128,128] {k} = {{{text(w)}}}" for k, w in weights.items())}>
    {{ H = MatMul (X, A)
       R = Relu (H)
       G = MatMul (R, B)
       Y = MatMul (G, C) }}""")
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    result = diagnose(model, "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights", calibration=data,
                      max_extra_bits=0.4, bits_only=True)
    s = result["suggestion"]
    assert s["measured"][0]["error"] != s["measured"][1]["error"]  # the two budgets allocate differently
    assert [m["label"] for m in s["measured"]] == ["as chosen", "model-wide budget with measured layer sensitivity"]
    best = min((m for m in s["measured"] if m["extra_bits"] <= 0.4), key=lambda m: m["error"])
    assert s["pipeline"] == best["pipeline"] and s["predicted_error"] == best["error"]
    allocator = next(p for p in parse_pipeline(s["pipeline"]) if p.name == "allocate-bits")
    assert (allocator.scope, allocator.sensitivity) == (("model", "output") if best is s["measured"][1] else ("layer", "off"))
    assert 0 < s["extra_bits"] <= 0.4 and s["predicted_error"] < result["error_all_quantized"]


def test_refinement_rounds_keep_the_lower_error_and_stop_when_it_no_longer_falls():
    model = _mlp()
    result = diagnose(model, "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights",
                      calibration=[synthetic_inputs(model, seed=s) for s in range(4)], max_extra_bits=1.0)
    rounds = result["suggestion"]["refinement"]
    assert 1 <= len(rounds) <= REFINE_ROUNDS and rounds[0]["choice_layers"] >= 1
    assert all(r["kept"] == "refilled" and r["refilled_error"] < r["choice_error"] for r in rounds[:-1])
    last = rounds[-1]
    assert last["kept"] == ("refilled" if last["refilled_error"] < last["choice_error"] else "choice")
    assert last["kept"] == "choice" or len(rounds) == REFINE_ROUNDS


def test_a_float16_source_is_diagnosed_in_float32_as_compile_runs_it(tmp_path):
    """doctor runs through compile's session: a float16 source computes in float32 inside, and its
    float16 calibration batches are cast on the way in."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.uniform(-0.1, 0.1, (64, 64)).astype(np.float16)
    b = (0.02 * rng.standard_t(1.5, (64, 32))).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "A"], ["H"]), helper.make_node("Relu", ["H"], ["R"]), helper.make_node("MatMul", ["R", "B"], ["Y"])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["M", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, ["M", 32])], [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    data = [{"X": rng.standard_normal((8, 64)).astype(np.float16)} for _ in range(4)]
    result = diagnose(str(path), "calibrate,quantize", calibration=data)
    assert sorted(row["layer"] for row in result["layers"]) == ["A", "B"] and result["error_all_quantized"] > 0


def test_doctor_prices_bits_with_the_targets_cost_model():
    """allocate-bits{cost=latency} reads the kernel-cost table of the target, in doctor as in compile."""
    model = _mlp(k=128, h=128, n=64)
    result = diagnose(model, "calibrate,allocate-bits{avg-bits=4 group-size=32 cost=latency},quantize-weights",
                      calibration=[synthetic_inputs(model, seed=s) for s in range(4)], bits_only=True)
    assert "cost=latency" in result["pipeline"] and {row["layer"] for row in result["layers"]} == {"A", "B"}


def test_a_torch_module_is_diagnosed_from_its_example_inputs_as_compile_captures_it():
    torch = pytest.importorskip("torch")
    from qcompiler import capture

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    example = (torch.randn(4, 64),)
    name = capture(module, example).graph.inputs[0].name
    data = [{name: np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(4)]
    result = diagnose(module, "calibrate,quantize", example_inputs=example, calibration=data)
    assert len(result["layers"]) == 2 and all(row["alone"] > 0 for row in result["layers"])


def test_a_model_whose_weights_the_doctors_copies_would_not_fit_is_refused_before_any_pass(tmp_path, capsys, monkeypatch):
    import onnx

    from qcompiler.ir import to_proto
    from qcompiler.support import memory

    model_path = tmp_path / "mlp.onnx"
    onnx.save(to_proto(_mlp()), str(model_path))
    floats = sum(v.const_value.size * 4 for v in _mlp().graph.initializers.values() if v.const_value.dtype.is_floating_point())
    monkeypatch.setattr(memory, "available_bytes", lambda: 6 * floats)  # one copy short of the doctor's seven
    applied = tmp_path / "suggested.pipeline"
    assert main(["-q", "doctor", str(model_path), "--pipeline", "calibrate,allocate-bits{avg-bits=4},quantize-weights",
                 "--apply", str(applied)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "doctor holds about 7 copies" in err and "--report" in err
    assert not applied.exists()
