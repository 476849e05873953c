"""Pipelines side by side on one bundled model, with the peer benchmark's data and scoring.

    python benchmarks/recipes.py --model minilm-l6 "mixed{avg-bits=3}" "mixed{avg-bits=3 rounding=gptq}" \
        --output benchmarks/results/recipes_minilm_3bit.json
    python benchmarks/recipes.py --model smollm2-135m "mixed{avg-bits=4.25}" "canonicalize,calibrate,..." --work DIR

For trying a recipe against a preset before making it one: each pipeline compiles the same float
model (captured once with the `default` pipeline, kept in `--work`, as `benchmarks/peers.py` keeps it) on the same calibration
batches as `benchmarks/peers.py` (`mixed_pareto.calibration`) and is scored by the same code
(`mixed_pareto.Evaluator`: SmolLM2 perplexity on the first `--windows` 256-token windows of the
first three quarters of the WikiText excerpt, MiniLM STS Spearman x100 on all pairs). Prints one
row per pipeline (effective bits as the manifest counts them, quality, its difference to float,
compile seconds) and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import mixed_pareto  # noqa: E402
from peers import float_model  # noqa: E402

MODELS = ("minilm-l6", "smollm2-135m")


def evaluator(model: str, work: Path, windows: int) -> mixed_pareto.Evaluator:
    text = work / "eval-head.txt"
    if model == "smollm2-135m":
        text.write_text(common.wikitext_split()[0], encoding="utf-8")
    return mixed_pareto.Evaluator(model, text, windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", nargs="+", help="pipeline specs, compiled in turn")
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 perplexity windows of 256 tokens (8)")
    parser.add_argument("--threads", type=int, default=common.THREADS, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=None, help="folder for the float model and the artifacts, under MODEL/ (default: build/recipes)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/recipes_MODEL.json)")
    args = parser.parse_args(argv)
    common.quiet()
    mixed_pareto.THREADS = args.threads
    threads = common.fix_threads(args.threads)
    root = Path(args.work or "build/recipes")
    work = root / args.model
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output or common.RESULTS / f"recipes_{args.model}.json")
    source = float_model(args.model, args, root)[0] / "model.onnx"  # the peers benchmark's float model, WORK/MODEL/float
    batches, calibration = mixed_pareto.calibration(args.model)
    score = evaluator(args.model, work, args.windows)
    metric = "perplexity" if args.model == "smollm2-135m" else "spearman_x100"
    base = score(source)[metric]
    rows = []
    body = {"benchmark": "recipes", "command": common.command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": common.machine(), "packages": common.packages(), "git": common.git_state(), "threads": threads,
            "model": args.model, "metric": metric, "calibration": calibration, "float": base, "rows": rows}
    common.log(f"{args.model}: float {metric} {base:.3f}")
    for index, pipeline in enumerate(args.pipelines):
        row = mixed_pareto.compile_ours(source, work / f"recipe-{index}", pipeline, batches)
        if "error" not in row:
            scored = score(work / f"recipe-{index}" / "model.onnx")
            quality = scored[metric]
            # label-free closeness to the float model where the score gives it (MiniLM: the embeddings' mean cosine)
            row.update({metric: quality, "to_float": round(quality - base, 3),
                        **{k: scored[k] for k in ("mean_cosine_vs_float", "top1_agreement_vs_float") if k in scored}})
        rows.append({"spec": pipeline, **row})
        common.write_json(output, body)
        common.log(f"{pipeline}: {row.get(metric, row.get('error'))}")
    closeness = "mean_cosine_vs_float" if args.model == "minilm-l6" else "top1_agreement_vs_float"
    lines = [f"bits   | {metric} | to float | {closeness} | compile s | pipeline"]
    for row in rows:
        quality = f"{row[metric]:.2f}" if metric in row else row.get("error", "")[:60]
        lines.append(f"{row.get('effective_bits', 0):.4f} | {quality} | {row.get('to_float', '')} | {row.get(closeness, '')} | "
                     f"{row.get('compile_s', '')} | {row['spec']}")
    print("\n".join(lines))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
