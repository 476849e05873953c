"""Models with external data: weights stay mapped from their files, nothing serializes the whole
model, large outputs keep their weights in one data file beside `model.onnx`, and missing or short
data files are named."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qcompiler.driver.compiler import compile
from qcompiler.errors import UserError
import qcompiler.ir as qir
from qcompiler.ir import spill

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_float_types import inputs, tiny_block  # noqa: E402


def _with_external_data(tmp_path, name="src", elem_type=TensorProto.FLOAT):
    folder = tmp_path / name
    folder.mkdir()
    onnx.save(tiny_block(elem_type), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    return folder / "model.onnx"


def _batches():
    return [{"x": inputs(8, seed)} for seed in range(2)]


def _on_disk(monkeypatch):
    """Compile as a large model: every external tensor stays mapped, every new constant is spilled."""
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 0)


def _content(folder) -> bytes:
    """The artifact's model with its external data read in: what a one-file model would hold."""
    model = onnx.load(str(folder / "model.onnx"))
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")  # set to DEFAULT when the data was read in
    return model.SerializeToString(deterministic=True)


def test_an_artifact_of_many_weights_keeps_them_in_a_data_file_with_the_same_content(tmp_path, monkeypatch):
    from qcompiler.codegen.ort import emit

    source = _with_external_data(tmp_path)
    one_file = compile(str(source), tmp_path / "a", pipeline="mixed{avg-bits=4.25}", calibration=_batches())
    monkeypatch.setattr(emit, "EXTERNAL_WEIGHTS_FROM", 1024)  # this model's weights pass it
    two_files = compile(str(source), tmp_path / "b", pipeline="mixed{avg-bits=4.25}", calibration=_batches())
    assert one_file.manifest["files"] == ["model.onnx"]
    assert two_files.manifest["files"] == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert _content(tmp_path / "a") == _content(tmp_path / "b")
    assert two_files.manifest["mixed_layers"] == one_file.manifest["mixed_layers"]  # resident bytes measured alike
    x = inputs(2, seed=5)
    runs = [ort.InferenceSession(str(tmp_path / f / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for f in ("a", "b")]
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("pipeline", ["w8a8", "mixed{avg-bits=4.25}"])
def test_mapped_weights_compile_to_the_same_bytes(tmp_path, monkeypatch, pipeline):
    source = _with_external_data(tmp_path)
    in_memory = compile(str(source), tmp_path / "a", pipeline=pipeline, calibration=_batches())
    _on_disk(monkeypatch)
    assert qir.mapped_tensors(qir.load(source))
    mapped = compile(str(source), tmp_path / "b", pipeline=pipeline, calibration=_batches())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "model.onnx"]
    assert mapped.manifest["files"] == ["model.onnx", "model.onnx.data"]  # weights on disk leave on disk
    assert _content(tmp_path / "a") == _content(tmp_path / "b")
    written = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    assert {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert mapped.manifest["source"]["sha256"] != in_memory.manifest["source"]["sha256"]  # hashed as files, streamed
    assert any(r.drift for r in in_memory.records)
    assert not any(r.drift for r in mapped.records)  # weights on disk: drift only for a report or a gate


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("pipeline", ["w8a8", "mixed{avg-bits=4.25}"])
def test_low_precision_weights_on_disk_compile_to_the_same_bytes(tmp_path, monkeypatch, pipeline, elem_type):
    """A float16/bfloat16 source whose weights stay on disk is read as float32 one weight at a time
    (`qcompiler.ir.deferred`), smoothed and folded without holding the results: same artifact."""
    source = _with_external_data(tmp_path, elem_type=elem_type)
    in_memory = compile(str(source), tmp_path / "a", pipeline=pipeline, calibration=_batches())
    _on_disk(monkeypatch)
    on_disk = compile(str(source), tmp_path / "b", pipeline=pipeline, calibration=_batches())
    assert _content(tmp_path / "a") == _content(tmp_path / "b")
    assert on_disk.manifest["float_type"] == in_memory.manifest["float_type"]


def test_weights_on_disk_are_read_as_float32_when_needed_and_not_kept(tmp_path, monkeypatch):
    from qcompiler.ir import deferred, float_types
    from qcompiler.ir.layers import linears, scale_constant

    source = _with_external_data(tmp_path, elem_type=TensorProto.FLOAT16)
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)
    model = qir.load(source)
    mapped = {v.name: v.const_value for v in model.graph.initializers.values()
              if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.dtype.is_floating_point()}
    float_types.to_float32(model, float_types.source_float_type(model))
    for name, file_tensor in mapped.items():
        tensor = model.graph.initializers[name].const_value
        assert isinstance(tensor, deferred.Deferred) and tensor.dtype == ir.DataType.FLOAT
        np.testing.assert_array_equal(tensor.numpy(), file_tensor.numpy().astype(np.float32))
        file_tensor.release()
    layer = linears(model.graph)[0]
    before = layer.w.const_value.numpy()
    factor = np.linspace(0.5, 2.0, before.shape[0], dtype=np.float32)[:, None]
    scale_constant(model.graph, layer.w, factor, layer.node, "scaled")
    scaled = layer.w.const_value
    assert isinstance(scaled, deferred.Deferred)  # still on disk: computed when read
    np.testing.assert_array_equal(scaled.numpy(), (before * factor).astype(np.float32))
    assert scaled.numpy() is not scaled.numpy()  # nothing kept between reads
    file_tensor = mapped[layer.w.name]
    assert file_tensor.raw is None  # the file's mapping is closed after each read


def test_new_constants_wait_on_disk_beside_the_output_and_go_with_the_model(tmp_path, monkeypatch):
    import gc

    source = _with_external_data(tmp_path)
    _on_disk(monkeypatch)
    result = compile(str(source), tmp_path / "out", pipeline="w8a8", calibration=_batches())
    assert any(isinstance(v.const_value, spill.Spilled) for v in result.model.graph.initializers.values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.spill-")]  # beside the output, still read
    del result
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_large_mixed_model_is_checked_without_folding_its_weights(tmp_path, monkeypatch):
    """ONNX Runtime's constant folding would hold a copy of every padded 4-bit weight: a model whose
    weights are on disk is checked without graph optimizations, and its resident bytes are not claimed."""
    source = _with_external_data(tmp_path)
    in_memory = compile(str(source), tmp_path / "a", pipeline="mixed{avg-bits=4.25}", calibration=_batches())
    _on_disk(monkeypatch)
    on_disk = compile(str(source), tmp_path / "b", pipeline="mixed{avg-bits=4.25}", calibration=_batches())
    assert all("bytes_resident" in layer for layer in in_memory.manifest["mixed_layers"].values())
    layers = on_disk.manifest["mixed_layers"]
    assert layers and all("bytes_resident" not in layer and layer["bytes_at_rest"] > 0 for layer in layers.values())
    session = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = inputs(2, seed=5)
    reference = ort.InferenceSession(str(tmp_path / "a" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], reference)


def test_an_output_inside_the_dump_folder_keeps_its_scratch_folder(tmp_path, monkeypatch):
    source = _with_external_data(tmp_path)
    _on_disk(monkeypatch)
    result = compile(str(source), tmp_path / "d" / "out", pipeline="w8a8", calibration=_batches(), dump_ir=tmp_path / "d")
    assert result.manifest["files"] == ["model.onnx", "model.onnx.data"]
    assert any((tmp_path / "d").glob("*.onnxtxt"))  # the dumps, beside the output


def test_a_full_disk_behind_another_error_is_still_named():
    import errno

    from qcompiler.errors import disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.onnx.data")
        except OSError as inner:
            raise RuntimeError("emitted model does not load") from inner
    except RuntimeError as outer:
        found = disk_full(outer)
    assert found is not None and found.exit_code == 2 and "holding /data/out is full" in str(found)
    assert disk_full(RuntimeError("other")) is None and disk_full(OSError(errno.EACCES, "denied")) is None


def test_large_output_keeps_weights_in_one_file_beside_the_model(tmp_path, monkeypatch):
    source = _with_external_data(tmp_path)
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)
    monkeypatch.setattr(qir, "EXTERNAL_DATA_THRESHOLD", 10_000)  # stands in for protobuf's 2 GB
    result = compile(str(source), tmp_path / "out", pipeline="w8a8", calibration=_batches())
    assert not any(r.drift for r in result.records)  # measured only for a report or a gate (by blocks)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert result.manifest["files"] == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    x = inputs(2, seed=99)
    got, want = session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.04


def test_canonicalize_keeps_large_weights_mapped_and_checked(tmp_path, monkeypatch):
    from qcompiler.passes.canonicalize import CanonicalizePass

    source = _with_external_data(tmp_path)
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)  # every external initializer counts as large
    model = qir.load(source)
    before = len(qir.mapped_tensors(model))
    CanonicalizePass()(model)
    assert before and len(qir.mapped_tensors(model)) == before  # checked, not read into memory
    (source.parent / "model.onnx.data").write_bytes(b"")  # the file no longer holds them: refused, named
    with pytest.raises(UserError, match="points its external data at 'model.onnx.data'"):
        CanonicalizePass()(model)


