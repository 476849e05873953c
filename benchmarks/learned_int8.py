"""Block-wise learning after int8 quantization: `w8a8` against `w8a8{tuning=scales}` (the int8
weights' per-channel scales and the activation grids learned against the float blocks, codes
frozen) and `w8a8{tuning=flexround}` (the weights' rounding learned too), on the FFDNet denoisers
(PSNR against the clean photo at sigma 15, 25 and 50) and MiniLM (STS Spearman).

    python benchmarks/learned_int8.py                                   # all (about 25 min on 2 cores)
    python benchmarks/learned_int8.py --models ffdnet-gray --sigmas 25   # one model, one noise level

FFDNet: calibrated on the batches `benchmarks/imaging.py` uses (centre crops of at most 256 x 256 of
the calibration photos at sigma 15, 25 and 50), evaluated with `qcompiler eval --task denoise` on
the whole evaluation photos. MiniLM: calibrated on the first 128 lines of the WikiText-2 excerpt,
evaluated with `qcompiler eval --task sts` on the STS pairs. Each row records the compile time and,
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

MODELS = ("ffdnet-gray", "ffdnet-rgb", "minilm-l6")
SIGMAS = (15.0, 25.0, 50.0)
VARIANTS = {"w8a8": "w8a8", "w8a8 scales": "w8a8{tuning=scales}", "w8a8 flexround": "w8a8{tuning=flexround}"}
LEARNING_PASSES = ("tune-scales", "flexround")


def calibration(name: str):
    if name.startswith("ffdnet"):
        import imaging
        import qcompiler.models as qm

        batches, described = imaging.calibration_batches(qm.get(name))
        return {"calibration": batches}, described
    return {"calibration": str(common.WIKITEXT), "calib_count": 128}, f"{common.WIKITEXT.name}, first 128 lines"


def compile_variant(name: str, pipeline: str, out: Path, data: dict) -> dict[str, Any]:
    import qcompiler

    start = time.perf_counter()
    result = qcompiler.compile(name, out, pipeline=pipeline, drift=False, threads=common.THREADS, **data)
    row: dict[str, Any] = {"pipeline": result.pipeline, "compile_s": round(time.perf_counter() - start, 1)}
    for record in result.records:
        if record.name in LEARNING_PASSES:
            stats = record.stats
            row["learning"] = {k: stats.get(k) for k in ("mode", "blocks", "blocks_improved", "activation_grids_learned",
                                                          "loss_before", "loss_after", "seconds")}
    return row


def evaluate_variant(name: str, artifact: Path, sigmas) -> dict[str, Any]:
    from qcompiler.tools.evaluate import evaluate

    if name.startswith("ffdnet"):
        out = {}
        for sigma in sigmas:
            r = evaluate(artifact, "denoise", sigma=sigma, threads=common.THREADS)
            out[f"{sigma:g}"] = {k: r[k] for k in ("psnr_float", "psnr_compiled", "psnr_drop", "ssim_float", "ssim_compiled")}
        return out
    r = evaluate(artifact, "sts", common.STS, threads=common.THREADS)
    return {k: r[k] for k in ("pairs", "spearman_float", "spearman_compiled", "spearman_drop", "mean_cosine_float_vs_compiled")}


def bench_model(name: str, sigmas, work: Path) -> dict[str, Any]:
    data, described = calibration(name)
    log(f"{name}: calibration {described}")
    rows = {}
    for label, pipeline in VARIANTS.items():
        out = work / f"{name}-{label.replace(' ', '-')}"
        rows[label] = compile_variant(name, pipeline, out, data)
        rows[label]["quality"] = evaluate_variant(name, out, sigmas)
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
    parser.add_argument("--json", type=Path, default=common.RESULTS / "learned_int8.json")
    args = parser.parse_args(argv)
    common.fix_threads(common.THREADS)
    results = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qc-learned-int8-") as tmp:
        for name in args.models:
            results.append(bench_model(name, args.sigmas, Path(tmp)))
            payload = {"machine": common.machine(), "packages": common.packages(), "threads": common.THREADS, "results": results}
            args.json.write_text(json.dumps(payload, indent=1) + "\n")  # after each model: a later failure keeps it
    print(render(results))
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
