#!/usr/bin/env python3
"""Where a decode step's time goes: ONNX Runtime's profiler over the single-token steps of a compiled
decoder with a KV cache, summed by op type.

    python benchmarks/decode_profile.py DIR [DIR ...] [--threads 1] [--prefill 64] [--steps 16] [--json FILE]

For each artifact folder (from `qcompiler compile smollm2-135m-kv ...`): a prefill of `--prefill`
tokens, then `--steps` one-token steps through the cache (`qcompiler.tools.decode.CachedSession`),
with ONNX Runtime's profiling on; the nodes' kernel time of the steps, per op type (milliseconds a
step, nodes a step, microseconds a node), the wall time of a step with profiling on (the profiler
adds to it), and the nodes a step runs. Prints a table per artifact; `--json` writes them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def profile(folder: Path, threads: int, prefill: int, steps: int) -> dict:
    import onnxruntime as ort

    from qcompiler.codegen.lm_artifact import read_layout
    from qcompiler.tools.decode import CachedSession

    layout = read_layout(folder)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "decode")
        cached = CachedSession(folder / "model.onnx", layout, threads)
        cached.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])  # profiled
        ids = (np.arange(prefill + steps, dtype=np.int64) * 997 + 11) % layout.vocab_size
        cached.reset()
        cached.step(ids[:prefill])
        start = time.perf_counter()
        for t in range(prefill, prefill + steps):
            cached.step(ids[t : t + 1])
        wall_ms = (time.perf_counter() - start) / steps * 1e3
        events = json.loads(Path(cached.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_step = runs[-steps]["ts"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_step:
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    ops = {op: {"ms_per_step": round(us / steps / 1e3, 3), "nodes_per_step": count[op] / steps,
                "us_per_node": round(us / count[op], 2)} for op, us in total.most_common()}
    return {"artifact": str(folder), "threads": threads, "prefill": prefill, "steps": steps,
            "wall_ms_per_step_profiled": round(wall_ms, 2), "kernel_ms_per_step": round(sum(total.values()) / steps / 1e3, 2),
            "nodes_per_step": sum(count.values()) / steps, "ops": ops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for folder in args.artifacts:
        r = profile(folder, args.threads, args.prefill, args.steps)
        results.append(r)
        print(f"{folder}: {r['nodes_per_step']:.0f} nodes a step, kernel time {r['kernel_ms_per_step']} ms, "
              f"wall {r['wall_ms_per_step_profiled']} ms a step with profiling on")
        for op, v in list(r["ops"].items())[:12]:
            print(f"  {op:30s} {v['ms_per_step']:7.2f} ms  {v['nodes_per_step']:5.0f} nodes  {v['us_per_node']:6.1f} us/node")
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/decode_profile.py " + " ".join(argv or sys.argv[1:]),
                                         "machine": common.machine(), "packages": common.packages(),
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
