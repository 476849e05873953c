"""Fan-out on Ray: one compile in-process, on 1 worker and on 2 workers; wall time, speedup, memory.

    python benchmarks/ray_fanout.py                                   # minilm-l6, sensitivity=output
    python benchmarks/ray_fanout.py --model smollm2-135m --pipeline "mixed{avg-bits=4.25 scope=model sensitivity=kl}"
    python benchmarks/ray_fanout.py --pipeline w8a8 --pass smooth --repeats 3 --blas-threads 1 \
        --out benchmarks/results/ray_fanout_smooth.json                # smooth{alpha=auto}'s search
    python benchmarks/ray_fanout.py --pipeline "w8a8{alpha=0.5}" --pass calibrate --calib-count 256 \
        --blas-threads 1 --out benchmarks/results/ray_fanout_calibrate.json  # calibration over shards
    python benchmarks/ray_fanout.py --doctor --model smollm2-135m --pipeline "mixed{avg-bits=3}" --calib-count 8 \
        --workers 0,2 --out benchmarks/results/ray_fanout_doctor_smollm2.json  # the doctor's measurements

Each run is a fresh child process calling `qcompiler.compile` with ONNX Runtime at `--threads`
intra-op threads (the driver's and every worker's sessions alike, so the runs compute the same
numbers; `--blas-threads N` also sets numpy's BLAS threads in the compiling process, which Ray
runs on one thread in its workers), on `--calib-count` calibration samples (the bundled model's
task data). The child's process tree (the driver, and for Ray its raylet and workers) is sampled every 0.2 s: the peak of
the tree's summed RSS and the largest single process's peak. Recorded per run: wall time of the
child, the pipeline's time, the time of the fanned-out pass (`--pass`: `allocate-bits` by
default, whose per-layer measurements fan out; `smooth` for `smooth{alpha=auto}`'s per-group
search; `calibrate` for calibration's shards of batches), the model's SHA-256 (equal across runs, or the benchmark says so), and the load average
before and after (the machine may be shared). With `--repeats R` the worker counts take turns R
times (0, 1, 2, 0, 1, 2, ...), so that a change in the load falls on every count alike; the table
gives each count's median. From the first count's median (in-process, or the fewest workers) the
serial fraction s = 1 - pass time / compile time gives Amdahl's expected speedup on N workers,
1 / (s + (1 - s) / N), printed beside the measured one. With `--doctor` each run is
`qcompiler doctor`'s diagnosis (`doctor.diagnose`) instead of a compile: the fanned-out time is
that of every fanned-out map (the layer measurements, `Switchboard.errors`: the 2N+2 runs and the
re-measurement rounds; and the maps of the pipelines it runs, such as `allocate-bits`' measured
sensitivity), and the diagnosis, less its pass timings, must be equal across runs. A table goes to stdout and the JSON
(machine, package versions, commit) to `--out` (default `benchmarks/results/ray_fanout.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = {"minilm-l6": str(common.DATA / "sts-pairs-dev.tsv"), "smollm2-135m": str(common.DATA / "wikitext2-valid-excerpt.txt")}

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

DOCTOR_CHILD = """
import hashlib, json, sys, time
from qcompiler.support import parallel
from qcompiler.tools import doctor
args = json.loads(sys.argv[1])
measured, depth = [0.0], [0]
def timed(call):
    def wrapper(*a, **k):  # the outermost fanned-out call only (Switchboard.errors maps on Ray)
        depth[0] += 1
        start = time.perf_counter()
        try:
            return call(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                measured[0] += time.perf_counter() - start
    return wrapper
doctor.Switchboard.errors = timed(doctor.Switchboard.errors)
parallel.InProcess.map = timed(parallel.InProcess.map)
parallel.RayExecutor.map = timed(parallel.RayExecutor.map)
start = time.perf_counter()
diagnosis = doctor.diagnose(args["model"], args["pipeline"], calibration=args["calib"], calib_count=args["calib_count"],
                            threads=args["threads"], cache_dir=None, workers=args["workers"])
seconds = time.perf_counter() - start
passes = {"measurements": measured[0], "pipeline": sum(p["seconds"] for p in diagnosis["passes"])}
for p in diagnosis["passes"]:
    p.pop("seconds")
digest = hashlib.sha256(json.dumps(diagnosis, sort_keys=True).encode()).hexdigest()
print("RESULT " + json.dumps({"compile_s": seconds, "passes": passes, "digest": digest,
                              "suggestion": diagnosis["suggestion"].get("pipeline")}))
"""


def artifact_digest(folder: Path) -> str:
    """sha256 over every file the artifact's manifest lists, in order (`model.onnx.data` too, from
    64 MiB of weights)."""
    files = json.loads((folder / "manifest.json").read_text())["files"]
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def run_child(params: dict) -> dict:
    """One compile in a child process, its process tree's memory sampled while it runs."""
    try:
        import psutil
    except ImportError:
        psutil = None
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    env = dict(os.environ)
    if params.get("blas_threads"):  # numpy's BLAS in the compiling process (Ray's workers run it on one thread)
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(params["blas_threads"])
    code = DOCTOR_CHILD if params.get("doctor") else CHILD
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
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
    if params.get("doctor"):
        digest = result["digest"]
    else:
        digest = artifact_digest(Path(params["output"]))
    return {"wall_s": round(wall, 2), "compile_s": round(result["compile_s"], 2),
            "pass_s": round(result["passes"].get(params["pass"], 0.0), 2),
            # the doctor: its first pipeline run's passes (whose fanned-out maps are in "measurements" too)
            "pipeline_s": round(result["passes"]["pipeline"] if params.get("doctor") else sum(result["passes"].values()), 2),
            "passes_s": {name: round(seconds, 2) for name, seconds in result["passes"].items()},
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "peak_rss_tree_mb": round(tree_peak / 2**20), "peak_rss_process_mb": round(process_peak / 2**20),
            "model_sha256": digest, **({"suggestion": result["suggestion"]} if "suggestion" in result else {})}


