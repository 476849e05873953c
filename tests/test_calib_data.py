"""Calibration data: .npz / .txt / .tsv / image loading, and every bad-input case named in one line."""

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from qcompiler.analysis.calib_data import NO_TOKENIZER, load_calibration, validate_batches
from qcompiler.errors import UserError

STS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sts-pairs-dev.tsv"


def text_model() -> ir.Model:
    """input_ids, attention_mask [batch, seq] int64 -> masked embeddings."""
    emb = np.arange(40, dtype=np.float32).reshape(10, 4)
    nodes = [
        oh.make_node("Gather", ["E", "input_ids"], ["G"]),
        oh.make_node("Cast", ["attention_mask"], ["M"], to=onnx.TensorProto.FLOAT),
        oh.make_node("Unsqueeze", ["M", "axis"], ["U"]),
        oh.make_node("Mul", ["G", "U"], ["Y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "text",
        [
            oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]),
            oh.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "seq"]),
        ],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["batch", "seq", 4])],
        [onh.from_array(emb, "E"), onh.from_array(np.array([-1], np.int64), "axis")],
    )
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))


def float_model() -> ir.Model:
    """X float [N, T, 8] -> MatMul."""
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["X", "W"], ["Y"])],
        "float",
        [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", "T", 8])],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", "T", 2])],
        [onh.from_array(np.ones((8, 2), np.float32), "W")],
    )
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))


def image_model() -> ir.Model:
    graph = oh.make_graph(
        [oh.make_node("Relu", ["image"], ["Y"])],
        "image",
        [oh.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
    )
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))


class FakeTokenizer:
    """A bundled-model stand-in: one token per word (id = word length, capped at 9), padded per batch."""

    def __init__(self):
        self.calls = []

    def inputs_from_raw(self, samples):
        self.calls.append(list(samples))
        ids = [[min(len(w), 9) for w in s.split()] for s in samples]
        width = max(len(i) for i in ids)
        input_ids = np.zeros((len(ids), width), np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class FakeImages:
    def __init__(self):
        self.shapes = []

    def inputs_from_raw(self, images):
        self.shapes.append([im.shape for im in images])
        return {"image": np.stack([np.full((3, 4, 4), im.mean(), np.float32) for im in images])}


# --------------------------------------------------------------------------------------------
# Loading


def test_npz_first_count_samples_in_batches(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 5, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    batches = load_calibration(tmp_path / "calib.npz", 7, float_model(), batch_size=3)
    assert [b["X"].shape[0] for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["X"] for b in batches]), x[:7])


def test_npz_with_fewer_samples_than_asked_uses_them_all(tmp_path, caplog):
    np.savez(tmp_path / "calib.npz", X=np.zeros((3, 2, 8), np.float32))
    with caplog.at_level(logging.WARNING):
        batches = load_calibration(tmp_path / "calib.npz", 128, float_model())
    assert sum(b["X"].shape[0] for b in batches) == 3
    assert "fewer than the 128 asked for" in caplog.text


def test_npz_arrays_must_agree_on_samples(tmp_path):
    np.savez(tmp_path / "c.npz", input_ids=np.zeros((4, 3), np.int64), attention_mask=np.ones((5, 3), np.int64))
    with pytest.raises(UserError, match="disagree on the number of samples \\(first axis: input_ids: 4, attention_mask: 5\\)"):
        load_calibration(tmp_path / "c.npz", 8, text_model())


def test_txt_one_sample_a_line_skipping_empty_lines(tmp_path):
    (tmp_path / "c.txt").write_text("a b\n\nccc dd e\n   \nf\nnot used\n")
    tok = FakeTokenizer()
    batches = load_calibration(tmp_path / "c.txt", 3, text_model(), bundled=tok, batch_size=2)
    assert tok.calls == [["a b", "ccc dd e"], ["f"]]
    assert batches[0]["input_ids"].tolist() == [[1, 1, 0], [3, 2, 1]]
    assert batches[1]["attention_mask"].tolist() == [[1]]


def test_tsv_reads_sentence_columns_row_by_row(tmp_path):
    (tmp_path / "pairs.tsv").write_text(
        "source\tscore\tsent1\tsent2\n"
        'x\t2.5\tHe said "hi.\tShe said hi.\n'  # a lone quote stays text (QUOTE_NONE)
        "\n"
        "y\t4.0\tA man plays.\tA man is playing.\n"
    )
    tok = FakeTokenizer()
    load_calibration(tmp_path / "pairs.tsv", 3, text_model(), bundled=tok, batch_size=8)
    assert tok.calls == [['He said "hi.', "She said hi.", "A man plays."]]


def test_tsv_text_column(tmp_path):
    (tmp_path / "t.tsv").write_text("id\ttext\n1\tone two\n2\tthree\n")
    tok = FakeTokenizer()
    load_calibration(tmp_path / "t.tsv", 10, text_model(), bundled=tok)
    assert tok.calls == [["one two", "three"]]


