"""Public architectures this project did not write, compiled with `w8a8` (slow tier): the model
graphs ONNX ships with its backend tests (SqueezeNet, ShuffleNet, ResNet-50, Inception v1, whose
weights the light files generate with `ConstantOfShape`: here they get deterministic He-normal
values) and the bundled CRAFT. Each must compile with a report measured on held-apart real images
(no warnings), run in ONNX Runtime, and agree with float on images it was not calibrated on."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qcompiler
from qcompiler.analysis import execute

pytestmark = pytest.mark.slow
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
BN_DEFAULTS = {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}  # BatchNormalization scale, bias, mean, var


def with_weights(name: str) -> onnx.ModelProto:
    """The light model with each generated weight as an initializer: He-normal for Conv/Gemm
    weights, zero biases, identity BatchNormalization; other generated constants keep their fill."""
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers = {}
    for node in model.graph.node:
        for index, value in enumerate(node.input):
            readers.setdefault(value, (node.op_type, index))
    rng = np.random.default_rng(0)
    keep = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        fill = numpy_helper.to_array(node.attribute[0].t).ravel()[0] if node.attribute else 0.0
        op, index = readers.get(node.output[0], ("", -1))
        if op in ("Conv", "Gemm") and index == 1:
            fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[-1]
            array = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        elif op in ("Conv", "Gemm") and index == 2:
            array = np.zeros(shape)
        elif op == "BatchNormalization":
            array = np.full(shape, BN_DEFAULTS.get(index, fill))
        else:
            array = np.full(shape, fill)
        model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def images(size: int, count: int, offset: int = 0) -> np.ndarray:
    """Real photographs from scikit-image, resized, normalised, NCHW."""
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(), data.hubble_deep_field(),
              data.colorwheel(), data.cat()]
    out = []
    for photo in (photos * 2)[offset:offset + count]:
        rgb = transform.resize(photo[..., :3], (size, size), anti_aliasing=True).astype(np.float32)
        out.append(((rgb - 0.45) / 0.225).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "resnet50", "inception_v1"])
def test_public_architecture_w8a8(name, tmp_path):
    model = with_weights(name)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    x_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    calib = [{x_name: img[None]} for img in images(224, 5)]
    out = tmp_path / "out"
    result = qcompiler.compile(str(path), out, pipeline="w8a8", calibration=calib, report=out / "report.json")
    body = json.loads((out / "report.json").read_text())
    assert body["probe"]["source"] == "calibration-held-apart" and body["warnings"] == []
    assert body["summary"]["output"]["cosine"] is not None
    held = {x_name: images(224, 1, offset=6)}
    want = execute.ort_session(model).run(None, held)[0]
    got = execute.ort_session(str(result.output / "model.onnx")).run(None, held)[0]
    assert execute.drift({"y": want}, {"y": got})["cosine"] > 0.98
    kernels = next(r.stats for r in result.records if r.name == "lower-ort").get("kernels") or {}
    assert not kernels.get("predicted_slower_than_float", False)


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "resnet50", "inception_v1"])
def test_public_architecture_mixed(name, tmp_path):
    """`mixed{avg-bits=5}` stores every Conv kernel and the classifier within 5 bits per weight and
    agrees with float on an image it was not calibrated on. (Inception v1's classifier reshapes its
    weight by a shape that IR 3 lists among the inputs, as it lists every weight: loading keeps it a
    constant, so the layer is found.)"""
    model = with_weights(name)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    x_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    calib = [{x_name: img[None]} for img in images(224, 5)]
    result = qcompiler.compile(str(path), tmp_path / "out", pipeline="mixed{avg-bits=5}", calibration=calib, drift=False)
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["effective_bits_per_weight"] <= 5.0
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    routes = [layer["route"] for layer in manifest["mixed_layers"].values()]
    assert routes.count("MixedWeight(packed, expanded at load)") == convs
    held = {x_name: images(224, 1, offset=6)}
    want = execute.ort_session(model).run(None, held)[0]
    got = execute.ort_session(str(result.output / "model.onnx")).run(None, held)[0]
    assert execute.drift({"y": want}, {"y": got})["cosine"] > 0.99


def test_public_architecture_learned_scales_after_w8a8(tmp_path):
    """`w8a8{tuning=scales}` on SqueezeNet (pooling, concatenations, a flattened classifier): every
    block learned, and the outputs closer to float than `w8a8`'s on photos it was not calibrated on."""
    model = with_weights("squeezenet")
    path = tmp_path / "squeezenet.onnx"
    onnx.save(model, str(path))
    x_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    calib = [{x_name: img[None]} for img in images(224, 8)]
    held = [{x_name: img[None]} for img in images(224, 4, offset=8)]
    float_session = execute.ort_session(model)
    want = np.concatenate([float_session.run(None, h)[0] for h in held])
    errors = {}
    for pipeline in ("w8a8", "w8a8{tuning=scales}"):
        result = qcompiler.compile(str(path), tmp_path / pipeline.replace("{", "-").replace("}", ""), pipeline=pipeline,
                                   calibration=calib, drift=False)
        session = execute.ort_session(str(result.output / "model.onnx"))
        errors[pipeline] = float(np.mean((np.concatenate([session.run(None, h)[0] for h in held]) - want) ** 2))
        stats = {r.name: r.stats for r in result.records}.get("tune-scales")
        if stats is not None:
            assert stats["blocks_improved"] == stats["blocks"] >= 2
    assert errors["w8a8{tuning=scales}"] < errors["w8a8"]


def test_craft_w8a8_report_measured_on_real_pages(tmp_path):
    out = tmp_path / "craft"
    result = qcompiler.compile("craft", out, pipeline="w8a8", calibration=_craft_calibration(),
                               report=out / "report.json")
    body = json.loads((out / "report.json").read_text())
    assert body["probe"]["source"] == "bundled" and body["warnings"] == []
    assert 0.9 < body["summary"]["output"]["cosine"] < 1.0
    assert all(layer["error"] is not None for layer in body["layers"] if layer["weight"]["format"] != "float")
    assert not (next(r.stats for r in result.records if r.name == "lower-ort").get("kernels") or {}).get("predicted_slower_than_float")


def _craft_calibration():
    from qcompiler import models

    data = pytest.importorskip("skimage.data")
    return [models.get("craft").inputs_from_raw([photo]) for photo in (data.coffee(), data.chelsea())]
