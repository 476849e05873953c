"""The quantization report: report.json (schema qcompiler.tools.report/2) and the offline report.html."""

import json
import re
import shutil
import subprocess

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import qcompiler
from qcompiler.analysis import probe
from qcompiler.analysis.placement import NO_INTEGER_CONV_TRANSPOSE
from qcompiler.tools import report as reports
from qcompiler.tools.cli import main
from qcompiler.tools.report_html import BAR_COLOR, LINE_COLOR, bits_color, render

HOSTILE = '<script>alert("x")</script>&\'q'
VOCAB, D, F = 64, 128, 256


def _transformer(seed: int = 0) -> onnx.ModelProto:
    """Embedding, one attention block (Q/K/V/O, scores and mixing are activation x activation),
    an MLP and an LM head; one layer's node carries a hostile name."""
    rng = np.random.default_rng(seed)

    def w(name, k, n, scale=None):
        array = rng.normal(0, scale or 1 / np.sqrt(k), (k, n)).astype(np.float32)
        return onnx.numpy_helper.from_array(array, name)

    gamma = np.ones(D, np.float32)
    gamma[3] = 12.0  # an outlier channel for smoothing to find
    inits = [
        w("embed", VOCAB, D, 1.0), w("wq", D, D), w("wk", D, D), w("wv", D, D), w("wo", D, D),
        w("wup", D, F), w("wdown", F, D), w("whead", D, VOCAB),
        onnx.numpy_helper.from_array(gamma, "gamma"), onnx.numpy_helper.from_array(np.zeros(D, np.float32), "beta"),
        onnx.numpy_helper.from_array(np.array(1 / np.sqrt(D), np.float32), "inv_sqrt_d"),
    ]
    nodes = [
        oh.make_node("Gather", ["embed", "ids"], ["x"], name="embedding"),
        oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="norm1"),
        oh.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        oh.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        oh.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
        oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        oh.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="scores"),
        oh.make_node("Mul", ["scores_raw", "inv_sqrt_d"], ["scores_scaled"], name="scale"),
        oh.make_node("Softmax", ["scores_scaled"], ["probs"], axis=-1, name="softmax"),
        oh.make_node("MatMul", ["probs", "v"], ["mixed"], name="mix"),
        oh.make_node("MatMul", ["mixed", "wo"], ["attn"], name=HOSTILE),
        oh.make_node("Add", ["x", "attn"], ["x2"], name="residual1"),
        oh.make_node("LayerNormalization", ["x2", "gamma", "beta"], ["h2"], axis=-1, name="norm2"),
        oh.make_node("MatMul", ["h2", "wup"], ["up"], name="up_proj"),
        oh.make_node("Relu", ["up"], ["act"], name="relu"),
        oh.make_node("MatMul", ["act", "wdown"], ["down"], name="down_proj"),
        oh.make_node("Add", ["x2", "down"], ["x3"], name="residual2"),
        oh.make_node("MatMul", ["x3", "whead"], ["logits"], name="lm_head"),
    ]
    graph = oh.make_graph(
        nodes, "tiny_lm",
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)


def _convnet() -> onnx.ModelProto:
    """Conv + BatchNorm + Relu, Conv, ConvTranspose (which no pass quantizes)."""
    rng = np.random.default_rng(3)
    arrays = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "bn_scale": rng.uniform(0.5, 2, 8), "bn_bias": rng.normal(0, 0.1, 8),
        "bn_mean": rng.normal(0, 0.1, 8), "bn_var": rng.uniform(0.5, 1.5, 8),
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)), "wt": rng.normal(0, 0.2, (8, 4, 2, 2)),
    }
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arrays.items()]
    nodes = [
        oh.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"], name="bn1"),
        oh.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        oh.make_node("ConvTranspose", ["c2", "wt"], ["up"], strides=[2, 2], name="upsample"),
    ]
    graph = oh.make_graph(
        nodes, "tiny_unet",
        [oh.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [2, 3, 16, 16])],
        [oh.make_tensor_value_info("up", onnx.TensorProto.FLOAT, [2, 4, 32, 32])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)


def _ids(seed: int, batch: int = 4, seq: int = 16) -> dict:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)}


