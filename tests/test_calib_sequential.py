"""Block-sequential calibration: the same statistics as the whole-model run, one block at a time."""

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from qcompiler import ir as qir
from qcompiler.analysis import calib_sequential
from qcompiler.analysis.calib_sequential import cut_segments
from qcompiler.analysis.calibration import collect, quantizable_inputs

F = onnx.TensorProto.FLOAT
D, FFN, VOCAB, SEQ = 16, 32, 50, 6


def _model(nodes, inputs, outputs, weights) -> ir.Model:
    graph = oh.make_graph(nodes, "g", inputs, outputs, [onh.from_array(a, n) for n, a in weights.items()])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def transformer(layers: int = 3, bias: bool = True, norm: str = "layernorm") -> ir.Model:
    """Token embedding, a padding mask (graph input) and a rotary-like table (computed once from the
    positions) read by every layer, `layers` pre-norm layers (single-head attention, MLP), a final
    norm and a head. `norm`: LayerNormalization, or RMSNorm written out in elementary ops."""
    rng = np.random.default_rng(0)
    w = {"emb": rng.standard_normal((VOCAB, D)).astype(np.float32), "freq": rng.standard_normal((1, D)).astype(np.float32),
         "scale": np.array(D**-0.5, np.float32), "eps": np.array(1e-5, np.float32), "two": np.array(2.0, np.float32)}
    nodes = [
        oh.make_node("Gather", ["emb", "ids"], ["x0"]),
        oh.make_node("Unsqueeze", ["pos", "ax1"], ["pos2"]),
        oh.make_node("Mul", ["pos2", "freq"], ["angles"]),  # [B, S, 1] * [1, D]
        oh.make_node("Cos", ["angles"], ["cos"]),
    ]
    w["ax1"] = np.array([-1], np.int64)

    def norm_of(x, name):
        w[f"{name}.g"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        if norm == "layernorm":
            w[f"{name}.b"] = (0.1 * rng.standard_normal(D)).astype(np.float32)
            nodes.append(oh.make_node("LayerNormalization", [x, f"{name}.g", f"{name}.b"], [f"{name}.out"], axis=-1))
        else:
            nodes.extend([
                oh.make_node("Pow", [x, "two"], [f"{name}.sq"]),
                oh.make_node("ReduceMean", [f"{name}.sq"], [f"{name}.ms"], axes=[-1]),
                oh.make_node("Add", [f"{name}.ms", "eps"], [f"{name}.mse"]),
                oh.make_node("Sqrt", [f"{name}.mse"], [f"{name}.rms"]),
                oh.make_node("Div", [x, f"{name}.rms"], [f"{name}.n"]),
                oh.make_node("Mul", [f"{name}.n", f"{name}.g"], [f"{name}.out"]),
            ])
        return f"{name}.out"

    def linear(x, name, k, n):
        w[f"{name}.w"] = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        nodes.append(oh.make_node("MatMul", [x, f"{name}.w"], [f"{name}.mm" if bias else f"{name}.out"]))
        if bias:
            w[f"{name}.b"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
            nodes.append(oh.make_node("Add", [f"{name}.mm", f"{name}.b"], [f"{name}.out"]))
        return f"{name}.out"

    x = "x0"
    for i in range(layers):
        p = f"l{i}"
        h = norm_of(x, f"{p}.ln1")
        q, k, v = (linear(h, f"{p}.{n}", D, D) for n in "qkv")
        nodes += [
            oh.make_node("Mul", [q, "cos"], [f"{p}.qr"]),
            oh.make_node("Mul", [k, "cos"], [f"{p}.kr"]),
            oh.make_node("Transpose", [f"{p}.kr"], [f"{p}.kt"], perm=[0, 2, 1]),
            oh.make_node("MatMul", [f"{p}.qr", f"{p}.kt"], [f"{p}.s"]),
            oh.make_node("Mul", [f"{p}.s", "scale"], [f"{p}.ss"]),
            oh.make_node("Add", [f"{p}.ss", "mask"], [f"{p}.sm"]),
            oh.make_node("Softmax", [f"{p}.sm"], [f"{p}.p"], axis=-1),
            oh.make_node("MatMul", [f"{p}.p", v], [f"{p}.a"]),
        ]
        o = linear(f"{p}.a", f"{p}.o", D, D)
        nodes.append(oh.make_node("Add", [x, o], [f"{p}.mid"]))
        h2 = norm_of(f"{p}.mid", f"{p}.ln2")
        up = linear(h2, f"{p}.up", D, FFN)
        nodes += [oh.make_node("Sigmoid", [up], [f"{p}.sg"]), oh.make_node("Mul", [up, f"{p}.sg"], [f"{p}.act"])]
        down = linear(f"{p}.act", f"{p}.down", FFN, D)
        nodes.append(oh.make_node("Add", [f"{p}.mid", down], [f"{p}.res"]))
        x = f"{p}.res"
    head = linear(norm_of(x, "final"), "head", D, VOCAB)
    nodes.append(oh.make_node("Identity", [head], ["logits"]))
    return _model(
        nodes,
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "S"]),
         oh.make_tensor_value_info("pos", F, ["B", "S"]),
         oh.make_tensor_value_info("mask", F, ["B", 1, "S"])],
        [oh.make_tensor_value_info("logits", F, ["B", "S", VOCAB])],
        w,
    )


