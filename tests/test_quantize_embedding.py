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


def _int4_tied(tmp_path, out: str, embedding: str, width: int = 128, tied: bool = True):
    folder = tmp_path / f"src-{out}"
    folder.mkdir()
    path, arrays = _lookup_model(folder, tied=tied, width=width)
    ids = np.random.default_rng(2).integers(0, VOCAB, (8, 6)).astype(np.int64)
    result = qcompiler.compile(str(path), tmp_path / out, pipeline=f"int4{{embedding={embedding} rounding=nearest}}",
                               calibration=[{"ids": ids}], drift=False)
    return path, arrays, result


def test_a_table_tied_to_a_4_bit_head_reads_the_heads_codes_stored_once(tmp_path, monkeypatch):
    import qcompiler.passes.lower_ort as lower_ort

    path, arrays, shared = _int4_tied(tmp_path, "shared", "shared")
    stats = next(r.stats for r in shared.records if r.name == "quantize-embedding")
    assert stats["quantized"]["embed"]["shared_with"] == "head"
    artifact = onnx.load(str(tmp_path / "shared" / "model.onnx"))
    lookup = next(n for n in artifact.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in artifact.graph.node if n.op_type == "MatMulNBits")
    assert lookup.input[0] == head.input[1]  # one initializer of codes, read by both
    table = shared.manifest["embeddings"]["tables"]["embed"]
    assert table["shared_with"] == head.name and table["shape"] == [VOCAB, 128] and table["bytes"] < VOCAB * 128 // 2
    # what the table holds: the head's 4-bit weight, transposed (its rows: the head's columns)
    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)
    rows = ort.InferenceSession(_expose(tmp_path / "shared" / "model.onnx", "h"), providers=["CPUExecutionProvider"]).run(["h"], {"ids": ids})[0]
    head_weight = _dequantized_head(artifact, head)  # [K, N]
    np.testing.assert_allclose(rows, head_weight.T[ids], rtol=1e-6, atol=1e-6)
    assert np.abs(rows - arrays["table"][ids]).max() < 0.5  # a 4-bit grid away from the float table
    # the same numbers as the two copies it replaces
    monkeypatch.setattr(lower_ort, "share_tied_codes", lambda graph: 0)
    _, _, apart = _int4_tied(tmp_path, "apart", "shared")
    np.testing.assert_array_equal(_run(tmp_path / "shared" / "model.onnx", ids), _run(tmp_path / "apart" / "model.onnx", ids))
    saved = (tmp_path / "apart" / "model.onnx").stat().st_size - (tmp_path / "shared" / "model.onnx").stat().st_size
    assert saved >= VOCAB * 128 // 2 - 512  # the codes' copy, less the scales in the lookup's layout
    manifest = shared.manifest  # the shared table adds its bytes, not its entries: the head's weights count them
    assert manifest["effective_bits_per_weight_with_tables"] == round(8 * (manifest["weight_bytes"] + table["bytes"]) / manifest["weights"], 4)


def test_a_table_with_no_4_bit_head_to_share_gets_its_own_codes(tmp_path):
    _, _, untied = _int4_tied(tmp_path, "untied", "shared", tied=False)
    stats = next(r.stats for r in untied.records if r.name == "quantize-embedding")["quantized"]["embed"]
    assert "shared_with" not in stats and stats["shape"] == [VOCAB, 128]
    assert "shared_with" not in untied.manifest["embeddings"]["tables"]["embed"]


def _expose(path, name) -> bytes:
    model = onnx.load(str(path))
    model.graph.output.append(oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _dequantized_head(model, node) -> np.ndarray:
    """A 4-bit symmetric `MatMulNBits`' weight [K, N]: codes less 8, times the scale (fp16 [N, K / block], cast)."""
    from qcompiler.passes.lower_ort.mixed import unpack_nbits

    data = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    codes = unpack_nbits(data[node.input[1]].reshape(n, -1), k, 4).astype(np.float32)
    cast = next(c for c in model.graph.node if c.output[0] == node.input[2])
    scale = np.repeat(data[cast.input[0]].astype(np.float32).T, block, axis=0)
    return (codes - 8) * scale