def _compile(tmp, name, pipeline, model=None, report="report.html", source=None, **kwargs):
    model = model if model is not None else _transformer()
    path = tmp / f"{source or name}.onnx"
    onnx.save(model, str(path))
    is_conv = model.graph.name == "tiny_unet"
    if is_conv:
        rng = np.random.default_rng(5)
        calib = [{"image": rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
        probe = {"image": np.random.default_rng(6).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)}
    else:
        calib, probe = [_ids(s) for s in range(4)], _ids(99, 2, 12)
    out = tmp / name
    result = qcompiler.compile(str(path), out, pipeline=pipeline, calibration=calib, probe_inputs=probe,
                               report=out / report if report else None, **kwargs)
    body = json.loads(reports.report_paths(out / report)[0].read_text()) if report else None
    return result, body, out


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("w8a8"), "w8a8", "w8a8{alpha=auto float-inputs=1}")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("mixed"), "mixed", "calibrate,allocate-bits{avg-bits=4 group-size=64},quantize-weights")


LAYERS = ["q_proj", "k_proj", "v_proj", HOSTILE, "up_proj", "down_proj", "lm_head"]


def _linears(body) -> list[dict]:
    """The report's layers but the embedding lookups."""
    return [layer for layer in body["layers"] if layer["op"] != "Gather"]


def test_w8a8_report(w8a8):
    result, body, out = w8a8
    assert body["schema"] == reports.REPORT_SCHEMA == "qcompiler.tools.report/2"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.html", "report.json"]
    assert sorted(p.name for p in result.files) == ["manifest.json", "model.onnx", "report.html", "report.json"]
    # v1 fields stay
    assert body["manifest"] == json.loads((out / "manifest.json").read_text())
    assert set(body["timings"]) == {"capture_s", "pipeline_s"}
    assert [p["name"] for p in body["passes"]] == ["canonicalize", "calibrate", "smooth", "fold-scales", "quantize", "lower-ort"]
    assert all({"index", "spec", "seconds", "modified", "stats", "drift"} <= set(p) for p in body["passes"])
    assert body["passes"][0]["drift"]["sqnr_db"] is None or body["passes"][0]["drift"]["sqnr_db"] > 100
    assert body["summary"]["output"] == body["passes"][-1]["drift"]
    # layers, in graph order, with what was chosen and what it cost
    assert [layer["name"] for layer in body["layers"]] == LAYERS  # the table left in float is in float_nodes only
    assert body["probe"]["layer_reference"] == "fold-scales"
    for layer in _linears(body):
        weight, error = layer["weight"], layer["error"]
        assert weight["format"] == "int8" and weight["bits"] == 8 and weight["grid"] == "absmax-symmetric"
        assert weight["bits_histogram"] == {"8": layer["channels"]} and weight["channel_bits"] is None
        assert 8 < weight["stored_bits_per_weight"] < 10  # int8 codes plus one fp32 scale per output channel
        assert 30 < weight["sqnr_db"] < 60
        assert error["sqnr_db"] is not None and 10 < error["sqnr_db"] < 60 and 0.99 < error["cosine"] < 1
    smoothed = {layer["name"]: layer["smooth"] for layer in body["layers"] if layer["smooth"]}
    assert smoothed["q_proj"]["alpha"] == smoothed["k_proj"]["alpha"]  # one scale for the shared input
    assert sorted(smoothed["q_proj"]["shared_with"]) == ["k_proj", "v_proj"]
    assert smoothed["q_proj"]["act_absmax_after"] < smoothed["q_proj"]["act_absmax_before"]
    # float: the embedding, the two activation x activation MatMuls, one activation by float-inputs=1
    reasons = {(n["name"], n["part"]): n["reason"] for n in body["float_nodes"]}
    assert "embedding=int8" in reasons[("embedding", "weight")]
    assert "both operands are computed at run time" in reasons[("scores", "node")]
    assert "both operands are computed at run time" in reasons[("mix", "node")]
    kept = [name for name, part in reasons if part == "activation"]
    assert len(kept) >= 1 and "float-inputs=1" in reasons[(kept[0], "activation")]
    assert {layer["name"]: layer["activation"]["format"] for layer in body["layers"]}[kept[0]] == "float"
    size = body["size"]
    assert size["float_weight_bytes"] == 4 * sum(int(np.prod(layer["weight_shape"])) for layer in _linears(body))
    assert size["artifact_weight_bytes"] == result.manifest["weight_bytes"] < size["float_weight_bytes"]
    assert size["effective_bits_per_weight"] == result.manifest["effective_bits_per_weight"]
    assert size["artifact_file_bytes"] == (out / "model.onnx").stat().st_size


