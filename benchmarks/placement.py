"""Where int8 pays: our `w8a8` against float32 in ONNX Runtime on two small conv nets (one with
hard-swish, one EfficientNet-style with Swish and squeeze-and-excitation) and an MLP whose linears
add `[1, 1, N]` biases (as Keras exports Dense layers).

    python benchmarks/placement.py                      # 2 threads, writes benchmarks/results/placement.json
    python benchmarks/placement.py --repeats 30 --json /tmp/placement.json
    python benchmarks/placement.py --onnx-models        # also SqueezeNet, ShuffleNet, ResNet-50, Inception v1

Each model is compiled on deterministic calibration rows with `w8a8` (int8 placed where it pays)
and with `lower-ort{int-kernels=qdq}` (the bias left to a separate Add, as `[1, 1, N]` biases were).
`--compare DIR` adds prebuilt artifacts `DIR/<model>/model.onnx` to the same interleaved rounds
(e.g. the same models compiled by an earlier version: `--build DIR` writes them with the
installed one). The float model and the artifacts run as separate sessions, rounds interleaved, and
the latency is the paired ratio to float (median over rounds of artifact time / float time in the
same round). Also printed: the output cosine against float on held-apart rows, and what
`lower-ort` counted (integer kernels, float kernels behind a quantize/dequantize pair).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def conv_net():
    """1 x 3 x 128 x 128: a plain stage (Conv + Relu, x3: 3->32 stride 2, 32->64, 64->64), then a
    residual stage with hard-swish (Conv 64->64 -> HardSigmoid * x -> Conv 64->64 -> Add(skip) -> Relu
    -> Conv 64->128 stride 2 -> HardSigmoid * x), GlobalAveragePool, Flatten, Gemm 128->10."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(i, x, cin, cout, stride=1):
        inits.extend([numpy_helper.from_array(rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32), f"w{i}"),
                      numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), f"b{i}")])
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride, stride], name=f"conv{i}"))
        return f"c{i}"

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"]))
        return f"{x}.relu"

    def hard_swish(x):
        nodes.extend([helper.make_node("HardSigmoid", [x], [f"{x}.gate"], alpha=1 / 6, beta=0.5),
                      helper.make_node("Mul", [x, f"{x}.gate"], [f"{x}.hs"])])
        return f"{x}.hs"

    x = relu(conv(0, "image", 3, 32, 2))
    x = relu(conv(1, x, 32, 64))
    skip = relu(conv(2, x, 64, 64))
    x = hard_swish(conv(3, skip, 64, 64))
    x = conv(4, x, 64, 64)
    nodes.append(helper.make_node("Add", [x, skip], ["res"]))
    x = hard_swish(conv(5, relu("res"), 64, 128, 2))
    return _classifier("conv_net", nodes, inits, rng, x, 128, 128)


def _classifier(name: str, nodes: list, inits: list, rng, x: str, channels: int, size: int):
    """`nodes` (reading a 1 x 3 x size x size "image", ending in `x` of `channels`) closed by
    GlobalAveragePool, Flatten and a Gemm to 10 logits; the model and its rows(rng, n) maker."""
    from onnx import TensorProto, helper, numpy_helper

    inits += [numpy_helper.from_array(rng.normal(0, 0.1, (10, channels)).astype(np.float32), "fc"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="classifier")]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), lambda r, n: {
        "image": r.normal(0, 1, (n, 3, size, size)).astype(np.float32)}


