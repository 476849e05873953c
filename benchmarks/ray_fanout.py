"""Fan-out on Ray: one compile in-process, on 1 worker and on 2 workers; wall time, speedup, memory.

    python benchmarks/ray_fanout.py                                   # minilm-l6, sensitivity=output
    python benchmarks/ray_fanout.py --model smollm2-135m --pipeline "mixed{avg-bits=4.25 scope=model sensitivity=kl}"

Each run is a fresh child process calling `qcompiler.compile` with ONNX Runtime at `--threads`
intra-op threads (the driver's and every worker's sessions alike, so the runs compute the same
numbers), on `--calib-count` calibration samples (the bundled model's task data). The child's
process tree (the driver, and for Ray its raylet and workers) is sampled every 0.2 s: the peak of
the tree's summed RSS and the largest single process's peak. Recorded per run: wall time of the
child, the pipeline's time, the time of `allocate-bits` (the pass whose per-layer measurements fan
out), the model's SHA-256 (equal across runs, or the benchmark says so). From the in-process run
the serial fraction s = 1 - allocate-bits time / total time gives Amdahl's expected speedup on N
workers, 1 / (s + (1 - s) / N), printed beside the measured one. A table goes to stdout and the
JSON (machine, package versions, commit) to `benchmarks/results/ray_fanout.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = {"minilm-l6": "/work/shared/data/sts-pairs-dev.tsv", "smollm2-135m": "/work/shared/data/wikitext2-valid-excerpt.txt"}

CHILD = """
import json, sys, time
import qcompiler
args = json.loads(sys.argv[1])
start = time.perf_counter()
result = qcompiler.compile(args["model"], args["output"], pipeline=args["pipeline"], calibration=args["calib"],
                           calib_count=args["calib_count"], threads=args["threads"], drift=False, cache_dir=None,
                           workers=args["workers"])
seconds = time.perf_counter() - start
passes = {r.name: r.seconds for r in result.records}
print("RESULT " + json.dumps({"compile_s": seconds, "passes": passes}))
"""


def run_child(params: dict) -> dict:
    """One compile in a child process, its process tree's memory sampled while it runs."""
    try:
        import psutil
    except ImportError:
        psutil = None
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(params)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak = process_peak = 0
    while child.poll() is None:
        if psutil is not None:
            try:
                root = psutil.Process(child.pid)
                rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running()]
                tree_peak, process_peak = max(tree_peak, sum(rss)), max(process_peak, max(rss, default=0))
            except psutil.Error:
                pass
        time.sleep(0.2)
    out, err = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"compile with workers={params['workers']} failed: {err.strip().splitlines()[-1:]}")
    result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    model = Path(params["output"]) / "model.onnx"
    return {"wall_s": round(wall, 2), "compile_s": round(result["compile_s"], 2),
            "allocate_bits_s": round(result["passes"].get("allocate-bits", 0.0), 2),
            "pipeline_s": round(sum(result["passes"].values()), 2),
            "peak_rss_tree_mb": round(tree_peak / 2**20), "peak_rss_process_mb": round(process_peak / 2**20),
            "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}


def amdahl(serial: float, workers: int) -> float:
    return 1.0 / (serial + (1.0 - serial) / workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--pipeline", default="mixed{avg-bits=4.25 scope=model sensitivity=output}")
    parser.add_argument("--calib", help="calibration file (default: the model's data under /work/shared/data)")
    parser.add_argument("--calib-count", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per session (default 1)")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to run, 0 meaning in-process (default 0,1,2)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ray_fanout.json"))
    args = parser.parse_args()
    calib = args.calib or DATA.get(args.model)
    counts = [int(w) for w in args.workers.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in counts:
            params = {"model": args.model, "output": str(Path(tmp) / f"w{workers}"), "pipeline": args.pipeline, "calib": calib,
                      "calib_count": args.calib_count, "threads": args.threads, "workers": workers or None}
            row = {"workers": workers or "in-process", **run_child(params)}
            runs.append(row)
            print(f"done: {row['workers']}: {row['wall_s']} s", flush=True)
    base = next((r for r in runs if r["workers"] == "in-process"), runs[0])
    serial = 1.0 - base["allocate_bits_s"] / base["compile_s"] if base["compile_s"] else 1.0
    for row in runs:
        row["speedup"] = round(base["wall_s"] / row["wall_s"], 3)
        row["allocate_bits_speedup"] = round(base["allocate_bits_s"] / row["allocate_bits_s"], 3) if row["allocate_bits_s"] else None
        n = row["workers"] if isinstance(row["workers"], int) else 1
        row["amdahl_expected"] = round(amdahl(serial, n), 3)
    identical = len({r["model_sha256"] for r in runs}) == 1
    print(common.table(
        ["workers", "wall s", "speedup", "Amdahl", "allocate-bits s", "its speedup", "peak RSS tree MB", "largest process MB"],
        [[r["workers"], r["wall_s"], r["speedup"], r["amdahl_expected"], r["allocate_bits_s"], r["allocate_bits_speedup"],
          r["peak_rss_tree_mb"], r["peak_rss_process_mb"]] for r in runs]))
    print(f"serial fraction (in-process, outside allocate-bits): {serial:.3f}; artifacts byte-identical: {identical}")
    common.write_json(Path(args.out), {
        "command": common.command_line(), "model": args.model, "pipeline": args.pipeline, "calib": calib,
        "calib_count": args.calib_count, "ort_threads_per_session": args.threads, "serial_fraction": round(serial, 4),
        "artifacts_identical": identical, "runs": runs, "machine": common.machine(), "packages": common.packages(),
        "git": common.git_state(),
    })
    if not identical:
        raise SystemExit("the artifacts differ between worker counts")


if __name__ == "__main__":
    main()
