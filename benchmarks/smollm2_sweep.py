"""SmolLM2-135M: perplexity and effective bits for a list of pipelines, one row each.

Calibration: 28 windows of 128 tokens from the last quarter of the WikiText excerpt's non-empty
lines; evaluation: the first `--windows` windows of 256 tokens from the first three quarters (no
overlap). The float model is captured once; every pipeline compiles from its ONNX file.

    python benchmarks/smollm2_sweep.py [--windows 4] [--pipelines "w8a8" "mixed{avg-bits=4.25}" ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import qcompiler
from qcompiler.driver.compiler import package_versions
from qcompiler.tools.evaluate import evaluate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2-valid-excerpt.txt"
DEFAULT_PIPELINES = (
    "calibrate,allocate-bits{avg-bits=8 candidates=3 other-widths=expand outliers-act=0 outliers-weight=0},quantize-weights{grid=minmax}",
    "mixed{avg-bits=3.5}",
    "calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},quantize-weights{grid=minmax}",
    "mixed{avg-bits=4.25}",
    "mixed{avg-bits=4.25 scope=model}",
    "w8a8",
    "w8a8{act-mode=dynamic}",
    "w8a8{float-inputs=8}",
    "w8a8{float-inputs=24}",
)


def split_data(text: str, work: Path) -> tuple[Path, Path]:
    """Calibration windows (.npz) from the last quarter of the lines; evaluation text from the rest."""
    from qcompiler.models import smollm2

    lines = [line for line in text.splitlines() if line.strip()]
    cut = 3 * len(lines) // 4
    windows = smollm2.windows("\n".join(lines[cut:]), 128)
    calib = work / "calib.npz"
    np.savez(calib, input_ids=windows[:28])
    evaluation = work / "eval.txt"
    evaluation.write_text("\n".join(lines[:cut]))
    return calib, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--pipelines", nargs="+", default=list(DEFAULT_PIPELINES))
    parser.add_argument("--json", default="benchmarks/results/smollm2_sweep.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib, evaluation = split_data(Path(args.data).read_text(encoding="utf-8"), work)
        qcompiler.compile("smollm2-135m", work / "float", drift=False)
        for index, pipeline in enumerate(args.pipelines):
            out = work / f"v{index}"
            start = time.perf_counter()
            result = qcompiler.compile(work / "float" / "model.onnx", out, pipeline=pipeline, calibration=calib,
                                       calib_count=28, drift=False)
            seconds = time.perf_counter() - start
            scores = evaluate(out, "perplexity", evaluation, count=args.windows, model="smollm2-135m")
            rows.append({
                "pipeline": pipeline,
                "resolved": result.pipeline,
                "effective_bits": result.manifest["effective_bits_per_weight"],
                "perplexity_float": scores["perplexity_float"],
                "perplexity": scores["perplexity_compiled"],
                "ratio": scores["perplexity_ratio"],
                "compile_s": round(seconds, 1),
            })
            print(f"{pipeline:<110} {rows[-1]['effective_bits']:>6.3f} bits  ppl ratio {rows[-1]['ratio']:.4f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"windows": args.windows, "rows": rows, "packages": package_versions()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
