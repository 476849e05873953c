"""Embedding tables inside `allocate-bits`' budget (`embeddings=budget`, the `mixed` preset's
`embedding=budget`): each table stored as 4- or 8-bit codes (`qc.GatherQuantized`, lowered to ONNX
Runtime's `GatherBlockQuantized`), its width chosen with the layers' bits, the whole held to the
average; the report and the doctor list the tables as layers."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.analysis import bitcost
from qcompiler.errors import UserError
from qcompiler.pipeline.spec import parse_pipeline
from qcompiler.tools import doctor

VOCAB, WIDTH, HIDDEN = 512, 128, 256


def _lm(tmp_path, layers_on_a_2bit_grid: bool = False, seed: int = 0):
    """ids -> Gather(table) -> MatMul(w1) -> Relu -> MatMul(w2) -> y, with calibration ids;
    `layers_on_a_2bit_grid`: the layers' weights take 4 values, which 2 bits store exactly."""
    rng = np.random.default_rng(seed)
    arrays = {"table": rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32),
              "w1": rng.normal(0, 0.1, (WIDTH, HIDDEN)).astype(np.float32),
              "w2": rng.normal(0, 0.1, (HIDDEN, WIDTH)).astype(np.float32)}
    if layers_on_a_2bit_grid:
        for name in ("w1", "w2"):
            arrays[name] = (rng.integers(-2, 2, arrays[name].shape) * 0.05).astype(np.float32)
    nodes = [oh.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             oh.make_node("MatMul", ["e", "w1"], ["a"], name="up"),
             oh.make_node("Relu", ["a"], ["r"], name="act"),
             oh.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    graph = oh.make_graph(nodes, "lm", [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [onnx.numpy_helper.from_array(v, k) for k, v in arrays.items()])
    path = tmp_path / "lm.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=rng.integers(0, VOCAB, (8, 16)).astype(np.int64))
    return path, calib


def _compile(path, calib, out, pipeline, **kwargs):
    return qcompiler.compile(str(path), out, pipeline=pipeline, calibration=str(calib), drift=False, cache_dir=None, **kwargs)


def _stats(result, name="allocate-bits"):
    return next(r.stats for r in result.records if r.name == name)


def _run(path, ids):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_tables_and_layers_together_hold_the_average_and_run_packed(tmp_path):
    path, calib = _lm(tmp_path)
    result = _compile(path, calib, tmp_path / "out", "mixed{avg-bits=4.5 embedding=budget}")
    stats = _stats(result)
    assert stats["tables"] == {"embed": 4}
    table = stats["per_layer"]["embed"]
    assert table["embedding"] and table["stored_bits"] == bitcost.table_bits(VOCAB, WIDTH, 4, 32)
    assert stats["predicted_bits_per_weight"] <= 4.5
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["embeddings"]["tables"]["embed"]["bits"] == 4
    assert manifest["effective_bits_per_weight_with_tables"] <= 4.5  # the bytes written, tables and layers
    # the layers pay for the table's 5.125 bits a weight: below the average on their own
    assert manifest["effective_bits_per_weight"] < 4.0
    artifact = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert "GatherBlockQuantized" in [n.op_type for n in artifact.graph.node]
    assert "table" not in {t.name for t in artifact.graph.initializer}
    ids = np.array([[0, 5, 511, 7]], np.int64)
    got, want = _run(tmp_path / "out" / "model.onnx", ids), _run(path, ids)
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.9, cosine


def test_the_table_takes_8_bits_where_the_layers_need_few(tmp_path):
    """With Gaussian layers the bits are worth more in the layers (the table takes 4); with layers
    that 2 bits store exactly, the table's 8 bits cost the layers no error."""
    gaussian_dir, grid_dir = tmp_path / "gaussian", tmp_path / "grid"
    gaussian_dir.mkdir(), grid_dir.mkdir()
    gaussian = _stats(_compile(*_lm(gaussian_dir), tmp_path / "g", "mixed{avg-bits=6 embedding=budget}"))
    grid = _stats(_compile(*_lm(grid_dir, layers_on_a_2bit_grid=True), tmp_path / "q", "mixed{avg-bits=6 embedding=budget}"))
    assert gaussian["tables"] == {"embed": 4} and grid["tables"] == {"embed": 8}
    assert grid["predicted_bits_per_weight"] <= 6.0


def test_a_kept_table_takes_8_bits_on_top_of_the_budget(tmp_path):
    path, calib = _lm(tmp_path)
    stats = _stats(_compile(path, calib, tmp_path / "out", "canonicalize,calibrate,allocate-bits{avg-bits=4.5 embeddings=budget "
                                                             "keep=table},quantize-weights,lower-ort"))
    assert stats["tables"] == {"embed": 8} and stats["per_layer"]["embed"]["kept"] and "table" in stats["kept_layers"]


def test_apart_leaves_the_allocation_as_before(tmp_path):
    path, calib = _lm(tmp_path)
    stats = _stats(_compile(path, calib, tmp_path / "out", "mixed{avg-bits=4.5}"))
    assert "tables" not in stats and set(stats["per_layer"]) == {"up", "down"}


def test_a_budget_that_cannot_hold_the_tables_is_one_line(tmp_path):
    path, calib = _lm(tmp_path)
    with pytest.raises(UserError, match=r"cannot hold the embedding tables \(at 4 bits at least\) and the layers together"):
        _compile(path, calib, tmp_path / "out", "mixed{avg-bits=2.2 embedding=budget}")


def test_targets_without_a_quantized_lookup_refuse_tables_in_the_budget():
    from codegen.triton.cost import TRITON

    allocator = parse_pipeline("allocate-bits{embeddings=budget}")[0]
    with pytest.raises(UserError, match="target 'triton' has no quantized lookup: use embeddings=apart"):
        allocator.check_target(TRITON)
    allocator.check_target(bitcost.ORT)


def test_learned_rounding_reads_the_stored_table_and_aims_at_the_float_one(tmp_path):
    """The learners' block interpreter runs a `qc.GatherQuantized` from the table `quantize-weights`
    stored on the quantized stream, and from the float table it kept (`FLOAT_WEIGHT_KEY`) for the
    float targets; flexround then learns past it."""
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes
    from qcompiler.dialect.qc_ops import gather_quantized
    from qcompiler.ir.meta import FLOAT_WEIGHT_KEY
    from qcompiler.passes.quantize_embedding import quantize_table
    from qcompiler.pipeline.context import CompileContext, using
    from qcompiler.pipeline.pass_manager import run_pipeline

    path, calib = _lm(tmp_path)
    model = qcompiler.load(str(path))
    table = model.graph.initializers["table"].const_value.numpy().copy()
    result = _compile(path, calib, tmp_path / "out", "canonicalize,calibrate,allocate-bits{avg-bits=4.5 embeddings=budget},"
                                                     "quantize-weights,flexround{steps=5},lower-ort")
    assert _stats(result, "flexround")["per_block"][0]["kept"] in ("learned", "round-to-nearest")
    with using(CompileContext(calibration=[{"ids": np.load(calib)["ids"]}])):
        run_pipeline(model, parse_pipeline("canonicalize,calibrate,allocate-bits{avg-bits=4.5 embeddings=budget},quantize-weights"), [])
    lookup = next(n for n in model.graph if n.op_type == "GatherQuantized")
    np.testing.assert_array_equal(lookup.meta[FLOAT_WEIGHT_KEY].numpy(), table)
    constants, ids = Constants(), torch.tensor([[3, 511]])
    float_rows = run_nodes([lookup], {"ids": ids}, constants.float_table, constants)[lookup.outputs[0].name]
    stored_rows = run_nodes([lookup], {"ids": ids}, constants.quantized_table, constants)[lookup.outputs[0].name]
    np.testing.assert_array_equal(float_rows.numpy(), table[[[3, 511]]])
    codes, scale, zero = quantize_table(table, 4, 32)
    np.testing.assert_allclose(stored_rows.numpy(), gather_quantized(codes, [[3, 511]], scale, zero, 32), rtol=1e-6)


def test_the_doctor_lists_the_table_as_a_layer(tmp_path):
    path, calib = _lm(tmp_path)
    result = doctor.diagnose(str(path), "mixed{avg-bits=4.5 embedding=budget}", calibration=str(calib), bits_only=True, cache_dir=None)
    rows = {row["layer"]: row for row in result["layers"]}
    assert set(rows) == {"table", "w1", "w2"}
    assert rows["table"]["embedding"] and rows["table"]["bits"] == pytest.approx(5.125) and rows["table"]["alone"] > 0


def test_the_report_lists_the_table_with_its_width_and_error(tmp_path):
    path, calib = _lm(tmp_path)
    _compile(path, calib, tmp_path / "out", "mixed{avg-bits=4.5 embedding=budget}", report=tmp_path / "out" / "r.json")
    body = json.loads((tmp_path / "out" / "r.json").read_text())
    table = body["layers"][0]
    assert (table["name"], table["op"], table["weight_shape"]) == ("embed", "Gather", [VOCAB, WIDTH])
    weight = table["weight"]
    assert weight["format"] == "int4" and weight["group_size"] == 32 and weight["predicted_error"] > 0
    assert weight["stored_bits_per_weight"] == pytest.approx(bitcost.table_bits(VOCAB, WIDTH, 4, 32) / (VOCAB * WIDTH))
    assert 15 < weight["sqnr_db"] < 30 and 0.99 < table["error"]["cosine"] < 1  # 4-bit rows, looked up as stored


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
def test_minilm_at_6_bits_with_its_tables_gives_them_4_and_the_layers_the_rest(tmp_path):
    """MiniLM's two stored tables (word and position) hold 53 % of its weights: at 6 bits overall
    4-bit tables leave the layers 6.9 bits, and the sentence embeddings stay within 1 Spearman point."""
    from qcompiler.tools.evaluate import evaluate

    if not SHARED.is_dir():
        pytest.skip("needs ../shared/data")
    result = qcompiler.compile("minilm-l6", tmp_path / "m", pipeline="mixed{avg-bits=6 embedding=budget}",
                               calibration=str(SHARED / "wikitext2-valid-excerpt.txt"), drift=False, cache_dir=None)
    stats = _stats(result)
    assert stats["tables"] and set(stats["tables"].values()) == {4}
    assert result.manifest["effective_bits_per_weight_with_tables"] <= 6.0 < result.manifest["effective_bits_per_weight"]
    scores = evaluate(tmp_path / "m", "sts", SHARED / "sts-pairs-dev.tsv", model="minilm-l6")
    assert scores["spearman_compiled"] > scores["spearman_float"] - 1.0, scores


def test_a_model_wide_budget_measures_the_tables_sensitivity_too(tmp_path):
    """scope=model sensitivity=output: the table's errors are rescaled by its measured effect on the
    output like a layer's, and tables and layers together still hold the average."""
    path, calib = _lm(tmp_path)
    stats = _stats(_compile(path, calib, tmp_path / "out", "mixed{avg-bits=4.5 embedding=budget scope=model sensitivity=output}"))
    assert set(stats["sensitivity"]["factor"]) == {"embed", "up", "down"}
    assert stats["sensitivity"]["factor"]["embed"] > 0 and stats["predicted_bits_per_weight"] <= 4.5
    assert stats["tables"] == {"embed": 4}
