"""Cross-layer equalization on the bundled conv nets: float against `w8a8` (which corrects biases),
`w8a8` with `equalize`, each also without bias correction.

    python benchmarks/equalize.py                                   # all three models (about 8 min on 2 cores)
    python benchmarks/equalize.py --models efficientnet-lite0 --grid 2  # a quick run

Variants (the `w8a8` preset's options; `canonicalize,equalize,calibrate,...` underneath):
- `float32`: the `default` pipeline;
- `w8a8` (Conv biases corrected, the preset's default); `w8a8{bias-correction=false}`;
- `w8a8{equalize=true}`: `equalize` before calibration, through ReLU and plain Conv -> Conv only;
- `w8a8{equalize=relu6}` (EfficientNet-Lite0 only, whose activations are ReLU6): also through
  `Clip(0, 6)`, rewritten as a per-channel `Min(Relu(x), 6 / s)`;
- each `equalize` variant again with `bias-correction=false`;
- EfficientNet-Lite0 only, with `--peers-python`: `nncf`, NNCF's `quantize` with its defaults on the
  float32 model and the same batches (`benchmarks/nncf_ptq.py`, as in `benchmarks/imaging.py`);
- EfficientNet-Lite0 only: `w8a8{conv-method=calibrated}` (min-max ranges for the Conv activations
  too, where `w8a8` clips them by MSE);
- FFDNet only, a diagnostic: int8 weights with float activations
  (`canonicalize,[equalize,]calibrate,quantize{activations=none},lower-ort`), what the weights alone cost
  with and without equalization.

FFDNet grey and RGB: PSNR (dB) against the clean photo on the evaluation photos, seeded Gaussian
noise at `--sigmas` (default 25), calibration as in `benchmarks/imaging.py` (the same batches for
every variant). EfficientNet-Lite0: top-1 agreement with the float model, and the logits' mean relative squared error, on `--grid` x `--grid`
224 x 224 crops of its 8 evaluation photos (72 crops at grid 3), calibrated on 2 x 2 crops of its
11 calibration photos (44 crops), batches of 8; and latency of one crop, 2 threads, interleaved,
ratio to float32. Each model is captured once and every variant compiles that ONNX file.

Output: the table on stdout and `benchmarks/results/equalize.json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

log = common.log
import imaging  # noqa: E402

MODELS = ("ffdnet-gray", "ffdnet-rgb", "efficientnet-lite0")
BATCH = 8


def variants(name: str) -> dict[str, str]:
    """Variant label -> pipeline."""
    out = {"float32": "default", "w8a8 no-bc": "w8a8{bias-correction=false}", "w8a8": "w8a8",
           "w8a8 eq no-bc": "w8a8{equalize=true bias-correction=false}", "w8a8 eq": "w8a8{equalize=true}"}
    if name != "efficientnet-lite0":  # diagnostic: what the int8 weights alone cost, float activations
        out.update({"w8 weights only": "canonicalize,calibrate,quantize{activations=none},lower-ort",
                    "w8 weights only eq": "canonicalize,equalize,calibrate,quantize{activations=none},lower-ort"})
    if name == "efficientnet-lite0":
        out["w8a8 minmax"] = "w8a8{conv-method=calibrated}"  # min-max activation ranges, w8a8's default before conv-method=mse
        out.update({"w8a8 eq-relu6 no-bc": "w8a8{equalize=relu6 bias-correction=false}", "w8a8 eq-relu6": "w8a8{equalize=relu6}"})
    return out


def capture_once(name: str, work: Path) -> Path:
    """The bundled model captured to an ONNX file every variant compiles."""
    import onnx_ir as ir

    from qcompiler.driver.capture import resolve

    model, _ = resolve(name)
    path = work / f"{name}.onnx"
    ir.save(model, path)
    return path


def compile_all(source: Path, name: str, work: Path, batches) -> dict[str, dict[str, Any]]:
    import qcompiler

    out = {}
    for label, pipeline in variants(name).items():
        start = time.perf_counter()
        folder = work / label.replace(" ", "-")
        result = qcompiler.compile(str(source), folder, pipeline=pipeline, calibration=None if pipeline == "default" else batches,
                                   drift=False, threads=common.THREADS, cache_dir=None)
        out[label] = {"pipeline": result.pipeline, "model": str(folder / "model.onnx"),
                      "compile_s": round(time.perf_counter() - start, 1)}
        log(f"{name}: {label} compiled in {out[label]['compile_s']} s")
    return out


def bench_ffdnet(name: str, args, work: Path) -> dict[str, Any]:
    from qcompiler.analysis.execute import ort_session
    import qcompiler.models as qm

    bundled = qm.get(name)
    batches, described = imaging.calibration_batches(bundled)
    compiled = compile_all(capture_once(name, work), name, work, batches)
    sessions = {label: ort_session(v["model"], common.THREADS) for label, v in compiled.items()}
    targets = imaging.evaluation_targets(bundled, args.count, args.crop)
    scores = imaging.quality(sessions, targets, args.sigmas)
    table = {label: {s: scores[label][s]["psnr"] for s in scores[label]} for label in sessions}
    return {"model": name, "metric": "PSNR dB", "calibration": described, "evaluation": [t[0] for t in targets],
            "variants": compiled, "scores": table}


def bench_efficientnet(args, work: Path) -> dict[str, Any]:
    from qcompiler.analysis.execute import ort_session
    from qcompiler.models import efficientnet_lite as eff
    import qcompiler.models as qm

    bundled = qm.get("efficientnet-lite0")
    calibration = bundled.calibration_crops()
    batches = [eff.to_feeds(calibration[i:i + BATCH]) for i in range(0, len(calibration), BATCH)]
    compiled = compile_all(capture_once(bundled.name, work), bundled.name, work, batches)
    sessions = {label: ort_session(v["model"], common.THREADS) for label, v in compiled.items()}
    if args.peers_python:  # NNCF's quantize on the float32 model, the same batches
        nncf = imaging.compile_nncf(Path(compiled["float32"]["model"]), work, batches, args.peers_python)
        compiled["nncf"] = {**nncf, "pipeline": nncf["config"], "model": str(nncf["model"])}
        sessions["nncf"] = imaging.nncf_session(nncf["model"])
        log(f"{bundled.name}: nncf quantized in {nncf['compile_s']} s")
    evaluation = bundled.evaluation_crops(args.grid)
    crops = [c for _, c in evaluation]
    logits = {label: np.concatenate([s.run(None, eff.to_feeds(crops[i:i + BATCH]))[0] for i in range(0, len(crops), BATCH)])
              for label, s in sessions.items()}
    agreement = {label: round(100 * eff.top1_agreement(logits["float32"], value), 2) for label, value in logits.items()}
    reference = logits["float32"].astype(np.float64)
    # mean over crops of |logits - float logits|^2 / |float logits|^2: finer than agreement on few crops
    relative = {label: round(float(np.mean(np.sum((value - reference) ** 2, axis=1) / np.sum(reference ** 2, axis=1))), 5)
                for label, value in logits.items()}
    feeds = eff.to_feeds(crops[:1])
    timing = common.interleaved_latency({label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()},
                                        warmup=3, repeats=args.repeats, reference="float32")
    return {"model": bundled.name, "metric": "top-1 agreement with float32 %",
            "calibration": f"{len(calibration)} crops of {', '.join(eff.CALIBRATION_PHOTOS)}",
            "evaluation": f"{len(crops)} crops ({args.grid}x{args.grid} per photo) of {', '.join(eff.EVALUATION_PHOTOS)}",
            "variants": compiled, "scores": {label: {"top1": value, "logit rel. MSE": relative[label]} for label, value in agreement.items()},
            "latency_ratio": {label: v["paired_ratio"] for label, v in timing.items()},
            "latency_ms": {label: v["median_ms"] for label, v in timing.items()}}


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        columns = list(next(iter(r["scores"].values())))
        rows = []
        for label, scores in r["scores"].items():
            row = [label, r["variants"][label]["pipeline"].split(",lower-ort")[0][:60]]
            row += [f"{scores[c]:.2f}" if c == "top1" or not isinstance(scores[c], float) or scores[c] >= 1 else f"{scores[c]:.5f}" for c in columns]
            if "latency_ratio" in r:
                row.append(f"{r['latency_ratio'][label]:.2f}")
            rows.append(row)
        head = ["variant", "pipeline (start)"] + [f"{r['metric']} @ {c}" if c[0].isdigit() else c for c in columns]
        if "latency_ratio" in r:
            head.append("latency x float32")
        lines.append(f"{r['model']}")
        lines.append(common.table(head, rows))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sigmas", nargs="+", type=float, default=[25.0], help="FFDNet noise levels (default 25)")
    parser.add_argument("--count", type=int, help="FFDNet: the first N evaluation photos only")
    parser.add_argument("--crop", type=int, help="FFDNet: centre crops of this size instead of whole photos")
    parser.add_argument("--grid", type=int, default=3, help="EfficientNet: grid x grid crops per evaluation photo (default 3)")
    parser.add_argument("--repeats", type=int, default=20, help="EfficientNet latency rounds (default 20)")
    parser.add_argument("--peers-python", help="EfficientNet: the interpreter with NNCF installed (e.g. .venv-peers/bin/python) for an nncf row")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "equalize.json")
    args = parser.parse_args(argv)
    common.quiet()
    threads = common.fix_threads(common.THREADS)
    results = []
    for name, work in common.per_model_folders(args.models):
        results.append(bench_efficientnet(args, work) if name == "efficientnet-lite0" else bench_ffdnet(name, args, work))
        log(render(results[-1:]))
    text = render(results)
    common.finish_run(args.json, threads, results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