def transformer_batches(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    sizes = [2 + i % 2 for i in range(count)]
    return [
        {"ids": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64), "pos": np.tile(np.arange(SEQ, dtype=np.float32), (n, 1)),
         "mask": np.where(rng.random((n, 1, SEQ)) < 0.2, -1e4, 0.0).astype(np.float32)}
        for n in sizes
    ]


def convnet() -> ir.Model:
    """Conv stages with a residual block, max and average pooling, and a Gemm head."""
    rng = np.random.default_rng(2)
    w = {
        "k1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
        "k2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2, "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
        "k3": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
        "k4": rng.standard_normal((16, 8, 1, 1)).astype(np.float32) * 0.3,
        "fc": rng.standard_normal((10, 16)).astype(np.float32) * 0.3, "fcb": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["image", "k1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c1"], ["r1"]),
        oh.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "k2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"]),
        oh.make_node("Conv", ["r2", "k3"], ["c3"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["c3", "p1"], ["s3"]),
        oh.make_node("Relu", ["s3"], ["r3"]),
        oh.make_node("AveragePool", ["r3"], ["p3"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p3", "k4"], ["c4"]),
        oh.make_node("Relu", ["c4"], ["r4"]),
        oh.make_node("MaxPool", ["r4"], ["p4"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("GlobalAveragePool", ["p4"], ["g"]),
        oh.make_node("Flatten", ["g"], ["flat"]),
        oh.make_node("Gemm", ["flat", "fc", "fcb"], ["out"], transB=1),
    ]
    return _model(nodes, [oh.make_tensor_value_info("image", F, ["N", 3, 8, 8])], [oh.make_tensor_value_info("out", F, ["N", 10])], w)


def conv_batches(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"image": rng.standard_normal((2 + i % 2, 3, 8, 8)).astype(np.float32)} for i in range(count)]


def _assert_same(whole, sequential):
    assert whole.keys() == sequential.keys()
    for name in whole:
        assert whole[name].equals(sequential[name]), name


MODELS = {
    "transformer": (transformer, transformer_batches),
    "transformer-no-bias": (lambda: transformer(bias=False), transformer_batches),
    "transformer-rmsnorm": (lambda: transformer(norm="rms"), transformer_batches),
    "convnet": (convnet, conv_batches),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sequential_statistics_are_those_of_the_whole_model(name):
    build, batches = MODELS[name]
    model = build()
    tensors = quantizable_inputs(model)
    segments = cut_segments(model, tensors)
    assert segments is not None and len(segments) >= 3
    whole = collect(model, batches(), tensors, threads=1, sample_rows=7, bins=256)
    sequential = collect(model, batches(), tensors, threads=1, sample_rows=7, bins=256, sequential=True)
    _assert_same(whole, sequential)
    assert all(st.count > 0 for st in sequential.values())


def test_residuals_are_found_when_shape_inference_renamed_a_dim():
    model = transformer(layers=3)
    for node in model.graph:
        if node.outputs[0].name.endswith(".o.out"):  # as after a Reshape: new names for the same dims
            node.outputs[0].shape = ir.Shape(["b2", "s2", D])
    tensors = quantizable_inputs(model)
    assert len(cut_segments(model, tensors)) == 4  # three layers and the head
    _assert_same(collect(model, transformer_batches(), tensors, threads=1),
                 collect(model, transformer_batches(), tensors, threads=1, sequential=True))


def test_values_read_by_every_layer_cross_several_segments():
    model = transformer(layers=3)
    segments = cut_segments(model, quantizable_inputs(model))
    inputs = [{v.name for v in s.inputs} for s in segments]
    # the mask (a graph input) and the rotary table (made in the first segment) reach every layer
    assert all("mask" in names for names in inputs[:3])
    assert "cos" not in inputs[0] and all("cos" in names for names in inputs[1:3])
    assert "cos" in {v.name for v in segments[0].outputs}  # made once, kept for the layers after
    assert not {"cos", "mask"} & inputs[-1]  # the head reads neither
    # every calibrated tensor belongs to exactly one segment
    calibrated = [name for s in segments for name in s.calibrated]
    assert sorted(calibrated) == sorted(quantizable_inputs(model))
    # a segment's model holds only its own weights
    own = {v.name for v in segments[1].initializers}
    assert "l1.q.w" in own and "l0.q.w" not in own and "emb" not in own and "head.w" not in own


def test_crossing_values_spill_to_files_and_the_folder_is_removed(monkeypatch):
    model = transformer(layers=2)
    tensors = quantizable_inputs(model)
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(calib_sequential.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    monkeypatch.setattr(calib_sequential, "SPILL_BYTES", 0)
    whole = collect(model, transformer_batches(), tensors, threads=1)
    sequential = collect(model, transformer_batches(), tensors, threads=1, sequential=True)
    _assert_same(whole, sequential)
    assert len(made) == 1 and not os.path.exists(made[0])


def test_spill_folder_is_removed_on_error(monkeypatch):
    model = transformer(layers=2)
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(calib_sequential.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    monkeypatch.setattr(calib_sequential, "SPILL_BYTES", 0)
    build = calib_sequential.segment_model

    def failing(model, segment, arrays):
        if segment.index == 1:
            raise RuntimeError("disk full")
        return build(model, segment, arrays)

    monkeypatch.setattr(calib_sequential, "segment_model", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        collect(model, transformer_batches(), quantizable_inputs(model), threads=1, sequential=True)
    assert len(made) == 1 and not os.path.exists(made[0])


def test_a_graph_without_blocks_runs_whole():
    model = _model(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        [oh.make_tensor_value_info("x", F, ["N", 4])], [oh.make_tensor_value_info("y", F, ["N", 3])],
        {"w": np.ones((4, 3), np.float32)},
    )
    assert cut_segments(model, ["x"]) is None
    batches = [{"x": np.arange(8, dtype=np.float32).reshape(2, 4)}]
    _assert_same(collect(model, batches, {"x": -1}), collect(model, batches, {"x": -1}, sequential=True))


def test_large_models_calibrate_one_block_at_a_time(monkeypatch):
    model = convnet()
    tensors = quantizable_inputs(model)
    whole = collect(model, conv_batches(), tensors, threads=1)
    calls = []
    run = calib_sequential.collect_sequential
    monkeypatch.setattr(calib_sequential, "collect_sequential", lambda *a, **k: calls.append(1) or run(*a, **k))
    monkeypatch.setattr(qir, "EXTERNAL_DATA_THRESHOLD", 1)  # every model counts as large
    _assert_same(whole, collect(model, conv_batches(), tensors, threads=1))
    assert calls == [1]


def test_progress_follows_the_batches_and_skips_empty_ones():
    model = convnet()
    batches = conv_batches(3)
    batches.insert(1, {"image": np.zeros((0, 3, 8, 8), np.float32)})
    seen = []
    collect(model, batches, quantizable_inputs(model), sequential=True, progress=lambda b, s: seen.append((b, s)))
    assert seen == [(1, 2), (3, 5), (4, 7)]


def _spy_sequential(monkeypatch) -> list:
    calls = []
    run = calib_sequential.collect_sequential
    monkeypatch.setattr(calib_sequential, "collect_sequential", lambda *a, **k: calls.append(1) or run(*a, **k))
    return calls


def test_block_sequential_compile_gives_the_same_artifact(tmp_path, monkeypatch):
    from qcompiler.driver.compiler import compile

    source = tmp_path / "t.onnx"
    onnx.save(ir.serde.serialize_model(transformer(layers=2)), str(source))
    batches = transformer_batches()
    compile(str(source), tmp_path / "whole", pipeline="w8a8", calibration=batches, drift=False, cache_dir=None)
    calls = _spy_sequential(monkeypatch)
    compile(str(source), tmp_path / "seq", pipeline="w8a8", calibration=batches, drift=False, cache_dir=None, block_sequential=True)
    assert calls == [1]
    assert (tmp_path / "whole" / "model.onnx").read_bytes() == (tmp_path / "seq" / "model.onnx").read_bytes()


def test_block_sequential_from_the_command_line_and_config(tmp_path, monkeypatch):
    from qcompiler.tools.cli import main

    source = tmp_path / "c.onnx"
    onnx.save(ir.serde.serialize_model(convnet()), str(source))
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.concatenate([b["image"] for b in conv_batches(2)]))
    calls = _spy_sequential(monkeypatch)
    common = ["--pipeline", "calibrate", "--calib", str(data), "--no-drift", "--no-cache"]
    assert main(["compile", str(source), "-o", str(tmp_path / "a"), *common]) == 0
    assert calls == []
    assert main(["compile", str(source), "-o", str(tmp_path / "b"), "--block-sequential", *common]) == 0
    assert calls == [1]
    config = tmp_path / "build.toml"
    config.write_text("block-sequential = true\n")
    assert main(["compile", str(source), "-o", str(tmp_path / "c"), "--config", str(config), *common]) == 0
    assert calls == [1, 1]


def test_block_sequential_must_be_a_boolean(tmp_path):
    from qcompiler.driver.compiler import compile
    from qcompiler.errors import UserError

    with pytest.raises(UserError, match="block_sequential must be true or false"):
        compile("minilm-l6", tmp_path / "o", pipeline="w8a8", block_sequential="yes")


def test_mapped_weights_calibrate_one_block_at_a_time(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(ir.serde.serialize_model(transformer(layers=2)), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)  # the weights; axes and scalars stay inline
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)  # every external tensor stays mapped
    model = qir.load(folder / "model.onnx")
    assert qir.mapped_tensors(model)
    tensors = quantizable_inputs(model)
    whole = collect(model, transformer_batches(), tensors, threads=1, sequential=False)
    calls = _spy_sequential(monkeypatch)
    _assert_same(whole, collect(model, transformer_batches(), tensors, threads=1))
    assert calls == [1]
    assert qir.mapped_tensors(model)  # still mapped: the segments shared the tensors, read none into the model


@pytest.mark.slow
@pytest.mark.parametrize("bundled", ["minilm-l6", "smollm2-135m"])
def test_bundled_models_give_the_same_statistics_one_block_at_a_time(bundled, tmp_path, monkeypatch):
    """Through `compile`: each collection runs whole and one block at a time, and both must agree."""
    import qcompiler.analysis.calib_cache
    from qcompiler.driver.compiler import compile

    found = []

    def both(model, batches, tensors, **options):
        options.pop("sequential", None)
        batches = list(batches)
        whole = collect(model, batches, tensors, **options)
        sequential = collect(model, batches, tensors, sequential=True, **options)
        found.append((len(cut_segments(model, tensors)), [name for name in whole if not whole[name].equals(sequential[name])]))
        return whole

    here = Path(__file__).resolve()
    data = next((p / "shared" / "data" / "wikitext2-valid-excerpt.txt" for p in here.parents[1:4]
                 if (p / "shared" / "data" / "wikitext2-valid-excerpt.txt").is_file()), None)
    if data is None:
        pytest.skip("shared/data/wikitext2-valid-excerpt.txt is not there")
    monkeypatch.setattr(qcompiler.analysis.calib_cache, "collect", both)
    compile(bundled, tmp_path / "o", pipeline="calibrate", calibration=data, calib_count=8, drift=False, cache_dir=None)
    assert len(found) == 1 and found[0][0] >= 6 and found[0][1] == []


def test_dropping_values_removes_only_spilled_files(tmp_path):
    store = calib_sequential.CrossingStore(1, spill_bytes=0)
    mine = tmp_path / "mine.npy"
    np.save(mine, np.ones(4, np.float32))
    store.keep(0, "input", np.load(mine, mmap_mode="r"))  # a caller's memory-mapped array
    store.put(0, "h", np.zeros(4, np.float32))
    spilled = Path(store.values[0]["h"].filename)
    assert spilled.is_file()
    store.drop(["input", "h"])
    assert mine.is_file() and not spilled.exists()
    store.close()


def test_a_block_too_large_for_the_memory_left_is_named(monkeypatch):
    from qcompiler.errors import UserError
    from qcompiler.support import memory

    model = transformer(layers=2)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    with pytest.raises(UserError, match=r"block \d+ of \d+ \(from node '.+'\) needs 0\.\d\d GB for its weights and 0\.00 GB"):
        collect(model, transformer_batches(), quantizable_inputs(model), threads=1, sequential=True)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: no check
    collect(model, transformer_batches(), quantizable_inputs(model), threads=1, sequential=True)


# ---------------------------------------------------------------------------------------------
# Measurements (drift, the report, gates) of a large model, one block at a time


def test_a_model_runs_one_block_at_a_time_with_the_whole_models_outputs():
    from qcompiler.analysis import execute

    model = transformer(layers=3)
    feeds = transformer_batches(1)[0]
    inner = next(n for n in model.graph if n.op_type == "MatMul").outputs[0].name  # a value inside the first block
    names = [v.name for v in model.graph.outputs] + [inner]
    whole = execute.ort_session(ir.serde.deserialize_model(_exposing(model, inner))).run(names, feeds)
    by_blocks = execute.run_by_blocks(model, feeds, names, threads=1)
    assert list(by_blocks) == names
    for name, array in zip(names, whole):
        np.testing.assert_allclose(by_blocks[name], array, rtol=1e-5, atol=1e-5)


def _exposing(model: ir.Model, name: str) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    proto.graph.output.append(oh.make_tensor_value_info(name, F, None))
    return proto


def test_a_graph_without_blocks_is_left_to_the_whole_model_run():
    from qcompiler.analysis import execute

    model = _model(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        [oh.make_tensor_value_info("x", F, ["N", 4])], [oh.make_tensor_value_info("y", F, ["N", 3])],
        {"w": np.ones((4, 3), np.float32)},
    )
    assert execute.run_by_blocks(model, {"x": np.ones((2, 4), np.float32)}, ["y"]) is None


def test_a_large_models_drift_and_report_are_measured_one_block_at_a_time(tmp_path, monkeypatch):
    """Weights on disk: a report or a gate measures the model by blocks, as the whole-model run does."""
    import json

    from qcompiler.analysis import execute
    from qcompiler.driver.compiler import compile
    from qcompiler.ir import spill

    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(ir.serde.serialize_model(transformer(layers=3)), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    batches = transformer_batches()
    whole = compile(str(folder / "model.onnx"), tmp_path / "a", pipeline="w8a8", calibration=batches, report=tmp_path / "a.json", cache_dir=None)
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)  # the source's weights stay mapped
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 0)  # the codes a pass makes go to disk
    calls, on_disk = [], []
    run, kept = execute.run_by_blocks, spill.kept
    monkeypatch.setattr(execute, "run_by_blocks", lambda *a, **k: calls.append(1) or run(*a, **k))
    monkeypatch.setattr(spill, "kept", lambda array, name: on_disk.append(name) or kept(array, name))
    blocks = compile(str(folder / "model.onnx"), tmp_path / "b", pipeline="w8a8", calibration=batches, report=tmp_path / "b.json", cache_dir=None)
    assert len(calls) == len(blocks.records) + 1  # the model as it came in, then after each pass
    assert [r.drift for r in blocks.records] == [r.drift for r in whole.records] and blocks.records[-1].drift["cosine"] < 1
    layers = [json.loads((tmp_path / f"{x}.json").read_text())["layers"] for x in "ab"]
    errors = [[layer["error"] for layer in x] for x in layers]
    assert errors[0] == errors[1] and all(errors[0])
    # each layer's output was compared as its block ran, its float reference kept on disk
    linears = {layer["output"] for layer in layers[1] if layer["op"] == "MatMul"}
    assert linears and linears <= set(on_disk)
    gated = compile(str(folder / "model.onnx"), tmp_path / "c", pipeline="w8a8", calibration=batches, cache_dir=None,
                    require_data_probe=True)  # what an output-cosine gate asks for
    assert [r.drift for r in gated.records] == [r.drift for r in whole.records]
    plain = compile(str(folder / "model.onnx"), tmp_path / "d", pipeline="w8a8", calibration=batches, cache_dir=None)
    assert not any(r.drift for r in plain.records)  # not by default: each pass's drift would run every block again


def test_a_large_models_row_samples_wait_on_disk_and_give_the_same_artifact(tmp_path, monkeypatch):
    """Weights on disk: calibration's row samples, and smoothing's scaled ones, are mapped back from
    the scratch file (one mapping a pass), read only by the passes that use them; the same values,
    the same pass statistics, the same artifact bytes."""
    from qcompiler.driver.compiler import compile
    from qcompiler.ir import spill

    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(ir.serde.serialize_model(transformer(layers=2)), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    batches = transformer_batches()
    pipeline = "w8a8"  # smoothing searches alpha on the samples; quantize measures each input's SQNR on them
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)  # the source's weights stay mapped
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 0)
    mapped = spill.mapped
    monkeypatch.setattr(spill, "mapped", lambda arrays: list(arrays))  # the samples held in memory
    held = compile(str(folder / "model.onnx"), tmp_path / "a", pipeline=pipeline, calibration=batches, cache_dir=None)
    calls = []
    monkeypatch.setattr(spill, "mapped", lambda arrays: calls.append((arrays, mapped(arrays))) or calls[-1][1])
    on_disk = compile(str(folder / "model.onnx"), tmp_path / "b", pipeline=pipeline, calibration=batches, cache_dir=None)
    assert len(calls) == 2  # calibrate's samples, then smooth's scaled ones
    for arrays, views in calls:
        assert arrays and len(views) == len(arrays)
        for array, view in zip(arrays, views):
            assert isinstance(view, np.memmap) and not view.flags.writeable
            assert view.dtype == array.dtype and view.shape == array.shape and view.tobytes() == array.tobytes()
    assert [r.stats for r in on_disk.records] == [r.stats for r in held.records]  # alphas, SQNRs
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
