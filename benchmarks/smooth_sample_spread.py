"""How much SmolLM2's static `w8a8` perplexity moves with which rows calibration samples.

Calibration keeps a sample of 512 rows per tensor, chosen by a fixed hash of each row's id
(`qcompiler.analysis.calibration`, "Sample"); `smooth{alpha=auto}` searches its alphas on those
rows. This benchmark varies only that hash's seed (here, in the compiling process, never a
compile option) and reports the perplexity of each compile, with the same commands otherwise:

    qcompiler compile smollm2-135m -o OUT --pipeline w8a8 --calib DATA/wikitext2-valid-excerpt.txt --calib-count 64 --no-cache
    qcompiler eval OUT --task perplexity --data DATA/wikitext2-valid-excerpt.txt --count 8

plus `w8a8{act-mode=per-token}` once (the shipped seed) and MiniLM's `w8a8` STS Spearman
(`qcompiler compile minilm-l6 -o OUT --pipeline w8a8 --calib DATA/sts-pairs-dev.tsv`, then
`qcompiler eval OUT --task sts --data DATA/sts-pairs-dev.tsv`). Each row also records the alphas
`smooth` chose (from the compile's report), so two runs can be compared group by group.

    python benchmarks/smooth_sample_spread.py [--seeds shipped 1 2] [--no-per-token] [--no-minilm] \
        [--json benchmarks/results/smooth_sample_spread.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHIPPED = "shipped"  # the seed calibration uses
# Runs the CLI with calibration's row-sample seed replaced (argv[1]: the seed, or "shipped"; the rest: the CLI's arguments).
RUN_WITH_SEED = (
    "import sys\n"
    "import numpy as np\n"
    "from qcompiler.analysis import calibration\n"
    "if sys.argv[1] != 'shipped':\n"
    "    calibration._SAMPLE_SEED = np.uint64(int(sys.argv[1], 0))\n"
    "from qcompiler.tools.cli import main\n"
    "raise SystemExit(main(sys.argv[2:]))\n"
)


def qcompiler(seed: str, args: list[str]) -> str:
    """Run `qcompiler ARGS` from the repository root with the row-sample seed `seed`; its stdout."""
    done = subprocess.run([sys.executable, "-c", RUN_WITH_SEED, seed, *args], cwd=common.REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"qcompiler {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def smooth_record(report: Path) -> tuple[dict[str, float], float | None]:
    """(the alpha `smooth` chose for each layer group, input name -> alpha; the pass's seconds), from a compile's report."""
    records = json.loads(report.read_text()).get("passes", [])
    smooth = next((r for r in records if r.get("name") == "smooth"), None)
    if smooth is None:
        return {}, None
    return {name: group["alpha"] for name, group in smooth["stats"].get("layers", {}).items()}, smooth["seconds"]


def alpha_change(alphas: dict[str, float], reference: dict[str, float]) -> float:
    """Mean |alpha - reference alpha| over the layer groups both runs searched."""
    shared = sorted(set(alphas) & set(reference))
    return statistics.mean(abs(alphas[k] - reference[k]) for k in shared) if shared else 0.0


def measure(model: str, pipeline: str, seed: str, calib: Path, calib_count: int | None, task: str, data: Path,
            count: int | None, work: Path) -> dict:
    out, report = work / "out", work / "report.json"
    compile_args = ["-q", "compile", model, "-o", str(out), "--pipeline", pipeline, "--calib", str(calib), "--no-cache",
                    "--report", str(report)]
    if calib_count is not None:
        compile_args += ["--calib-count", str(calib_count)]
    started = time.perf_counter()
    qcompiler(seed, compile_args)
    compile_s = time.perf_counter() - started
    eval_args = ["eval", str(out), "--task", task, "--data", str(data), "--json"] + (["--count", str(count)] if count else [])
    result = json.loads(qcompiler(SHIPPED, eval_args))
    metric = "perplexity" if task == "perplexity" else "spearman"
    if f"{metric}_compiled" not in result:
        raise SystemExit(f"eval printed no '{metric}_compiled': {sorted(result)}")
    alphas, smooth_s = smooth_record(report)
    return {"model": model, "pipeline": pipeline, "seed": seed, "metric": metric, "value": result[f"{metric}_compiled"],
            "float": result[f"{metric}_float"], "compile_s": round(compile_s, 1), "smooth_s": smooth_s, "alphas": alphas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", default=[SHIPPED, "1", "2"], help="row-sample seeds (shipped, or integers)")
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--count", type=int, default=8, help="perplexity windows")
    parser.add_argument("--no-per-token", action="store_true", help="skip w8a8{act-mode=per-token}")
    parser.add_argument("--no-minilm", action="store_true", help="skip MiniLM's w8a8 STS")
    parser.add_argument("--json", default=str(common.RESULTS / "smooth_sample_spread.json"))
    parser.add_argument("--append", action="store_true", help="keep the rows already in --json and add these (a run done in parts)")
    args = parser.parse_args()
    runs = [("smollm2-135m", "w8a8", seed) for seed in args.seeds]
    if not args.no_per_token:
        runs.append(("smollm2-135m", "w8a8{act-mode=per-token}", SHIPPED))
    if not args.no_minilm:
        runs.append(("minilm-l6", "w8a8", SHIPPED))
    path = Path(args.json)
    results = json.loads(path.read_text())["results"] if args.append and path.is_file() else []
    for model, pipeline, seed in runs:
        common.log(f"{model} {pipeline} seed {seed} ...")
        with tempfile.TemporaryDirectory() as tmp:
            if model == "minilm-l6":
                row = measure(model, pipeline, seed, common.STS, None, "sts", common.STS, None, Path(tmp))
            else:
                row = measure(model, pipeline, seed, common.WIKITEXT, args.calib_count, "perplexity", common.WIKITEXT,
                              args.count, Path(tmp))
        common.log(f"  {row['metric']} {row['value']:.4f} (compile {row['compile_s']} s, smooth {row['smooth_s']} s)")
        results.append(row)
        common.write_run(path, common.THREADS, results, "(partial: the run is still going)")  # rows so far, if the run stops
    static = [r["value"] for r in results if r["model"] == "smollm2-135m" and r["pipeline"] == "w8a8"]
    first = {(r["model"], r["pipeline"]): r["alphas"] for r in reversed(results)}  # each pipeline's first run
    rows = [[r["model"], r["pipeline"], r["seed"], f"{r['value']:.2f} ({r['float']:.2f})",
             f"{statistics.mean(r['alphas'].values()):.3f}" if r["alphas"] else "-",
             f"{alpha_change(r['alphas'], first[(r['model'], r['pipeline'])]):.3f}", f"{r['smooth_s']:.1f}"] for r in results]
    text = common.table(["model", "pipeline", "row-sample seed", "perplexity / Spearman (float)", "mean alpha",
                         "mean |alpha - first seed's|", "smooth s"], rows)
    if len(static) > 1:
        text += f"\nSmolLM2 w8a8 over {len(static)} seeds: min {min(static):.2f}, max {max(static):.2f}, spread {max(static) - min(static):.2f}"
    common.finish_run(Path(args.json), common.THREADS, results, text)


if __name__ == "__main__":
    main()
