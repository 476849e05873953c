"""`quantize-embedding`: embedding tables as 4- or 8-bit codes (`qc.GatherQuantized`), lowered to
ONNX Runtime's `GatherBlockQuantized`, which computes the same numbers as the op's reference."""

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.dialect.qc_ops import gather_quantized
from qcompiler.errors import UserError
from qcompiler.passes.lower_ort.mixed import pack_nbits
from qcompiler.passes.quantize_embedding import quantize_table

VOCAB, WIDTH = 40, 64


def _lookup_model(tmp_path, tied: bool = False, width: int = WIDTH):
    """ids -> Gather(table) -> MatMul(w) -> y; `tied`: the head reads the table too (Transpose)."""
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (VOCAB, width)).astype(np.float32)
    arrays = {"table": table}
    nodes = [oh.make_node("Gather", ["table", "ids"], ["h"], name="embed")]
    if tied:
        nodes += [oh.make_node("Transpose", ["table"], ["head_w"], name="tie", perm=[1, 0]),
                  oh.make_node("MatMul", ["h", "head_w"], ["y"], name="head")]
    else:
        arrays["w"] = rng.normal(0, 0.2, (width, 16)).astype(np.float32)
        nodes.append(oh.make_node("MatMul", ["h", "w"], ["y"], name="proj"))
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in arrays.items()]
    graph = oh.make_graph(nodes, "lookup", [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    path = tmp_path / "lookup.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path))
    return path, arrays


def _run(path, ids):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_codes_reconstruct_each_block_within_half_a_step():
    table = np.random.default_rng(1).normal(0, 1, (8, 64)).astype(np.float32)
    for bits in (4, 8):
        codes, scale, zero = quantize_table(table, bits, 32)
        assert codes.dtype == np.uint8 and codes.max() < (1 << bits) and scale.shape == zero.shape == (8, 2)
        error = gather_quantized(codes, np.arange(8), scale, zero, 32) - table
        step = np.repeat(scale, 32, axis=1)
        assert np.all(np.abs(error) <= step / 2 + 1e-6)


def test_low_nibble_first_packing():
    codes = np.array([[1, 2, 3, 15, 7]], np.uint8)
    np.testing.assert_array_equal(pack_nbits(codes.T, 4), [[0x21, 0xF3, 0x07]])  # a row, as GatherBlockQuantized reads it


@pytest.mark.parametrize("bits", [4, 8])
def test_lowered_lookup_equals_the_reference_and_stays_packed(tmp_path, bits):
    path, arrays = _lookup_model(tmp_path)
    result = qcompiler.compile(str(path), tmp_path / "out", pipeline=f"canonicalize,quantize-embedding{{bits={bits}}},lower-ort", drift=False)
    stats = next(r.stats for r in result.records if r.name == "quantize-embedding")
    assert stats["tables"] == 1 and stats["kept_in_float"] == {}
    artifact = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [n.op_type for n in artifact.graph.node] == ["GatherBlockQuantized", "MatMul"]
    data = {t.name: onnx.numpy_helper.to_array(t) for t in artifact.graph.initializer}
    assert "table" not in data and data["embed.codes"].shape == (VOCAB, WIDTH * bits // 8)
    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)
    codes, scale, zero = quantize_table(arrays["table"], bits, 32)
    expected = gather_quantized(codes, ids, scale, zero, 32) @ arrays["w"]
    np.testing.assert_allclose(_run(tmp_path / "out" / "model.onnx", ids), expected, rtol=1e-5, atol=1e-5)
    error = np.abs(_run(tmp_path / "out" / "model.onnx", ids) - _run(path, ids)).max()
    assert error < (0.5 if bits == 4 else 0.05), error


def test_a_tied_head_keeps_its_float_copy(tmp_path):
    tied, arrays = _lookup_model(tmp_path, tied=True)
    result = qcompiler.compile(str(tied), tmp_path / "tied", pipeline="canonicalize,quantize-embedding{bits=8},lower-ort", drift=False)
    assert next(r.stats for r in result.records if r.name == "quantize-embedding")["tables"] == 1
    ids = np.array([[3, 4]], np.int64)
    codes, scale, zero = quantize_table(arrays["table"], 8, 32)
    expected = gather_quantized(codes, ids, scale, zero, 32) @ arrays["table"].T  # the head in float
    np.testing.assert_allclose(_run(tmp_path / "tied" / "model.onnx", ids), expected, rtol=1e-4, atol=1e-4)


def test_shared_and_ragged_tables_stay_float_with_a_reason(tmp_path):
    path, _ = _lookup_model(tmp_path)
    model = onnx.load(str(path))
    model.graph.node.append(oh.make_node("Gather", ["table", "ids"], ["h2"], name="embed2"))
    model.graph.output.append(oh.make_tensor_value_info("h2", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    result = qcompiler.compile(str(path), tmp_path / "shared", pipeline="canonicalize,quantize-embedding,lower-ort", drift=False)
    kept = next(r.stats for r in result.records if r.name == "quantize-embedding")["kept_in_float"]
    assert kept == {"embed": "the table is also read by embed2", "embed2": "the table is also read by embed"}
    ragged_dir = tmp_path / "ragged"
    ragged_dir.mkdir()
    ragged, _ = _lookup_model(ragged_dir, width=48)
    result = qcompiler.compile(str(ragged), tmp_path / "r", pipeline="canonicalize,quantize-embedding,lower-ort", drift=False)
    kept = next(r.stats for r in result.records if r.name == "quantize-embedding")["kept_in_float"]
    assert kept == {"embed": "width 48 is not a multiple of block-size 32"}


def test_bad_block_size_is_one_line():
    from qcompiler.pipeline.spec import parse_pipeline

    with pytest.raises(UserError, match="block-size must be a power of 2, at least 16, got 24"):
        parse_pipeline("quantize-embedding{block-size=24}")
