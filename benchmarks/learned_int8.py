"""Learning after int8 quantization: `w8a8` against `w8a8{tuning=scales}` (the int8
weights' per-channel scales and the activation grids learned against the float blocks, codes
frozen), `w8a8{tuning=flexround}` (the weights' rounding learned too; both on round-to-nearest
kernels, `conv-rounding=nearest`), `w8a8{conv-rounding=gptq}`
(Conv kernels' codes rounded by GPTQ on the calibration patches, which `w8a8` does by default where their H are small;
with learned scales after it too) and `w8a8{conv-rounding=nearest}` ("w8a8 nearest"), on the FFDNet denoisers
(PSNR against the clean photo at sigma 15, 25 and 50), MiniLM (STS Spearman), EfficientNet-Lite0 and SqueezeNet, a public
architecture this project did not write (ONNX's own `light_squeezenet` graph with the deterministic
He-normal weights `tests/test_public_models.py` gives it); the classifiers' output error against float on photos.

    python benchmarks/learned_int8.py                                   # all (about 25 min on 2 cores)
    python benchmarks/learned_int8.py --models ffdnet-gray --sigmas 25   # one model, one noise level
    python benchmarks/learned_int8.py --models ffdnet-gray ffdnet-rgb squeezenet --variants "w8a8 nearest" "w8a8 conv-gptq"

FFDNet: calibrated on the batches `benchmarks/imaging.py` uses (centre crops of at most 256 x 256 of
the calibration photos at sigma 15, 25 and 50), evaluated with `qcompiler eval --task denoise` on
the whole evaluation photos. MiniLM: calibrated on the first 128 lines of the WikiText-2 excerpt,
evaluated with `qcompiler eval --task sts` on the STS pairs. EfficientNet-Lite0: captured once to ONNX,
calibrated on 2 x 2 crops of its calibration photos (44 crops, batches of 8), evaluated on 3 x 3 crops of
its evaluation photos (72), as `benchmarks/equalize.py` does. SqueezeNet: calibrated on 8 scikit-image
photos at 224 x 224, evaluated on 4 others: the output's mean squared error relative to float's mean
square, and top-1 agreement. Each row records the compile time and,
for the learning passes, the summed block loss before and after (on the calibration data). Torch
and ONNX Runtime run with 2 threads.

Output: a table on stdout and `benchmarks/results/learned_int8.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

log = common.log

MODELS = ("ffdnet-gray", "ffdnet-rgb", "minilm-l6", "efficientnet-lite0", "squeezenet")
CLASSIFIERS = ("efficientnet-lite0", "squeezenet")  # measured against their float ONNX file on held-out photos
SIGMAS = (15.0, 25.0, 50.0)
VARIANTS = {"w8a8": "w8a8", "w8a8 nearest": "w8a8{conv-rounding=nearest}", "w8a8 scales": "w8a8{tuning=scales conv-rounding=nearest}",
            "w8a8 flexround": "w8a8{tuning=flexround conv-rounding=nearest}",
            "w8a8 conv-gptq": "w8a8{conv-rounding=gptq}", "w8a8 conv-gptq scales": "w8a8{conv-rounding=gptq tuning=scales}"}
LEARNING_PASSES = ("tune-scales", "flexround")


def public_model(work: Path):
    """SqueezeNet as `tests/test_public_models.py` builds it: (the .onnx path, calibration feeds, held-out feeds)."""
    import onnx

    sys.path.insert(0, str(common.REPO / "tests"))
    from test_public_models import images, with_weights

    model = with_weights("squeezenet")
    path = work / "squeezenet.onnx"
    onnx.save(model, str(path))
    x_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    return path, [{x_name: img[None]} for img in images(224, 8)], [{x_name: img[None]} for img in images(224, 4, offset=8)]


def bundled_classifier(work: Path):
    """EfficientNet-Lite0 captured to ONNX: (the .onnx path, calibration feeds, held-out feeds)."""
    import onnx_ir as ir

    import qcompiler.models as qm
    from qcompiler.driver.capture import resolve
    from qcompiler.models import efficientnet_lite as eff

    bundled = qm.get("efficientnet-lite0")
    model, _ = resolve(bundled.name)
    path = work / f"{bundled.name}.onnx"
    ir.save(model, path)
    calibration, held = bundled.calibration_crops(), [c for _, c in bundled.evaluation_crops(3)]
    return (path, [eff.to_feeds(calibration[i:i + 8]) for i in range(0, len(calibration), 8)],
            [eff.to_feeds(held[i:i + 8]) for i in range(0, len(held), 8)])


def calibration(name: str, public):
    if public is not None:
        return {"calibration": public[1]}, ("44 crops of its calibration photos" if name == "efficientnet-lite0"
                                            else "8 scikit-image photos at 224 x 224")
    if name.startswith("ffdnet"):
        import imaging
        import qcompiler.models as qm

        batches, described = imaging.calibration_batches(qm.get(name))
        return {"calibration": batches}, described
    return {"calibration": str(common.WIKITEXT), "calib_count": 128}, f"{common.WIKITEXT.name}, first 128 lines"


def compile_variant(source, pipeline: str, out: Path, data: dict) -> dict[str, Any]:
    import qcompiler

    start = time.perf_counter()
    result = qcompiler.compile(str(source), out, pipeline=pipeline, drift=False, threads=common.THREADS, **data)
    row: dict[str, Any] = {"pipeline": result.pipeline, "compile_s": round(time.perf_counter() - start, 1)}
    for record in result.records:
        if record.name in LEARNING_PASSES:
            stats = record.stats
            row["learning"] = {k: stats.get(k) for k in ("mode", "blocks", "blocks_improved", "activation_grids_learned",
                                                          "loss_before", "loss_after", "seconds")}
    return row


def evaluate_variant(name: str, artifact: Path, sigmas, public) -> dict[str, Any]:
    import numpy as np

    from qcompiler.analysis.execute import ort_session
    from qcompiler.tools.evaluate import evaluate

    if public is not None:
        path, _, held = public
        want = np.concatenate([ort_session(str(path), common.THREADS).run(None, h)[0] for h in held])
        session = ort_session(str(artifact / "model.onnx"), common.THREADS)
        got = np.concatenate([session.run(None, h)[0] for h in held])
        return {"relative_mse": float(np.mean((got - want) ** 2) / np.mean(want ** 2)),
                "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1)))}
    if name.startswith("ffdnet"):
        out = {}
        for sigma in sigmas:
            r = evaluate(artifact, "denoise", sigma=sigma, threads=common.THREADS)
            out[f"{sigma:g}"] = {k: r[k] for k in ("psnr_float", "psnr_compiled", "psnr_drop", "ssim_float", "ssim_compiled")}
        return out
    r = evaluate(artifact, "sts", common.STS, threads=common.THREADS)
    return {k: r[k] for k in ("pairs", "spearman_float", "spearman_compiled", "spearman_drop", "mean_cosine_float_vs_compiled")}


def bench_model(name: str, sigmas, work: Path, variants: list[str]) -> dict[str, Any]:
    public = public_model(work) if name == "squeezenet" else bundled_classifier(work) if name == "efficientnet-lite0" else None
    data, described = calibration(name, public)
    source = public[0] if public is not None else name
    log(f"{name}: calibration {described}")
    rows = {}
    for label in variants:
        pipeline = VARIANTS[label]
        out = work / f"{name}-{label.replace(' ', '-')}"
        rows[label] = compile_variant(source, pipeline, out, data)
        rows[label]["quality"] = evaluate_variant(name, out, sigmas, public)
        log(f"{name}: {label}: compiled in {rows[label]['compile_s']} s; {rows[label]['quality']}")
    return {"model": name, "calibration": described, "variants": rows}


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        rows = r["variants"]
        if r["model"].startswith("ffdnet"):
            sigmas = list(rows["w8a8"]["quality"])
            head = ["variant", "compile s"] + [f"PSNR drop @{s}" for s in sigmas]
            body = [[k, v["compile_s"]] + [v["quality"][s]["psnr_drop"] for s in sigmas] for k, v in rows.items()]
            float_psnr = ", ".join(f"{s}: {rows['w8a8']['quality'][s]['psnr_float']:.2f}" for s in sigmas)
            lines.append(f"{r['model']} (float PSNR {float_psnr} dB)")
        elif r["model"] in CLASSIFIERS:
            head = ["variant", "compile s", "relative MSE vs float", "top-1 agreement"]
            body = [[k, v["compile_s"], f"{v['quality']['relative_mse']:.3g}", v["quality"]["top1_agreement"]] for k, v in rows.items()]
            lines.append(r["model"])
        else:
            head = ["variant", "compile s", "Spearman", "drop", "cosine vs float"]
            body = [[k, v["compile_s"], v["quality"]["spearman_compiled"], v["quality"]["spearman_drop"],
                     v["quality"]["mean_cosine_float_vs_compiled"]] for k, v in rows.items()]
            lines.append(f"{r['model']} (float Spearman {rows['w8a8']['quality']['spearman_float']})")
        lines.append(common.table(head, body))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sigmas", nargs="+", type=float, default=list(SIGMAS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="the rows to compile (w8a8 always)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "learned_int8.json")
    args = parser.parse_args(argv)
    variants = ["w8a8", *(v for v in args.variants if v != "w8a8")]
    common.fix_threads(common.THREADS)
    results = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qc-learned-int8-") as tmp:
        for name in args.models:
            results.append(bench_model(name, args.sigmas, Path(tmp), variants))
            payload = {"machine": common.machine(), "packages": common.packages(), "threads": common.THREADS, "results": results}
            args.json.write_text(json.dumps(payload, indent=1) + "\n")  # after each model: a later failure keeps it
    print(render(results))
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
