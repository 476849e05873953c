"""What costs a conv net's int8 quality: per-activation sensitivity of a `w8a8` artifact.

    python benchmarks/conv_sensitivity.py                                  # FFDNet RGB and EfficientNet-Lite0 (about 6 min on 2 cores)
    python benchmarks/conv_sensitivity.py --models ffdnet-gray --sigma 15

For each model and each pipeline (`--pipelines`, default `w8a8` and `w8a8{conv-method=calibrated}`,
MSE and min-max ranges for the Conv activations) the artifact is compiled once, then measured as it
is, with every activation's `QuantizeLinear` -> `DequantizeLinear` pair removed ("weights only"),
and with one activation's pair removed at a time (weights stay int8 throughout): how much quality
that one tensor's int8 grid costs. A pair whose `QuantizeLinear` feeds an integer kernel directly
(the classifier's `MatMulIntegerToFloat`) cannot be removed this way and is not listed. Each row
also gives the tensor's range in the artifact, its producer and its readers (`Conv(dw)`: depthwise).

Quality: FFDNet: PSNR (dB) on centre `--crop` squares of the evaluation photos at `--sigma`;
calibration as in `benchmarks/imaging.py`. EfficientNet-Lite0: the logits' mean relative squared
error against float, |l - l_float|^2 / |l_float|^2 averaged over the crops, and top-1 agreement, on
3 x 3 crops of the evaluation photos; calibration as in `benchmarks/equalize.py`.

Output: tables on stdout and `benchmarks/results/conv_sensitivity.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

log = common.log
import imaging  # noqa: E402

MODELS = ("ffdnet-rgb", "efficientnet-lite0")
PIPELINES = ("w8a8", "w8a8{conv-method=calibrated}")
BATCH = 8


def activation_pairs(proto) -> list[dict[str, Any]]:
    """Every activation QuantizeLinear whose readers are all DequantizeLinear: its tensor, range,
    producer and the ops that read the dequantized tensor."""
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in init:
            continue
        after = readers.get(node.output[0], [])
        if not after or any(r.op_type != "DequantizeLinear" for r in after):
            continue
        scale, zero = float(init[node.input[1]]), init[node.input[2]]
        low, high = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
        source = producer.get(node.input[0])
        read_by = sorted({_kind(r) for dq in after for r in readers.get(dq.output[0], [])})
        pairs.append({"tensor": node.input[0], "producer": source.op_type if source is not None else "graph input",
                      "readers": read_by, "range": [round((low - int(zero)) * scale, 4), round((high - int(zero)) * scale, 4)]})
    return pairs


def _kind(node) -> str:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return "Conv(dw)" if node.op_type == "Conv" and group > 1 else node.op_type


def without_pairs(proto, tensors: set[str]):
    """A copy of the artifact with the activation pairs of `tensors` removed (readers read the float tensor)."""
    import copy

    model = copy.deepcopy(proto)
    nodes = list(model.graph.node)
    quantized = {n.output[0]: n.input[0] for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in tensors}
    restored = {n.output[0]: quantized[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    kept = [n for n in nodes if n.output[0] not in quantized and n.output[0] not in restored]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = restored.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


class FFDNetScore:
    """PSNR (dB) of a model on the evaluation crops at one sigma."""

    def __init__(self, name: str, args):
        from qcompiler.models import ffdnet
        import qcompiler.models as qm

        bundled = qm.get(name)
        self.batches, _ = imaging.calibration_batches(bundled)
        targets = imaging.evaluation_targets(bundled, None, args.crop)
        self.cases = [(clean, ffdnet.to_feeds([ffdnet.add_noise(clean, args.sigma, ffdnet.image_seed(raw))], [args.sigma]))
                      for _, clean, raw in targets]
        self.photos = [t[0] for t in targets]

    def __call__(self, session) -> dict[str, float]:
        from qcompiler.models import ffdnet

        psnr = [ffdnet.psnr(clean, np.transpose(session.run(None, feeds)[0][0], (1, 2, 0))) for clean, feeds in self.cases]
        return {"psnr": round(float(np.mean(psnr)), 3)}


class EfficientNetScore:
    """The logits' mean relative squared error against float, and top-1 agreement."""

    def __init__(self, name: str, args):
        from qcompiler.models import efficientnet_lite as eff
        import qcompiler.models as qm

        bundled = qm.get(name)
        calibration = bundled.calibration_crops()
        self.batches = [eff.to_feeds(calibration[i:i + BATCH]) for i in range(0, len(calibration), BATCH)]
        crops = [c for _, c in bundled.evaluation_crops(3)]
        self.feeds = [eff.to_feeds(crops[i:i + BATCH]) for i in range(0, len(crops), BATCH)]
        self.reference = None
        self.photos = list(eff.EVALUATION_PHOTOS)

    def __call__(self, session) -> dict[str, float]:
        from qcompiler.models import efficientnet_lite as eff

        logits = np.concatenate([session.run(None, f)[0] for f in self.feeds]).astype(np.float64)
        if self.reference is None:
            self.reference = logits
        error = np.mean(np.sum((logits - self.reference) ** 2, axis=1) / np.sum(self.reference ** 2, axis=1))
        return {"logit_rel_mse": round(float(error), 6), "top1": round(100 * eff.top1_agreement(self.reference, logits), 2)}