def test_mixed_report(mixed):
    _, body, _ = mixed
    assert body["probe"]["layer_reference"] == "allocate-bits"
    for layer in _linears(body):
        weight = layer["weight"]
        assert weight["format"] == "mixed" and weight["group_size"] == 64 and weight["grid"] == "mse"
        bits = reports.decode_channel_bits(weight["channel_bits"])
        assert len(bits) == layer["channels"] == layer["weight_shape"][0]
        assert weight["bits_histogram"] == reports._histogram(bits)
        assert sum(c["channels"] for c in weight["classes"]) == layer["channels"]
        assert weight["fp16_channels"] == int(np.sum(bits == 16)) >= 1
        assert weight["sparse_outliers"] > 0
        assert abs(weight["mean_bits"] - float(np.mean(bits))) < 1e-4
        assert layer["activation"]["format"] == "float" and "weight-only" in layer["activation"]["float_reason"]
        assert layer["error"]["sqnr_db"] is not None and 0 < layer["error"]["sqnr_db"] < 40
    assert 3.5 < body["size"]["effective_bits_per_weight"] <= 4.0
    assert body["size"]["compression"] > 7


def test_layer_sqnr_follows_bits(tmp_path):
    """Same model, all channels at 8 bits against all at 2: every layer's output SQNR is higher at 8.
    Runs without per-pass drift: the layer errors are still measured."""
    errors = {}
    for bits in (2, 8):
        pipeline = f"calibrate,allocate-bits{{avg-bits=10 candidates={bits} group-size=64 outliers-act=0 outliers-weight=0}},quantize-weights"
        _, body, _ = _compile(tmp_path, f"b{bits}", pipeline, report="r.json", drift=False)
        assert all(p["drift"] is None for p in body["passes"])
        for layer in _linears(body):
            assert layer["weight"]["bits"] == bits and layer["weight"]["bits_histogram"] == {str(bits): layer["channels"]}
        errors[bits] = {layer["name"]: layer["error"]["sqnr_db"] for layer in _linears(body)}
    for name in LAYERS:
        assert errors[8][name] > errors[2][name] + 15, name


def test_conv_report(tmp_path):
    _, body, _ = _compile(tmp_path, "conv", "w8a8", model=_convnet())
    layers = {layer["name"]: layer for layer in body["layers"]}
    assert [layer["op"] for layer in body["layers"]] == ["Conv", "Conv", "ConvTranspose"]
    assert layers["conv1"]["channels"] == 3 and layers["conv2"]["channels"] == 8
    for name in ("conv1", "conv2"):
        assert layers[name]["weight"]["format"] == "int8" and 20 < layers[name]["error"]["sqnr_db"] < 60
    assert layers["upsample"]["weight"]["format"] == "float"
    assert body["float_nodes"] == [{"name": "upsample", "op": "ConvTranspose", "part": "weight",
                                    "reason": f"left in float by quantize: {NO_INTEGER_CONV_TRANSPOSE}"}]