def test_images_from_a_folder_in_name_order(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((6, 5, 3), 200, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.full((7, 4), 10, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    fake = FakeImages()
    batches = load_calibration(tmp_path, 5, image_model(), bundled=fake)
    assert fake.shapes == [[(7, 4), (6, 5, 3)]]
    assert batches[0]["image"][:, 0, 0, 0].tolist() == [10.0, 200.0]
    single = load_calibration(tmp_path / "b.png", 5, image_model(), bundled=FakeImages())
    assert single[0]["image"].shape == (1, 3, 4, 4)


# --------------------------------------------------------------------------------------------
# Bad files


def test_text_needs_a_bundled_model(tmp_path):
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(UserError) as err:
        load_calibration(tmp_path / "c.txt", 1, text_model())
    assert str(err.value) == NO_TOKENIZER
    assert str(err.value) == (
        "text calibration data needs a bundled model with a tokenizer; give an .npz of input arrays instead"
    )


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.txt", "\n  \n\n", "calibration set is empty: .* holds no samples"),
        ("c.tsv", "", "calibration set is empty: .* has no header row"),
        ("c.tsv", "id\tscore\n1\t2\n", "has no text column \\(header: id, score\\); name sentence columns"),
        ("c.tsv", "sent1\tsent2\na\tb\nc\n", "line 3 has 1 fields but the header has 2"),
        ("c.csv", "a,b\n", "unknown type '.csv'; give .npz, .txt, .tsv"),
        ("c.npz", "not a zip", "cannot read .* as .npz"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        load_calibration(tmp_path / name, 4, text_model(), bundled=FakeTokenizer())


def test_missing_path_and_bad_count(tmp_path):
    with pytest.raises(UserError, match="calibration data '.*nothere.npz' not found"):
        load_calibration(tmp_path / "nothere.npz", 4, float_model())
    (tmp_path / "c.txt").write_text("x\n")
    with pytest.raises(UserError, match="calibration count must be a positive integer, got 0"):
        load_calibration(tmp_path / "c.txt", 0, text_model(), bundled=FakeTokenizer())


def test_empty_image_folder(tmp_path):
    with pytest.raises(UserError, match="calibration set is empty: folder .* holds no images"):
        load_calibration(tmp_path, 4, image_model(), bundled=FakeImages())


# --------------------------------------------------------------------------------------------
# Bad batches


def _ids(n=2, seq=3, dtype=np.int64):
    return {"input_ids": np.ones((n, seq), dtype), "attention_mask": np.ones((n, seq), np.int64)}


def test_valid_batches_pass():
    validate_batches([_ids(), _ids(3, 5)], text_model())


def test_nan_names_input_and_sample():
    x = np.zeros((3, 2, 8), np.float32)
    bad = np.zeros((3, 2, 8), np.float32)
    bad[1, 0, 5] = np.nan
    with pytest.raises(UserError, match="calibration input 'X' has NaN at sample 4 \\(batch 1, row 1\\); remove or fix that sample"):
        validate_batches([{"X": x}, {"X": bad}], float_model())
    bad[1, 0, 5] = -np.inf
    with pytest.raises(UserError, match="has Inf at sample 1 \\(batch 0, row 1\\)"):
        validate_batches([{"X": bad}], float_model())


def test_nan_in_npz_file(tmp_path):
    x = np.zeros((5, 2, 8), np.float32)
    x[3, 1, 1] = np.nan
    np.savez(tmp_path / "c.npz", X=x)
    with pytest.raises(UserError, match="'X' has NaN at sample 3 \\(batch 1, row 1\\)"):
        load_calibration(tmp_path / "c.npz", 5, float_model(), batch_size=2)


@pytest.mark.parametrize("batches", [[], [{"X": np.zeros((0, 2, 8), np.float32)}], None])
def test_empty_calibration_set(batches):
    with pytest.raises(UserError, match="calibration set is empty; give at least one sample"):
        validate_batches(batches, float_model())


def test_missing_input_named_with_the_expected_ones():
    with pytest.raises(
        UserError, match="batch 0 lacks input 'attention_mask'; the model's inputs are input_ids, attention_mask"
    ):
        validate_batches([{"input_ids": np.ones((2, 3), np.int64)}], text_model())


def test_unexpected_input_named():
    batch = _ids()
    batch["token_type_ids"] = np.zeros((2, 3), np.int64)
    with pytest.raises(UserError, match="has input 'token_type_ids' that the model does not take; the model's inputs are input_ids, attention_mask"):
        validate_batches([batch], text_model())


def test_wrong_dtype():
    with pytest.raises(UserError, match="'input_ids' is int32 but the model takes int64; convert it \\(e.g. .astype\\(np.int64\\)\\)"):
        validate_batches([_ids(dtype=np.int32)], text_model())
    with pytest.raises(UserError, match="'X' is float64 but the model takes float32"):
        validate_batches([{"X": np.zeros((1, 2, 8))}], float_model())


def test_wrong_rank():
    with pytest.raises(UserError, match="'X' has rank 2 \\(shape \\(4, 8\\)\\) but the model takes rank 3 \\[N, T, 8\\]"):
        validate_batches([{"X": np.zeros((4, 8), np.float32)}], float_model())


def test_wrong_static_dim():
    with pytest.raises(UserError, match="'X' has size 7 on axis 2 .* but the model needs 8 there"):
        validate_batches([{"X": np.zeros((1, 2, 7), np.float32)}], float_model())


def test_inputs_disagree_on_a_named_dim():
    batch = {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 4), np.int64)}
    with pytest.raises(UserError, match="'input_ids' and 'attention_mask' disagree on dimension 'seq' \\(3 vs 4\\)"):
        validate_batches([batch], text_model())


def test_batch_must_be_a_dict():
    with pytest.raises(UserError, match="calibration batch 0 is a ndarray; each batch must be a dict"):
        validate_batches([np.zeros((2, 3))], text_model())


# --------------------------------------------------------------------------------------------
# Real data


@pytest.mark.slow
def test_sts_file_with_the_bundled_minilm():
    from qcompiler import models

    if not STS.exists():
        pytest.skip(f"{STS} not present")
    bundled = models.get("minilm-l6")
    model = text_model()
    batches = load_calibration(STS, 20, model, bundled=bundled, batch_size=8)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 4]
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    assert batches[0]["input_ids"][0, 0] == 101  # [CLS]