def amdahl(serial: float, workers: int) -> float:
    return 1.0 / (serial + (1.0 - serial) / workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--pipeline", default="mixed{avg-bits=4.25 scope=model sensitivity=output}")
    parser.add_argument("--pass", dest="fanned", default="allocate-bits", help="the fanned-out pass to time (default allocate-bits)")
    parser.add_argument("--calib", help="calibration file (default: the model's data under ../shared/data, or $QCOMPILER_DATA)")
    parser.add_argument("--calib-count", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per session (default 1)")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to run, 0 meaning in-process (default 0,1,2)")
    parser.add_argument("--blas-threads", type=int, help="numpy BLAS threads of the compiling process (default: numpy's own)")
    parser.add_argument("--doctor", action="store_true",
                        help="time qcompiler doctor's diagnosis instead of a compile (the fanned-out part: its layer measurements)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count, the counts taking turns (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ray_fanout.json"))
    args = parser.parse_args()
    calib = args.calib or DATA.get(args.model)
    if args.doctor:
        args.fanned = "measurements"
    counts = [int(w) for w in args.workers.split(",")]
    samples: dict[int, list[dict]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for workers in counts:
                params = {"model": args.model, "output": str(Path(tmp) / f"w{workers}r{repeat}"), "pipeline": args.pipeline,
                          "calib": calib, "calib_count": args.calib_count, "threads": args.threads,
                          "workers": workers or None, "pass": args.fanned, "blas_threads": args.blas_threads, "doctor": args.doctor}
                sample = run_child(params)
                samples[workers].append(sample)
                print(f"done: {workers or 'in-process'} (run {repeat + 1}): {sample['wall_s']} s, {args.fanned} "
                      f"{sample['pass_s']} s, load {sample['load_before']} -> {sample['load_after']}", flush=True)
    runs = [summary(workers, samples[workers]) for workers in counts]
    base = runs[0]
    serial = 1.0 - base["pass_s"] / base["compile_s"] if base["compile_s"] else 1.0
    base_n = base["workers"] if isinstance(base["workers"], int) else 1
    for row in runs:
        row["speedup"] = round(base["wall_s"] / row["wall_s"], 3)
        row["pass_speedup"] = round(base["pass_s"] / row["pass_s"], 3) if row["pass_s"] else None
        n = row["workers"] if isinstance(row["workers"], int) else 1
        row["amdahl_expected"] = round(amdahl(serial, n / base_n), 3)
    identical = len({s["model_sha256"] for rows in samples.values() for s in rows}) == 1
    print(common.table(
        ["workers", "wall s", "speedup", "Amdahl", f"{args.fanned} s", "its speedup", "peak RSS tree MB", "largest process MB"],
        [[r["workers"], r["wall_s"], r["speedup"], r["amdahl_expected"], r["pass_s"], r["pass_speedup"],
          r["peak_rss_tree_mb"], r["peak_rss_process_mb"]] for r in runs]))
    loads = [s[key] for rows in samples.values() for s in rows for key in ("load_before", "load_after")]
    print(f"medians of {args.repeats} run(s) each; serial fraction (outside {args.fanned}, at {base['workers']}): {serial:.3f}; "
          f"load average {min(loads)} to {max(loads)} on {os.cpu_count()} cores; artifacts byte-identical: {identical}")
    common.write_json(Path(args.out), {
        "command": common.command_line(), "model": args.model, "pipeline": args.pipeline, "fanned_pass": args.fanned,
        "calib": calib, "calib_count": args.calib_count, "ort_threads_per_session": args.threads, "repeats": args.repeats,
        "blas_threads": args.blas_threads,
        "serial_fraction": round(serial, 4), "load_average_range": [min(loads), max(loads)],
        "artifacts_identical": identical, "runs": runs, "machine": common.machine(), "packages": common.packages(),
        "git": common.git_state(),
    })
    if not identical:
        raise SystemExit("the artifacts differ between worker counts")


def summary(workers: int, samples: list[dict]) -> dict:
    """One worker count: the medians of its runs' times, the largest memory, and every run."""
    median = lambda key: round(statistics.median(s[key] for s in samples), 2)  # noqa: E731
    return {"workers": workers or "in-process", "wall_s": median("wall_s"), "compile_s": median("compile_s"),
            "pass_s": median("pass_s"), "pipeline_s": median("pipeline_s"),
            "peak_rss_tree_mb": max(s["peak_rss_tree_mb"] for s in samples),
            "peak_rss_process_mb": max(s["peak_rss_process_mb"] for s in samples),
            "model_sha256": samples[0]["model_sha256"], "samples": samples}


if __name__ == "__main__":
    main()