def test_default_pipeline_is_exact_and_report_is_deterministic_apart_from_timings(tmp_path):
    texts = []
    for name in ("a", "b"):
        _, body, out = _compile(tmp_path, name, "default", report="../" + name + "-report.json", source="same")
        assert all(layer["error"]["sqnr_db"] is None and layer["error"]["cosine"] == 1.0 for layer in body["layers"])
        assert all(layer["weight"]["format"] == "float" for layer in body["layers"])
        reasons = {n["reason"] for n in body["float_nodes"] if n["part"] == "weight" and n["op"] == "MatMul"}
        assert reasons == {"the pipeline has no quantizing pass"}
        body.pop("timings")
        for record in body["passes"]:
            record.pop("seconds")
        texts.append(reports.to_json(body))
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert texts[0] == texts[1]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_html_escapes_names_and_is_offline(w8a8, mixed):
    for _, body, out in (w8a8, mixed):
        page = (out / "report.html").read_text()
        assert page == render(body)
        assert "<script" not in page.lower()
        assert html_escaped(HOSTILE) in page
        assert not re.search(r"https?:", page)
        for ref in re.findall(r"""(?:href|src|url)\s*[=(]\s*["']?([^"' )>]+)""", page):
            assert ref.startswith("data:image/png;base64,"), ref
        assert "@import" not in page and "<link" not in page and "<iframe" not in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_paths_and_bad_name(tmp_path, tiny_onnx, capsys):
    assert reports.report_paths("a/r.html") == (reports.Path("a/r.json"), reports.Path("a/r.html"))
    assert reports.report_paths("r.JSON") == (reports.Path("r.JSON"), None)
    assert main(["compile", str(tiny_onnx), "-o", str(tmp_path / "o"), "--report", str(tmp_path / "r.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "must end in .json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    # outside the artifact: written beside, atomically
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "o"), "--report", str(tmp_path / "rep" / "r.html")]) == 0
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["r.html", "r.json"]
    assert json.loads((tmp_path / "rep" / "r.json").read_text())["schema"] == "qcompiler.tools.report/2"


def test_padding_positions_are_left_out_of_layer_errors():
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    recorder = reports.Recorder({"attention_mask": mask})
    recorder.quantized = True
    reference = np.random.default_rng(0).normal(0, 1, (2, 3, 4)).astype(np.float32)
    actual = reference.copy()
    actual[0, 2] += 100.0  # a padding position moved far
    error = recorder._layer_error("y", reference, actual)
    assert error["sqnr_db"] is None and error["cosine"] == 1.0
    assert probe.valid_positions({"attention_mask": np.ones((2, 3))}) is None
    assert probe.valid_positions({"input_ids": mask}) is None


def test_clean_rounds_and_drops_non_finite():
    assert reports.clean({"a": np.float32(1.23456789), "b": float("inf"), "c": (np.int64(3), np.nan), 4: True}) == {
        "a": 1.23457, "b": None, "c": [3, None], "4": True,
    }


def _png_pixels(path):
    try:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    except ImportError:  # PNG decoding without Pillow: 8-bit RGB(A), filters undone by hand
        return _decode_png(path.read_bytes())


def _decode_png(data: bytes) -> np.ndarray:
    import struct
    import zlib

    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if tag == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif tag == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = np.zeros((height, stride), np.int32)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        prev = out[y - 1] if y else np.zeros(stride, np.int32)
        row = out[y]
        for x in range(stride):
            a = row[x - channels] if x >= channels else 0
            b, c = prev[x], (prev[x - channels] if x >= channels else 0)
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            row[x] = (line[x] + pred) & 0xFF
    return out.reshape(height, width, channels)[..., :3].astype(np.uint8)


def test_page_renders_charts_in_headless_chromium(mixed, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian package 'chromium'); the page is checked only as text")
    _, body, out = mixed
    shot = tmp_path / "page.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         f"--screenshot={shot}", "--window-size=1100,1500", (out / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = _png_pixels(shot)
    assert pixels.shape[:2] == (1500, 1100)
    colours = pixels.reshape(-1, 3)
    assert np.mean(np.any(colours < 245, axis=1)) > 0.05, "the page is blank"

    def count(rgb):
        return int(np.sum(np.all(colours == np.array(rgb, np.uint8), axis=1)))

    present = {int(b) if b != "fp16" else 16 for layer in body["layers"] for b in layer["weight"]["bits_histogram"]}
    for bits in present - {16}:  # every bit width allocated paints part of the heatmap
        assert count(bits_color(bits)) > 300, f"heatmap: no {bits}-bit cells"
    assert count(BAR_COLOR) > 5000, "error bars not drawn"
    assert count(LINE_COLOR) > 500, "drift line not drawn"