def test_missing_external_data_file_is_named(tmp_path):
    source = _with_external_data(tmp_path)
    (source.parent / "model.onnx.data").unlink()
    with pytest.raises(UserError, match=r"tensor 'ln.w'.* points its external data at 'model.onnx.data', a file that is missing beside the model"):
        qir.load(source)


def test_short_external_data_file_is_named_and_exits_2(tmp_path):
    source = _with_external_data(tmp_path)
    data = source.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"tensor 'down.w'.* points its external data at 'model.onnx.data', bytes \[\d+, \d+\) past the end of the file"):
        qir.load(source)
    cli = subprocess.run([sys.executable, "-m", "qcompiler.tools.cli", "compile", str(source), "-o", str(tmp_path / "out"),
                          "--pipeline", "w8a8"], capture_output=True, text=True)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "down.w" in cli.stderr
    assert not (tmp_path / "out").exists()


# A model with 2.16 GB of external data (over 2 GiB): two float32 MatMul weights, 16384 x 16384 and
# 16384 x 16640 (written in row blocks, never whole in memory). Compiled with w8a8 in a child
# process whose peak RSS is measured.
BIG_DIM, BIG_OUT = 16384, 16640
RSS_BOUND_GB = 5.0  # measured 2.26 GiB run alone, once 4.02 GiB inside a full slow-tier run; the target is 2.87 GiB (docs/real-size.md)


