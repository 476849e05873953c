"""Mixed precision on conv nets: `mixed{avg-bits=B}` on EfficientNet-Lite0 and the FFDNet denoisers,
every Conv kernel stored at B bits per weight on average and expanded to float32 when the session
starts, against float and `w8a8`.

    python benchmarks/mixed_convs.py                                       # about 10 min on 2 cores
    python benchmarks/mixed_convs.py --models efficientnet-lite0 --budgets 4 --grid 2   # a quick run

Variants: `float32` (`default`), `w8a8`, and per budget B in `--budgets` (default 4, 6):
`mixed B` (`mixed{avg-bits=B rounding=nearest}`: all Conv layers share one budget, errors weighted by
each input channel's calibrated energy, biases corrected, round-to-nearest), `mixed B gptq`
(`mixed{avg-bits=B rounding=gptq}`: each kernel rounded by GPTQ on its im2col patches) and, with
`--sensitivity`, `mixed B sens.` (`scope=model sensitivity=output`: each layer's errors scaled by
how much its quantization alone moves the model's outputs on the first calibration batch). Per variant: the bits stored per source weight
(the manifest's `effective_bits_per_weight`, every byte of codes, scales, zero points, permutations
and the lowering's constants), the file size, the compile time, the quality, and the latency of one
input (2 threads, interleaved, ratio to float32 in the same round).

Quality: EfficientNet-Lite0, top-1 agreement with float32 and the logits' mean relative squared
error on `--grid` x `--grid` 224 x 224 crops of its evaluation photos (calibrated on 2 x 2 crops of
its calibration photos, as `benchmarks/equalize.py`); FFDNet grey and RGB, PSNR against the clean
photo at sigma 25 on its evaluation photos (calibration as `benchmarks/imaging.py`).

Output: the table on stdout and `benchmarks/results/mixed_convs.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import equalize  # noqa: E402
import imaging  # noqa: E402

log = common.log
MODELS = ("efficientnet-lite0", "ffdnet-gray", "ffdnet-rgb")


def variants(budgets: list[float], sensitivity: bool) -> dict[str, str]:
    out = {"float32": "default", "w8a8": "w8a8"}
    for b in budgets:
        out[f"mixed {b:g}"] = f"mixed{{avg-bits={b:g} rounding=nearest}}"
        out[f"mixed {b:g} gptq"] = f"mixed{{avg-bits={b:g} rounding=gptq}}"
        if sensitivity:
            out[f"mixed {b:g} sens."] = f"mixed{{avg-bits={b:g} scope=model sensitivity=output}}"
    return out


def compile_all(source: Path, work: Path, batches, budgets: list[float], sensitivity: bool,
                mixed_options: str = "") -> dict[str, dict[str, Any]]:
    import qcompiler

    out = {}
    for label, pipeline in variants(budgets, sensitivity).items():
        folder = work / label.replace(" ", "-").replace(".", "")
        start = time.perf_counter()
        result = qcompiler.compile(str(source), folder, pipeline=common.with_mixed_options(pipeline, mixed_options),
                                   calibration=None if pipeline == "default" else batches,
                                   drift=False, threads=common.THREADS, cache_dir=None)
        manifest = json.loads((folder / "manifest.json").read_text())
        out[label] = {"pipeline": result.pipeline, "model": str(folder / "model.onnx"), "compile_s": round(time.perf_counter() - start, 1),
                      "effective_bits": manifest.get("effective_bits_per_weight"), "bytes": (folder / "model.onnx").stat().st_size}
        log(f"{source.stem}: {label} compiled in {out[label]['compile_s']} s, {out[label]['effective_bits']} bits per weight")
    return out


def bench_efficientnet(args, work: Path) -> dict[str, Any]:
    from qcompiler.analysis.execute import ort_session
    from qcompiler.models import efficientnet_lite as eff
    import qcompiler.models as qm

    bundled = qm.get("efficientnet-lite0")
    calibration = bundled.calibration_crops()
    batches = [eff.to_feeds(calibration[i:i + equalize.BATCH]) for i in range(0, len(calibration), equalize.BATCH)]
    compiled = compile_all(equalize.capture_once(bundled.name, work), work, batches, args.budgets, args.sensitivity,
                           args.mixed_options)
    sessions = {label: ort_session(v["model"], common.THREADS) for label, v in compiled.items()}
    crops = [c for _, c in bundled.evaluation_crops(args.grid)]
    logits = {label: np.concatenate([s.run(None, eff.to_feeds(crops[i:i + equalize.BATCH]))[0] for i in range(0, len(crops), equalize.BATCH)])
              for label, s in sessions.items()}
    reference = logits["float32"].astype(np.float64)
    scores = {label: {"top-1 agreement %": round(100 * eff.top1_agreement(logits["float32"], value), 2),
                      "logit rel. MSE": round(float(np.mean(np.sum((value - reference) ** 2, axis=1) / np.sum(reference ** 2, axis=1))), 5)}
              for label, value in logits.items()}
    feeds = eff.to_feeds(crops[:1])
    timing = common.interleaved_latency({label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()},
                                        warmup=3, repeats=args.repeats, reference="float32")
    return {"model": bundled.name, "evaluation": f"{len(crops)} crops of {', '.join(eff.EVALUATION_PHOTOS)}",
            "variants": compiled, "scores": scores, "latency_ratio": {k: v["paired_ratio"] for k, v in timing.items()}}


def bench_ffdnet(name: str, args, work: Path) -> dict[str, Any]:
    from qcompiler.analysis.execute import ort_session
    import qcompiler.models as qm

    bundled = qm.get(name)
    batches, _ = imaging.calibration_batches(bundled)
    compiled = compile_all(equalize.capture_once(name, work), work, batches, args.budgets, args.sensitivity,
                           args.mixed_options)
    sessions = {label: ort_session(v["model"], common.THREADS) for label, v in compiled.items()}
    targets = imaging.evaluation_targets(bundled, args.count, args.crop)
    quality = imaging.quality(sessions, targets, [25.0])
    scores = {label: {"PSNR dB @ 25": quality[label]["25"]["psnr"],
                      "drop dB": round(quality["float32"]["25"]["psnr"] - quality[label]["25"]["psnr"], 3)} for label in sessions}
    timing = imaging.latency(sessions, bundled, args.repeats)
    return {"model": name, "evaluation": ", ".join(t[0] for t in targets), "variants": compiled, "scores": scores,
            "latency_ratio": {k: v["paired_ratio"] for k, v in timing.items()}}


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        columns = list(next(iter(r["scores"].values())))
        rows = [[label, "" if v["effective_bits"] is None else f"{v['effective_bits']:.2f}", f"{v['bytes'] / 1e6:.2f}",
                 *(str(r["scores"][label][c]) for c in columns), f"{r['latency_ratio'][label]:.2f}", f"{v['compile_s']:.0f}"]
                for label, v in r["variants"].items()]
        lines += [f"{r['model']} on {r['evaluation']}",
                  common.table(["variant", "stored bits per weight", "MB", *columns, "latency x float32", "compile s"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[4.0, 6.0])
    parser.add_argument("--sensitivity", action="store_true", help="also mixed{... scope=model sensitivity=output}")
    parser.add_argument("--grid", type=int, default=3, help="EfficientNet: grid x grid crops per evaluation photo (default 3)")
    parser.add_argument("--count", type=int, help="FFDNet: the first N evaluation photos only")
    parser.add_argument("--crop", type=int, help="FFDNet: centre crops of this size instead of whole photos")
    parser.add_argument("--repeats", type=int, default=10, help="latency rounds (default 10)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "mixed_convs.json")
    common.add_mixed_options(parser)
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