def _biased_mlp() -> onnx.ModelProto:
    """Two linears with biases: `lower-ort` merges each MatMul and the Add of its bias into one
    `MatMulIntegerToFloat` (u8 activations), so the MatMul outputs disappear from the artifact."""
    rng = np.random.default_rng(7)
    arrays = {"w1": rng.normal(0, 0.2, (16, 32)), "b1": rng.normal(0, 0.5, 32),
              "w2": rng.normal(0, 0.2, (32, 8)), "b2": rng.normal(0, 0.5, 8)}
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arrays.items()]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), oh.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        oh.make_node("Relu", ["hb"], ["r"], name="relu"),
        oh.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"), oh.make_node("Add", ["b2", "o"], ["y"], name="fc2_bias"),
    ]
    graph = oh.make_graph(nodes, "biased_mlp", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)


def test_layers_merged_with_their_bias_by_the_lowering_are_still_reported(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(_biased_mlp(), str(path))
    rng = np.random.default_rng(8)
    calib = [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)} for _ in range(4)]
    probe_batch = {"x": rng.normal(0, 1, (4, 16)).astype(np.float32)}
    out = tmp_path / "out"
    qcompiler.compile(str(path), out, pipeline="calibrate,quantize,lower-ort{act-format=u8 int-kernels=fused}",
                      calibration=calib, probe_inputs=probe_batch, report=out / "report.json")
    artifact = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in artifact.graph.node].count("MatMulIntegerToFloat") == 2  # the case under test
    body = json.loads((out / "report.json").read_text())
    assert body["summary"]["layers"] == body["summary"]["layers_quantized"] == 2
    assert [(layer["name"], layer["output"], layer["op"]) for layer in body["layers"]] == [("fc1", "h", "MatMul"), ("fc2", "o", "MatMul")]
    for layer in body["layers"]:
        assert layer["weight"]["format"] == "int8" and layer["activation"]["format"] == "int8"
        k = layer["weight_shape"][0]  # int8 codes, one fp32 scale (and a zero point) per column; not the bias
        assert 8 + 32 / k <= layer["weight"]["stored_bits_per_weight"] <= 8 + 40 / k
        # measured without the bias: int8 error on a layer output, not a bias-inflated SQNR
        assert 20 < layer["error"]["sqnr_db"] < 50 and 0.99 < layer["error"]["cosine"] < 1


def test_mixed_layers_name_their_route_and_bytes_at_rest_and_resident(tmp_path):
    pipeline = "calibrate,allocate-bits{avg-bits=4 group-size=64 outliers-weight=0},quantize-weights,lower-ort"
    _, body, _ = _compile(tmp_path, "mixed", pipeline, report="r.json", drift=False)
    manifest_layers = body["manifest"]["mixed_layers"]
    runtime = [layer["runtime"] for layer in body["layers"] if layer["weight"]["format"] == "mixed"]
    assert runtime and all(r is not None for r in runtime) and len(manifest_layers) == len(runtime)
    for r in runtime:
        assert r["route"].startswith("split: ") and "MatMulNBits" in r["route"]
        assert 0 < r["bytes_at_rest"] <= r["bytes_resident"] < 3 * r["bytes_at_rest"]


def test_linears_merged_into_one_kernel_report_their_own_share_of_its_bytes(tmp_path):
    """Linears of one input allocated together (`shared-input=joint`) are lowered as one kernel per
    class and a Split: each is still a layer of the report, with the merged layer's route and `layers`,
    and stores its columns' share of the kernel's bytes (not all of them)."""
    bits = {}
    for mode in ("joint", "apart"):
        pipeline = (f"calibrate,allocate-bits{{avg-bits=4 group-size=64 outliers-weight=0 shared-input={mode}}},"
                    "quantize-weights,lower-ort")
        (tmp_path / mode).mkdir()
        _, body, _ = _compile(tmp_path / mode, "mixed", pipeline, report="r.json", drift=False)
        bits[mode] = {layer["name"]: layer["weight"]["stored_bits_per_weight"] for layer in body["layers"]}
        merged = [layer for layer in body["layers"] if (layer["runtime"] or {}).get("layers")]
        assert bool(merged) == (mode == "joint")
        assert all(layer["name"] in layer["runtime"]["layers"] for layer in merged)
    assert bits["joint"].keys() == bits["apart"].keys()
    for name, joint in bits["joint"].items():
        assert 0.8 * bits["apart"][name] < joint < 1.2 * bits["apart"][name], name