def mbconv_net():
    """1 x 3 x 224 x 224, EfficientNet-style as TensorFlow-side exporters write it: Swish (x * Sigmoid(x))
    after every Conv, each stride-2 Conv with auto_pad VALID behind a zero Pad of one side. A stem Conv
    3->32 stride 2; an inverted bottleneck 32 -> 96 (1x1) -> depthwise 3x3 stride 2 -> squeeze-and-excitation
    (GlobalAveragePool, 1x1 96->8, Swish, 1x1 8->96, Sigmoid, Mul) -> 1x1 to 24; a second one 24 -> 144 ->
    depthwise 3x3 -> SE -> 24 with the residual Add; a 1x1 head 24->256, GlobalAveragePool, Gemm 256->10."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(2)
    nodes, inits = [], []

    def conv(x, cin, cout, k=1, stride=1, group=1):
        name = f"conv{len(inits)}"
        inits.extend([numpy_helper.from_array(rng.normal(0, np.sqrt(2 / (k * k * cin // group)), (cout, cin // group, k, k)).astype(np.float32), f"{name}.w"),
                      numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), f"{name}.b")])
        if stride == 2:  # TensorFlow's SAME for stride 2: pad the end of each spatial axis by hand
            inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, k // 2, k // 2], np.int64), f"{name}.pads"))
            nodes.append(helper.make_node("Pad", [x, f"{name}.pads"], [f"{name}.padded"]))
            x = f"{name}.padded"
        extra = {"auto_pad": "VALID"} if stride == 2 else {"pads": [k // 2] * 4}
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], strides=[stride, stride], group=group, name=name, **extra))
        return name

    def swish(x):
        nodes.extend([helper.make_node("Sigmoid", [x], [f"{x}.sigmoid"]), helper.make_node("Mul", [x, f"{x}.sigmoid"], [f"{x}.swish"])])
        return f"{x}.swish"

    def excite(x, channels, squeezed):
        nodes.append(helper.make_node("GlobalAveragePool", [x], [f"{x}.pooled"]))
        gate = conv(swish(conv(f"{x}.pooled", channels, squeezed)), squeezed, channels)
        nodes.extend([helper.make_node("Sigmoid", [gate], [f"{gate}.sigmoid"]), helper.make_node("Mul", [x, f"{gate}.sigmoid"], [f"{x}.excited"])])
        return f"{x}.excited"

    x = swish(conv("image", 3, 32, 3, 2))
    x = swish(conv(swish(conv(x, 32, 96)), 96, 96, 3, 2, group=96))
    skip = conv(excite(x, 96, 8), 96, 24)
    x = swish(conv(swish(conv(skip, 24, 144)), 144, 144, 3, 1, group=144))
    x = conv(excite(x, 144, 8), 144, 24)
    nodes.append(helper.make_node("Add", [x, skip], ["res"]))
    x = swish(conv("res", 24, 256))
    return _classifier("mbconv_net", nodes, inits, rng, x, 256, 224)


def mlp():
    """Three Dense blocks (MatMul + Add of a [1, 1, N] bias + Relu), 1 x 64 tokens x 256 -> 1024 -> 256 -> 1024 -> 64."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    sizes = [256, 1024, 256, 1024, 64]
    nodes, inits, x = [], [], "tokens"
    for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
        inits += [numpy_helper.from_array(rng.normal(0, np.sqrt(2 / k), (k, n)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.05, (1, 1, n)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"dense{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}")]
        x = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 64, 256])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), lambda r, n: {
        "tokens": r.normal(0, 1, (n, 64, 256)).astype(np.float32)}


