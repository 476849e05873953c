"""Embedding tables inside the bit budget: the width `allocate-bits{embeddings=budget}` chooses against
both fixed widths, at the same total bits.

    python benchmarks/embedding_budget.py                                   # smollm2-135m and minilm-l6, totals 4.25 and 6
    python benchmarks/embedding_budget.py --models minilm-l6 --totals 4.25

For each model and total budget B (bits per weight over the layers' weights and the tables'
entries together), three artifacts, compiled from the float ONNX file with the calibration batches
of `benchmarks/mixed_pareto.py` (held apart from the evaluation text) and evaluated as it does:
- `budget`: `mixed{avg-bits=B embedding=budget}`: each table's width (4 or 8 bits) chosen by the
  allocator with the layers' bits, for the least predicted error;
- `tables 4-bit`: `mixed{avg-bits=B4 embedding=int4}`, B4 = (B (L + T) - bits of the tables at 4) / L;
- `tables 8-bit`: the same with every table at 8 bits;
with L the layers' weights and T the tables' entries, so that all three store the same total
(the layers' allocation holds its average; the tables are priced as `lower-ort` writes them).
A row the preset refuses (a budget below what its candidates allow) records the message.

Quality as in `mixed_pareto.py`: SmolLM2 perplexity on 8 windows of 256 tokens of the first three
quarters of the WikiText excerpt, MiniLM STS Spearman x100. Bits: the manifest's
`effective_bits_per_weight_with_tables`. 2 ONNX Runtime threads. Table on stdout, JSON in
`benchmarks/results/embedding_budget.json`.
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
from common import (RESULTS, THREADS, add_mixed_options, git_state, machine, packages, table,  # noqa: E402
                    wikitext_split, with_mixed_options)
from mixed_pareto import METRIC, calibration, compile_ours, evaluate_ours, quiet  # noqa: E402

MODELS = ("smollm2-135m", "minilm-l6")
TOTALS = (4.25, 6.0)
WINDOWS = 8


def fixed_average(total: float, layers: int, tables: list[list[int]], bits: int) -> float:
    """The layers' average that, with every table at `bits`, stores `total` bits per weight overall."""
    from qcompiler.analysis import bitcost

    entries = sum(rows * cols for rows, cols in tables)
    stored = sum(bitcost.table_bits(rows, cols, bits, 32) for rows, cols in tables)
    return (total * (layers + entries) - stored) / layers


def run_model(name: str, totals: list[float], work: Path, windows: int, mixed_options: str = "") -> dict[str, Any]:
    import qcompiler

    batches, calib_desc = calibration(name)
    float_dir = work / name / "float"
    qcompiler.compile(name, float_dir, pipeline="default", drift=False, threads=THREADS)
    source = float_dir / "model.onnx"
    eval_text = work / "eval-head.txt"  # the first three quarters (calibration is cut from the last)
    eval_text.write_text(wikitext_split()[0], encoding="utf-8")
    rows = {"float": evaluate_ours(name, float_dir, eval_text, windows)}
    for total in totals:
        budget = compile_ours(source, work / name / f"budget-{total:g}",
                              with_mixed_options(f"mixed{{avg-bits={total:g} embedding=budget}}", mixed_options), batches)
        rows[f"{total:g} budget"] = row = {**budget, **_bits(budget)}
        if "error" in budget:
            continue
        row.update(evaluate_ours(name, Path(budget["artifact"]), eval_text, windows))
        shapes = [t["shape"] for t in row["tables"].values()]
        for bits in (4, 8):
            average = fixed_average(total, budget["weights"], shapes, bits)
            label = f"{total:g} tables {bits}-bit"
            pipeline = with_mixed_options(f"mixed{{avg-bits={average:.4f} embedding=int{bits}}}", mixed_options)
            if not 2.0 <= average <= 16.0:
                rows[label] = {"pipeline": pipeline, "error": f"the layers' average would be {average:.3f} bits"}
                continue
            fixed = compile_ours(source, work / name / f"t{bits}-{total:g}", pipeline, batches)
            rows[label] = {**fixed, **_bits(fixed), "layers_average": round(average, 4)}
            if "error" not in fixed:
                rows[label].update(evaluate_ours(name, Path(fixed["artifact"]), eval_text, windows))
    return {"calibration": calib_desc, "rows": rows}


def _bits(compiled: dict) -> dict:
    """The tables and the bits over tables and layers, from the artifact's manifest."""
    if "error" in compiled:
        return {}
    manifest = json.loads((Path(compiled["artifact"]) / "manifest.json").read_text())
    tables = manifest.get("embeddings", {}).get("tables", {})
    return {"tables": {k: {"shape": v["shape"], "bits": v["bits"]} for k, v in tables.items()},
            "bits_with_tables": manifest.get("effective_bits_per_weight_with_tables")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--totals", default=",".join(f"{t:g}" for t in TOTALS), help="total bits per weight, tables included")
    parser.add_argument("--windows", type=int, default=WINDOWS, help="smollm2 perplexity windows of 256 tokens")
    parser.add_argument("--json", default=str(RESULTS / "embedding_budget.json"))
    add_mixed_options(parser)
    args = parser.parse_args(argv)
    quiet()
    totals = [float(t) for t in args.totals.split(",")]
    result = {"machine": machine(), "packages": packages(), "git": git_state(), "threads": THREADS, "totals": totals,
              "windows": args.windows, "mixed_options": args.mixed_options, "models": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qc_embedding_budget_") as tmp:
        for name in args.models.split(","):
            result["models"][name] = run_model(name, totals, Path(tmp), args.windows, args.mixed_options)
            metric = METRIC[name]
            print(f"\n{name}: {metric} at equal total bits (layers and tables)")
            print(table(["row", "bits with tables", "layers' bits", "tables", metric, "compile s"], [
                [label, r.get("bits_with_tables", "-"), r.get("effective_bits", "-"),
                 ", ".join(f"{v['bits']}" for v in r.get("tables", {}).values()) or "-",
                 f"{r[metric]:.3f}" if metric in r else str(r.get("error", "-"))[:60], r.get("compile_s", "-")]
                for label, r in result["models"][name]["rows"].items()], "lrrlrr"))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
