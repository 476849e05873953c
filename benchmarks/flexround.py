"""Learned rounding (flexround) against round-to-nearest at the same allocation and calibration.

    python benchmarks/flexround.py                                   # smollm2-135m and minilm-l6
    python benchmarks/flexround.py --models smollm2-135m --budgets 3 # one model, one budget
    python benchmarks/flexround.py --flex "flexround{steps=50 time-budget=300}"

Each model is captured once (`qcompiler.compile(NAME, DIR, pipeline="default")`); every variant is
compiled from that float `model.onnx` with the same calibration feeds (those of
`benchmarks/mixed_pareto.py`: smollm2 28 windows of 128 tokens from the last quarter of the WikiText
excerpt; minilm the first 128 sentences), 2 threads for torch and ONNX Runtime. Per budget B:

- `rtn B`:  `calibrate,allocate-bits{avg-bits=B},quantize-weights,lower-ort` (allocate-bits' defaults, sparse outliers included);
- `flex B`: the same with `--flex` (default `flexround{steps=500 time-budget=660}`) after
  `quantize-weights`; allocation and calibration are identical (both deterministic);
- `scales B` (with `--variants rtn flex scales`): the same with `--scales` (default
  `tune-scales{steps=100 time-budget=330}`).

Quality: smollm2 perplexity over the first `--windows` 256-token windows of the first three quarters
of the excerpt; minilm STS Spearman x100 over all pairs (the scoring code of mixed_pareto.py).
`gap recovered` = (quality(rtn) - quality(flex)) / (quality(rtn) - quality(float)). `added s` = the
learning pass's own time; `compile s` = the whole compile from the float file. The CPU is shared with
other jobs: the load average at the start and end is recorded.

Output: a table per model on stdout and `benchmarks/results/flexround.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import mixed_pareto as mp  # noqa: E402

DEFAULT_FLEX = "flexround{steps=500 time-budget=660}"
DEFAULT_SCALES = "tune-scales{steps=100 time-budget=330}"


def run_model(name: str, args, work: Path) -> dict:
    import qcompiler

    mp.THREADS = common.THREADS
    head, _ = mp.wikitext_split()
    eval_text = work / "eval-head.txt"
    eval_text.write_text(head, encoding="utf-8")
    mdir = work / name
    mp.log(f"{name}: capture + float compile")
    float_result = qcompiler.compile(name, mdir / "float", pipeline="default", drift=False, threads=common.THREADS)
    float_path = mdir / "float" / "model.onnx"
    batches, calib_desc = mp.calibration(name)
    evaluator = mp.Evaluator(name, eval_text, args.windows)
    metric = mp.METRIC[name]
    rows = {"float32": {"effective_bits": 32.0, **evaluator(float_path)}}
    mp.log(f"{name}: float {rows['float32'][metric]}")
    for budget in args.budgets:
        base = f"calibrate,allocate-bits{{avg-bits={budget:g}}},quantize-weights"
        variants = [(f"rtn {budget:g}", f"{base},lower-ort", None), (f"flex {budget:g}", f"{base},{args.flex},lower-ort", "flexround"),
                    (f"scales {budget:g}", f"{base},{args.scales},lower-ort", "tune-scales")]
        variants = [v for v in variants if v[0].split()[0] in args.variants]
        for label, pipeline, learner in variants:
            mp.log(f"{name}: compile {label}: {pipeline}")
            row = {"budget": budget, **mp.compile_ours(float_path, mdir / label.replace(" ", "-"), pipeline, batches)}
            if "error" in row:
                mp.log(f"{name}: {label} refused: {row['error']}")
                rows[label] = row
                continue
            row["load_average_after_compile"] = list(os.getloadavg())
            if learner:
                row["added_s"] = row["pass_seconds"].get(learner)
                report = Path(row["artifact"]).parent / f"{Path(row['artifact']).name}.report.json"
                row["learning"] = _learning_stats(report, learner)
            row.update(evaluator(Path(row["artifact"]) / "model.onnx"))
            mp.log(f"{name}: {label}: {metric} {row[metric]} ({row['effective_bits']} bits, {row['compile_s']} s)")
            rows[label] = row
            mp._drop(row, args)
        rtn = rows.get(f"rtn {budget:g}", {})
        for label in (f"flex {budget:g}", f"scales {budget:g}"):
            row = rows.get(label, {})
            if metric in row and metric in rtn and rtn[metric] != rows["float32"][metric]:
                row["gap_recovered"] = round((rtn[metric] - row[metric]) / (rtn[metric] - rows["float32"][metric]), 4)
    return {"metric": metric, "calibration": calib_desc, "rows": rows,
            "float_compile": {"weights": float_result.manifest["weights"]}}


def _learning_stats(report: Path, learner: str) -> dict:
    import json

    try:
        body = json.loads(report.read_text())
    except OSError:
        return {}
    for p in body.get("passes", []):
        if p.get("name") == learner:
            stats = dict(p.get("stats") or {})
            blocks = stats.pop("per_block", [])
            stats["steps_per_block"] = [b.get("steps") for b in blocks]
            stats["relative_error_before"] = [b.get("relative_error_before") for b in blocks]
            stats["relative_error_after"] = [b.get("relative_error_after") for b in blocks]
            stats["kept"] = [b.get("kept") for b in blocks]
            return stats
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.0, 4.0])
    parser.add_argument("--flex", default=DEFAULT_FLEX)
    parser.add_argument("--scales", default=DEFAULT_SCALES)
    parser.add_argument("--variants", nargs="+", choices=["rtn", "flex", "scales"], default=["rtn", "flex"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "flexround.json")
    args = parser.parse_args()
    mp.quiet()
    threads = common.fix_threads()
    start = time.perf_counter()
    body = {"benchmark": "flexround", "command": common.command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": common.machine(), "packages": common.packages(), "git": common.git_state(), "threads": threads,
            "options": {"flex": args.flex, "scales": args.scales if "scales" in args.variants else None, "variants": args.variants, "budgets": args.budgets,
                        "windows": args.windows}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="qc-flexround-") as tmp:
        for name in args.models:
            body["models"][name] = run_model(name, args, Path(tmp))
            body["total_seconds"] = round(time.perf_counter() - start, 1)
            body["load_average_at_end"] = list(os.getloadavg())
            common.write_json(args.out, body)
    for name, result in body["models"].items():
        metric = result["metric"]
        table = []
        for label, row in result["rows"].items():
            table.append([label, row.get("effective_bits"), row.get(metric, row.get("error", "")), row.get("gap_recovered"),
                          row.get("compile_s"), row.get("added_s")])
        print(f"\n{name} ({metric})")
        print(common.table(["variant", "eff. bits", metric, "gap recovered", "compile s", "added s"], table))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