def _write_big_model(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    offset, inits = 0, []
    with open(folder / "model.onnx.data", "wb") as f:
        for name, cols in (("w1", BIG_DIM), ("w2", BIG_OUT)):
            for _ in range(0, BIG_DIM, 1024):
                f.write((rng.standard_normal((1024, cols), np.float32) * BIG_DIM**-0.5).tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[BIG_DIM, cols])
            tensor.data_location = TensorProto.EXTERNAL
            length = BIG_DIM * cols * 4
            for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)
            offset += length
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", BIG_DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", BIG_OUT])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(folder / "model.onnx"))
    np.savez(folder / "calib.npz", x=rng.standard_normal((8, BIG_DIM), np.float32))
    return folder / "model.onnx"


@pytest.mark.slow
def test_model_over_2gb_compiles_within_the_memory_bound(tmp_path):
    source = _write_big_model(tmp_path / "big")
    assert (source.parent / "model.onnx.data").stat().st_size > 2**31
    child = textwrap.dedent(f"""
        import json, resource, sys
        from qcompiler.driver.compiler import compile
        result = compile({str(source)!r}, {str(tmp_path / 'out')!r}, pipeline="w8a8",
                         calibration={str(source.parent / 'calib.npz')!r}, calib_count=8, drift=False)
        print(json.dumps({{"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           "files": result.manifest["files"], "sha256": result.manifest["source"]["sha256"]}}))
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    peak_gb = measured["peak_rss_kb"] / 2**20
    print(f"peak RSS {peak_gb:.2f} GiB for {(source.parent / 'model.onnx.data').stat().st_size / 2**30:.2f} GiB of source weights")
    assert peak_gb < RSS_BOUND_GB
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.ones((1, BIG_DIM), np.float32)})[0]
    assert np.isfinite(y).all()


W8A8_THEN = "canonicalize,calibrate,smooth,fold-scales{{unfoldable=unsmooth}},quantize,{},lower-ort"


@pytest.mark.parametrize("pipeline", ["mixed{avg-bits=4.25 rounding=gptq}", W8A8_THEN.format("tune-scales{steps=40}")],
                         ids=["gptq", "tune-scales"])
def test_learners_on_weights_on_disk_give_the_same_bytes(tmp_path, monkeypatch, pipeline):
    """`gptq` and `tune-scales` (which reads them as `flexround` does) read each block's float weights from the file (mapped
    or deferred) and its codes from the scratch file: the artifact is the one learned in memory."""
    source = _with_external_data(tmp_path, elem_type=TensorProto.FLOAT16)
    learner = pipeline.split(",")[-2].split("{")[0] if "rounding" not in pipeline else "gptq"
    in_memory = compile(str(source), tmp_path / "a", pipeline=pipeline, calibration=_batches())
    _on_disk(monkeypatch)
    on_disk = compile(str(source), tmp_path / "b", pipeline=pipeline, calibration=_batches())
    assert all(next(r for r in result.records if r.name == learner).modified for result in (in_memory, on_disk))
    assert _content(tmp_path / "a") == _content(tmp_path / "b")
