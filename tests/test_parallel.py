"""Fan-out on Ray (`qcompiler.support.parallel`): artifacts byte-identical to the in-process run for any
worker count, a failing task retried once and then named in one line, missing Ray an exit-2 error,
and without the options Ray never imported."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.support import parallel
from qcompiler.tools.cli import main

PIPELINE = "mixed{avg-bits=4.25 scope=model sensitivity=kl}"


@pytest.fixture(scope="module")
def ray_session():
    """One small local Ray instance shared by the module's tests (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _chain(path: Path, layers: int = 4, width: int = 128, seed: int = 0) -> Path:
    """X -> (MatMul, Tanh) x layers -> logits: a small model with `layers` weighted layers."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "X"
    for i in range(layers):
        w = (rng.standard_t(3, (width, width)) * 0.05).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"P{i}"], name=f"layer{i}"))
        out = "Y" if i == layers - 1 else f"H{i}"
        nodes.append(helper.make_node("Identity" if i == layers - 1 else "Tanh", [f"P{i}"], [out]))
        x = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", width])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", width])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    save(proto, path)
    return path


def _artifact_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _calibration(source: Path, count: int = 3):
    model = qcompiler.load(source)
    return [synthetic_inputs(model, seed=s) for s in range(count)]


def test_artifacts_are_byte_identical_in_process_and_on_one_or_two_workers(tmp_path, ray_session):
    source = _chain(tmp_path / "chain.onnx", layers=5)
    data = _calibration(source)
    built, stats = {}, {}
    for label, workers in (("in-process", None), ("1 worker", 1), ("2 workers", 2)):
        result = qcompiler.compile(source, tmp_path / label, pipeline=PIPELINE, calibration=data, threads=1, drift=False,
                                   workers=workers)
        built[label] = _artifact_bytes(tmp_path / label)
        stats[label] = next(r.stats for r in result.records if r.name == "allocate-bits")
    assert len(stats["in-process"]["sensitivity"]["factor"]) == 5
    assert stats["1 worker"] == stats["in-process"] and stats["2 workers"] == stats["in-process"]
    assert built["1 worker"].keys() == built["in-process"].keys()
    for label in ("1 worker", "2 workers"):
        different = [name for name in built["in-process"] if built[label][name] != built["in-process"][name]]
        assert different == [], f"{label}: {different}"


@pytest.mark.parametrize("damp", ["0.01", "auto"])
def test_gptq_layers_fanned_out_give_the_in_process_artifact(tmp_path, ray_session, damp):
    """gptq{sequential=0} rounds every layer of a block at once: on 2 workers each layer's output
    columns in two parts, one task each (with damp=auto, one task per layer and candidate damping too)."""
    source = _chain(tmp_path / "chain.onnx", layers=3)
    data = _calibration(source, count=4)  # damp=auto holds the fourth batch out
    pipeline = ("canonicalize,calibrate,allocate-bits{avg-bits=3.5 candidates=2,4,8},quantize-weights,"
                f"gptq{{sequential=0 regions=1 damp={damp}}},lower-ort")
    built = {}
    for label, workers in (("in-process", None), ("2 workers", 2)):
        result = qcompiler.compile(source, tmp_path / label, pipeline=pipeline, calibration=data, threads=1, drift=False,
                                   workers=workers)
        stats = next(r.stats for r in result.records if r.name == "gptq")
        assert stats["layers"] == 3 and ("damp_chosen" in stats) == (damp == "auto")
        built[label] = _artifact_bytes(tmp_path / label)
    assert built["2 workers"] == built["in-process"]


def test_a_failing_task_is_retried_once_then_named_in_one_line(tmp_path, ray_session):
    # nested, so that Ray ships them by value (the test module is not importable on workers)
    def _fails_on_three(shared, item):
        if item == 3:
            with open(shared, "a") as log:
                log.write("attempt\n")
            raise RuntimeError("layer three cannot be measured\nsecond line")
        return item * 10

    def _fails_once(shared, item):
        import pathlib

        marker = pathlib.Path(shared) / f"tried{item}"
        if not marker.exists():
            marker.write_text("1")
            raise RuntimeError("transient")
        return item + 1

    executor = parallel.RayExecutor(workers=2)
    attempts = tmp_path / "attempts.txt"
    with pytest.raises(parallel.TaskFailed) as failure:
        executor.map(_fails_on_three, [1, 2, 3, 4], shared=str(attempts), names=[f"measure layer{i}" for i in range(1, 5)])
    message = str(failure.value)
    assert "measure layer3" in message and "layer three cannot be measured" in message and "\n" not in message
    assert attempts.read_text().count("attempt") == 2  # the first try and one retry
    assert failure.value.exit_code == 1
    # a task that fails once succeeds on its retry; results keep the items' order
    assert executor.map(_fails_once, [5, 6, 7], shared=str(tmp_path)) == [6, 7, 8]
    executor.close()
    assert ray_session.is_initialized()  # an instance the executor did not start is left running


def test_in_process_map_keeps_order_and_chunks_cover_every_item_once():
    assert parallel.InProcess().map(lambda shared, item: shared + item, [3, 1, 2], shared=10) == [13, 11, 12]
    for n, parts in ((10, 3), (2, 5), (7, 1), (0, 2)):
        cut = parallel.chunks(list(range(n)), parts)
        assert [i for chunk in cut for i in chunk] == list(range(n))
        assert len(cut) == min(n, parts) and all(cut)


def test_missing_ray_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    source = _chain(tmp_path / "chain.onnx", layers=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    code = main(["compile", str(source), "-o", str(out), "--pipeline", PIPELINE, "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and 'pip install "qcompiler[ray]"' in err and "\n" not in err
    assert not out.exists()
    assert main(["doctor", str(source), "--pipeline", "mixed", "--ray-address", "auto"]) == 2
    assert 'pip install "qcompiler[ray]"' in capsys.readouterr().err
    config = tmp_path / "build.toml"  # the option read from a config file
    config.write_text(f'source = "{source.name}"\noutput = "out"\npipeline = "{PIPELINE}"\nworkers = 2\n')
    assert main(["compile", "--config", str(config)]) == 2
    assert 'pip install "qcompiler[ray]"' in capsys.readouterr().err and not out.exists()


def test_bad_worker_counts_are_refused(tmp_path):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(qcompiler.errors.UserError, match="workers must be a positive integer"):
            parallel.check_options(workers=bad)
    with pytest.raises(qcompiler.errors.UserError, match="ray-address"):
        parallel.check_options(ray_address=" ")


def test_without_the_options_ray_is_never_imported(tmp_path):
    source = _chain(tmp_path / "chain.onnx", layers=2)
    script = (
        "import sys, qcompiler\n"
        "from qcompiler.analysis.probe import synthetic_inputs\n"
        f"m = qcompiler.load({str(source)!r})\n"
        "data = [synthetic_inputs(m, seed=s) for s in range(2)]\n"
        f"qcompiler.compile({str(source)!r}, {str(tmp_path / 'out')!r}, pipeline={PIPELINE!r}, calibration=data, drift=False)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_doctor_diagnosis_is_the_same_in_process_and_on_two_workers(tmp_path, ray_session):
    """The layer measurements, the re-measurement rounds and the pipeline trials (the raised budget's run
    beside the pipeline's own, the two allocations side by side) on 2 workers give the in-process diagnosis."""
    from qcompiler.tools.doctor import diagnose

    source = _chain(tmp_path / "chain.onnx", layers=4)
    data = _calibration(source)
    pipeline = "calibrate,allocate-bits{avg-bits=4 group-size=32},quantize-weights"
    # a budget that lets the suggestion boost layers, so that its re-measurement round runs (fanned out too)
    here = diagnose(str(source), pipeline, calibration=data, threads=1, bits_only=True, max_extra_bits=1.0)
    fanned = diagnose(str(source), pipeline, calibration=data, threads=1, bits_only=True, max_extra_bits=1.0, workers=2)
    assert [row["layer"] for row in here["layers"]] and all(row["recovered"] != 0 for row in here["layers"])
    assert here["suggestion"]["refinement"][0]["choice_layers"] >= 2
    # the pipeline at a raised budget and both allocations measured ran as tasks on the workers
    assert all(row.get("boosted_bits") for row in here["layers"])
    assert [m["label"] for m in here["suggestion"]["measured"]] == ["as chosen", "model-wide budget with measured layer sensitivity"]
    for result in (here, fanned):  # wall times differ from run to run
        for row in result["passes"]:
            row.pop("seconds")
    assert fanned == here


def test_doctor_int8_walk_is_the_same_in_process_and_on_two_workers(tmp_path, ray_session):
    from qcompiler.tools.doctor import diagnose

    source = _chain(tmp_path / "chain.onnx", layers=4)
    data = _calibration(source)
    here = diagnose(str(source), "calibrate,quantize", calibration=data, threads=1)
    fanned = diagnose(str(source), "calibrate,quantize", calibration=data, threads=1, workers=2)
    assert here["suggestion"]["layers"] and "keep=" in here["suggestion"]["pipeline"]
    for result in (here, fanned):  # wall times differ from run to run
        for row in result["passes"]:
            row.pop("seconds")
    assert fanned == here


def _shared_input_chain(path: Path, width: int = 64, seed: int = 0) -> Path:
    """X -> {Q, K} (both read X) -> Q * K -> O -> Tanh -> D: three layer groups, a few input
    channels of X scaled up (outliers), so the alpha search has something to choose."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.1).astype(np.float32), name)
             for name in ("Wq", "Wk", "Wo", "Wd")]
    gain = np.ones(width, np.float32)
    gain[:: width // 4] = 40.0
    inits.append(numpy_helper.from_array(gain, "gain"))
    nodes = [
        helper.make_node("Mul", ["X", "gain"], ["H"]),
        helper.make_node("MatMul", ["H", "Wq"], ["Q"], name="q"),
        helper.make_node("MatMul", ["H", "Wk"], ["K"], name="k"),
        helper.make_node("Mul", ["Q", "K"], ["G"]),
        helper.make_node("MatMul", ["G", "Wo"], ["O"], name="o"),
        helper.make_node("Tanh", ["O"], ["T"]),
        helper.make_node("MatMul", ["T", "Wd"], ["Y"], name="d"),
    ]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", width])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", width])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    save(proto, path)
    return path


def test_smooth_alpha_search_fanned_out_gives_the_in_process_artifact(tmp_path, ray_session):
    """smooth{alpha=auto} searches each layer group's alpha as one task: same alphas, same bytes."""
    source = _shared_input_chain(tmp_path / "shared.onnx")
    data = _calibration(source)
    built, alphas = {}, {}
    for label, workers in (("in-process", None), ("2 workers", 2)):
        result = qcompiler.compile(source, tmp_path / label, pipeline="w8a8", calibration=data, threads=1, drift=False,
                                   workers=workers)
        layers = next(r.stats for r in result.records if r.name == "smooth")["layers"]
        alphas[label] = {x: stats["alpha"] for x, stats in layers.items()}
        built[label] = _artifact_bytes(tmp_path / label)
    assert len(alphas["in-process"]) == 3 and len(set(alphas["in-process"].values())) > 1
    assert alphas["2 workers"] == alphas["in-process"]
    assert built["2 workers"] == built["in-process"]


def test_calibration_shards_on_ray_give_the_in_process_statistics_and_artifact(tmp_path, ray_session, monkeypatch):
    """Calibration on 1 (in-process), 2 and 3 Ray workers: the statistics of the in-process stream bit for
    bit, and the w8a8 artifact (calibrate, smooth's sampled rows, quantize's ranges) byte-identical."""
    from qcompiler.analysis import calibration
    from qcompiler.analysis.calibration import collect, quantizable_inputs

    monkeypatch.setattr(calibration, "SHARD_MIN_BATCHES", 1)  # shard even these 6 batches

    source = _shared_input_chain(tmp_path / "shared.onnx")
    model = qcompiler.load(source)
    rng = np.random.default_rng(4)
    data = [{"X": rng.standard_normal((1 + i % 3, 64)).astype(np.float32)} for i in range(6)]
    tensors = quantizable_inputs(model)
    here = collect(model, data, tensors, sample_rows=32, bins=256, threads=1)
    for workers in (1, 2, 3):
        executor = parallel.RayExecutor(workers=workers)
        fanned = collect(model, data, tensors, sample_rows=32, bins=256, threads=1, executor=executor)
        assert [name for name in here if not here[name].equals(fanned[name])] == [], workers
    built = {}
    for label, workers in (("in-process", None), ("2 workers", 2)):
        qcompiler.compile(source, tmp_path / label, pipeline="w8a8", calibration=data, threads=1, drift=False,
                          workers=workers)
        built[label] = _artifact_bytes(tmp_path / label)
    assert built["2 workers"] == built["in-process"]


def test_a_calibration_shard_that_fails_names_its_task(ray_session):
    from qcompiler.analysis import calibration

    job = calibration.ShardJob(b"not an onnx model", ("H",), {"H": -1}, 8, 64, 1)
    batches = [(i, i, {"X": np.ones((1, 64), np.float32)}) for i in range(4)]
    accs = {"H": calibration.Accumulator(-1, sample_rows=8, bins=64, name="H")}
    with pytest.raises(parallel.TaskFailed) as failure:
        calibration._collect_sharded(job, batches, accs, parallel.RayExecutor(workers=2), None, 2)
    assert "task 'calibrate: batches 1-2 of 4' failed after 1 retry" in str(failure.value)
    assert "\n" not in str(failure.value)