def _not_numbers(body: dict, pipeline: str) -> list[str]:
    """The report fields that should hold a number after `pipeline` and do not (a stats key or option
    renamed on one side reads as None on the other)."""
    missing = []

    def need(where, part, *fields):
        missing.extend(f"{where}.{f}" for f in fields if not isinstance((part or {}).get(f), (int, float)))

    need("summary", body["summary"], "layers", "layers_quantized", "float_nodes", "layers_float_for_speed", "lowest_layer_sqnr_db")
    need("size", body["size"], "weights", "float_weight_bytes", "artifact_weight_bytes", "artifact_file_bytes", "compression",
         "effective_bits_per_weight")
    for layer in _linears(body):
        where = f"layers[{layer['name']}]"
        need(f"{where}.weight", layer["weight"], "mean_bits", "stored_bytes", "stored_bits_per_weight", "sqnr_db")
        need(f"{where}.error", layer["error"], "sqnr_db", "cosine")
        if pipeline == "w8a8":
            need(f"{where}.activation", layer["activation"], "sqnr_db")  # measured for every static input, float ones too
            if layer["activation"]["format"] == "int8":
                need(f"{where}.activation", layer["activation"], "scale", "zero_point")
            if layer["smooth"] is not None:
                need(f"{where}.smooth", layer["smooth"], "alpha", "act_absmax_before", "act_absmax_after")
        else:
            need(f"{where}.weight", layer["weight"], "predicted_error", "sparse_outliers", "fp16_channels", "group_size")
    return missing


def test_reports_have_a_number_wherever_one_is_expected(w8a8, mixed):
    for pipeline, (_, body, _) in (("w8a8", w8a8), ("mixed", mixed)):
        assert body["layers"] and not _not_numbers(body, pipeline), (pipeline, _not_numbers(body, pipeline))
    assert any(layer["smooth"] for layer in w8a8[1]["layers"])
    assert any(layer["activation"]["format"] == "int8" for layer in w8a8[1]["layers"])


def _keys(stats) -> set[str]:
    if isinstance(stats, dict):
        return set(stats) | {k for v in stats.values() for k in _keys(v)}
    if isinstance(stats, list):
        return {k for v in stats for k in _keys(v)}
    return set()


def test_the_stats_keys_tools_read_are_the_ones_the_passes_write(w8a8, mixed):
    """Each pass's `Stats` names the keys of its statistics the report, doctor and compiler read:
    all of them appear in what the pass wrote."""
    from qcompiler.pipeline.spec import all_passes

    written: dict[str, set[str]] = {}
    for _, body, _ in (w8a8, mixed):
        for record in body["passes"]:
            written.setdefault(record["name"], set()).update(_keys(record["stats"]))
    checked = set()
    for name, cls in all_passes().items():
        declared = {value for key, value in vars(getattr(cls, "Stats", object)).items() if key.isupper()}
        if declared and name in written:
            assert declared <= written[name], (name, sorted(declared - written[name]))
            checked.add(name)
    assert checked == {"smooth", "quantize", "allocate-bits", "quantize-weights", "lower-ort"}


def test_a_layer_whose_channels_fold_permutation_reordered_is_compared_in_that_order(tmp_path):
    """`fold-permutation` moves down_proj's input permutation into up_proj's output columns: up_proj's
    output is compared with its float reference reordered so (compared as it was, its cosine was ~0)."""
    _, body, _ = _compile(tmp_path, "folded", "mixed{avg-bits=4}", report="r.json")
    folded = next(p for p in body["passes"] if p["name"] == "fold-permutation")["stats"]["folded_layers"]
    assert "down_proj" in folded
    errors = {layer["name"]: layer["error"] for layer in body["layers"]}
    assert errors["up_proj"]["cosine"] > 0.9 and errors["down_proj"]["cosine"] > 0.9, errors