def onnx_light(name: str):
    """One of the model graphs ONNX ships with its backend tests, with deterministic He-normal weights
    (`tests/test_public_models.py`), fed real photographs at 224 x 224."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_public_models import images, with_weights

    model = with_weights(name)
    x = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    return model, lambda r, n: {x: images(224, n, offset=int(r.integers(0, 8)))}


MODELS = {"conv-net": conv_net, "mbconv-net": mbconv_net, "mlp-[1,1,N]-bias": mlp}
LIGHT = ("squeezenet", "shufflenet", "resnet50", "inception_v1")
SMOOTH = "canonicalize,calibrate{method=minmax},smooth{alpha=auto},fold-scales{unfoldable=unsmooth}"
VARIANTS = {
    "w8a8": "w8a8",
    "bias as Add": f"{SMOOTH},quantize,lower-ort{{int-kernels=qdq}}",
}


def build_only(target: Path) -> None:
    """Write `target/<model>.onnx` and `target/<model>/` (its `w8a8` artifact) for `--compare`."""
    import onnx

    import qcompiler

    target.mkdir(parents=True, exist_ok=True)
    for name, build in MODELS.items():
        model, rows = build()
        onnx.save(model, str(target / f"{name}.onnx"))
        rng = np.random.default_rng(7)
        qcompiler.compile(str(target / f"{name}.onnx"), target / name, pipeline="w8a8", calibration=[rows(rng, 1) for _ in range(16)], drift=False)


def measure(name: str, build, work: Path, threads: int, repeats: int, compare: Path | None = None) -> list[dict]:
    import onnx

    import qcompiler
    from qcompiler.analysis import execute

    model, rows = build()
    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(7)
    calib = [rows(rng, 1) for _ in range(16)]
    held = rows(np.random.default_rng(99), 1)
    float_session = execute.ort_session(str(path), threads)
    want = float_session.run(None, held)[0]
    runners, found = {"float": lambda: float_session.run(None, held)}, {}
    for variant, pipeline in VARIANTS.items():
        out = work / f"{name}-{len(found)}"
        result = qcompiler.compile(str(path), out, pipeline=pipeline, calibration=calib, drift=False)
        session = execute.ort_session(str(out / "model.onnx"), threads)
        runners[variant] = lambda s=session: s.run(None, held)
        quantize = next((r.stats for r in result.records if r.name == "quantize"), {})
        found[variant] = {
            "model": name, "variant": variant, "pipeline": pipeline,
            "cosine": execute.drift({"y": want}, {"y": session.run(None, held)[0]})["cosine"],
            "layers_quantized": quantize.get("layers"), "layers_float_for_speed": len(quantize.get("float_placement") or {}),
            "kernels": next((r.stats.get("kernels") for r in result.records if r.name == "lower-ort"), None),
        }
    if compare is not None and (compare / name / "model.onnx").exists():
        session = execute.ort_session(str(compare / name / "model.onnx"), threads)
        runners["compared"] = lambda s=session: s.run(None, held)
        found["compared"] = {"model": name, "variant": "compared", "pipeline": f"w8a8 as built in {compare}",
                             "cosine": execute.drift({"y": want}, {"y": session.run(None, held)[0]})["cosine"],
                             "layers_quantized": None, "layers_float_for_speed": None, "kernels": None}
    timing = common.interleaved_latency(runners, repeats=repeats, reference="float")
    for variant, row in found.items():
        row.update(ratio_to_float=timing[variant]["paired_ratio"], ratio_p25=timing[variant]["paired_ratio_p25"],
                   ratio_p75=timing[variant]["paired_ratio_p75"], ms=timing[variant]["median_ms"], float_ms=timing["float"]["median_ms"])
    return list(found.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "placement.json")
    parser.add_argument("--compare", type=Path, help="a folder written by --build (e.g. with an earlier version), timed alongside")
    parser.add_argument("--build", type=Path, help="only write the models and their w8a8 artifacts into this folder, then stop")
    parser.add_argument("--onnx-models", action="store_true", help=f"also ONNX's backend-test model graphs: {', '.join(LIGHT)}")
    args = parser.parse_args(argv)
    if args.onnx_models:
        MODELS.update({name: (lambda n=name: onnx_light(n)) for name in LIGHT})
    if args.build is not None:
        build_only(args.build)
        return 0
    common.quiet()
    common.fix_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in MODELS.items():
            rows.extend(measure(name, build, Path(tmp), args.threads, args.repeats, args.compare))
    print(common.table(["model", "variant", "ratio to float", "p25..p75", "ms", "float ms", "cosine", "layers int8", "float for speed"],
                       [[r["model"], r["variant"], f"{r['ratio_to_float']:.3f}", f"{r['ratio_p25']:.2f}..{r['ratio_p75']:.2f}",
                         f"{r['ms']:.2f}", f"{r['float_ms']:.2f}", f"{r['cosine']:.5f}", r["layers_quantized"] if r["layers_quantized"] is not None else "-",
                         r["layers_float_for_speed"] if r["layers_float_for_speed"] is not None else "-"] for r in rows]))
    common.write_json(args.json, {"command": common.command_line(), "machine": common.machine(), "threads": args.threads,
                                  "packages": common.packages(), "git": common.git_state(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