def bench_model(name: str, args, work: Path) -> dict[str, Any]:
    import onnx
    import onnx_ir as ir

    import qcompiler
    from qcompiler.analysis.execute import ort_session
    from qcompiler.driver.capture import resolve

    score = EfficientNetScore(name, args) if name == "efficientnet-lite0" else FFDNetScore(name, args)
    model, _ = resolve(name)
    source = work / f"{name}.onnx"
    ir.save(model, source)
    qcompiler.compile(str(source), work / "float32", pipeline="default", drift=False, threads=common.THREADS, cache_dir=None)
    result = {"model": name, "evaluation": score.photos, "float32": score(ort_session(str(work / "float32" / "model.onnx"), common.THREADS)),
              "pipelines": {}}
    for index, pipeline in enumerate(args.pipelines):
        out = work / f"p{index}"
        qcompiler.compile(str(source), out, pipeline=pipeline, calibration=score.batches, drift=False, threads=common.THREADS,
                          cache_dir=None)
        proto = onnx.load(str(out / "model.onnx"))
        pairs = activation_pairs(proto)
        measure = lambda m: score(ort_session(m.SerializeToString(), common.THREADS))  # noqa: E731
        entry = {"artifact": score(ort_session(str(out / "model.onnx"), common.THREADS)),
                 "weights_only": measure(without_pairs(proto, {p["tensor"] for p in pairs})), "activations": []}
        for pair in pairs:
            entry["activations"].append({**pair, "without": measure(without_pairs(proto, {pair["tensor"]}))})
        log(f"{name}: {pipeline}: {len(pairs)} activations measured")
        result["pipelines"][pipeline] = entry
    return result


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        key = "psnr" if "psnr" in r["float32"] else "logit_rel_mse"
        for pipeline, entry in r["pipelines"].items():
            base = entry["artifact"][key]
            lines.append(f"{r['model']} {pipeline}: float32 {r['float32']}, artifact {entry['artifact']}, weights only {entry['weights_only']}")
            rows = []
            for a in sorted(entry["activations"], key=lambda a: -abs(a["without"][key] - base)):
                gain = a["without"][key] - base if key == "psnr" else base - a["without"][key]
                share = "" if key == "psnr" else f"{100 * gain / base:.1f}"
                rows.append([a["tensor"], a["producer"], ",".join(a["readers"]), f"[{a['range'][0]:g}, {a['range'][1]:g}]",
                             f"{a['without'][key]:g}", f"{gain:+.4f}" if key == "psnr" else f"{gain:+.6f}", share])
            lines.append(common.table(["tensor", "producer", "read by", "range", f"{key} without its pair", "gain", "% of error"], rows))
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=("ffdnet-gray", "ffdnet-rgb", "efficientnet-lite0"))
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    parser.add_argument("--sigma", type=float, default=25.0, help="FFDNet noise level (default 25)")
    parser.add_argument("--crop", type=int, default=256, help="FFDNet: centre crops of this size (default 256)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "conv_sensitivity.json")
    args = parser.parse_args(argv)
    common.quiet()
    threads = common.fix_threads(common.THREADS)
    results = [bench_model(name, args, work) for name, work in common.per_model_folders(args.models)]
    text = render(results)
    common.finish_run(args.json, threads, results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
