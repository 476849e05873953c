"""The kernel-cost table `allocate-bits{cost=latency}` prices ONNX Runtime with: time per weight of
each route a mixed layer's class takes, at M=1, and the fixed cost of one more class.

    python benchmarks/kernel_costs.py                     # writes codegen/ort/kernel_costs.json
    python benchmarks/kernel_costs.py --repeats 9 --json /tmp/costs.json

Each route is built as `lower-ort`'s split route writes one class of r input channels of a layer
with N = 4096 outputs: the class's columns of X read by GatherElements (indices expanded to X's
shape), then
- `nbits2`, `nbits4`, `nbits8`: `com.microsoft.MatMulNBits` (block 128, the accuracy level
  `lower-ort` picks on this CPU, random codes, scales and zero points);
- `fp16`: the fp16 weight through an X-dependent Reshape, Cast to float32 at every run, MatMul;
- `float32`: a float32 MatMul (classes expanded at load: codebooks, fractional zero points).
Every (route, r) for r in 128, 1024, 4096 is timed by the CPU time of the calling thread with one
intra-op thread (ONNX Runtime then computes on the calling thread, so other processes on the
machine change the number little), many runs a sample, round-robin over all graphs (interleaved),
median of the samples. Per route (`fit`), the time per weight b is that of the largest class and
its fixed part a = t(r_min) - b r_min N; the fixed cost of a class is the median of the packed
(MatMulNBits) routes' a, at least 0 (the float routes grow faster than linearly with r, out of cache).
Writes the table (with the machine, the load average before and after and the command) to
codegen/ort/kernel_costs.json, which ships in the package and `OrtTarget.cost_model` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TABLE = common.REPO / "codegen" / "ort" / "kernel_costs.json"
N = 4096
ROWS = (128, 1024, 4096)
ROUTES = ("nbits2", "nbits4", "nbits8", "fp16", "float32")
BLOCK = 128


def class_graph(route: str, rows: int, n: int, level: int) -> bytes:
    """One class of `rows` channels (of a 4096-channel X) on `route`, as `lower-ort` writes it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(rows)
    k_in = max(ROWS)
    index = np.sort(rng.choice(k_in, rows, replace=False)).astype(np.int64).reshape(1, rows)
    nodes = [helper.make_node("Shape", ["X"], ["xs"], end=-1), helper.make_node("Concat", ["xs", "r"], ["gs"], axis=0),
             helper.make_node("Expand", ["i", "gs"], ["ie"]), helper.make_node("GatherElements", ["X", "ie"], ["Xc"], axis=-1)]
    inits = [numpy_helper.from_array(index, "i"), numpy_helper.from_array(np.array([rows], np.int64), "r")]
    if route.startswith("nbits"):
        bits = int(route[5:])
        blocks = -(-rows // BLOCK)
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8), "W"),
                  numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(np.float32), "S"),
                  numpy_helper.from_array(rng.integers(0, 256, n * -(-blocks * bits // 8), dtype=np.uint8), "Z")]
        nodes.append(helper.make_node("MatMulNBits", ["Xc", "W", "S", "Z"], ["Y"], domain="com.microsoft",
                                      K=rows, N=n, bits=bits, block_size=BLOCK, accuracy_level=level))
    elif route == "fp16":
        inits += [numpy_helper.from_array(rng.normal(0, 0.02, (rows, n)).astype(np.float16), "W"),
                  numpy_helper.from_array(np.array([-1], np.int64), "m1")]
        nodes += [helper.make_node("Shape", ["Xc"], ["cs"], start=-1), helper.make_node("Concat", ["cs", "m1"], ["ws"], axis=0),
                  helper.make_node("Reshape", ["W", "ws"], ["Wr"]), helper.make_node("Cast", ["Wr"], ["Wf"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", ["Xc", "Wf"], ["Y"])]
    else:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.02, (rows, n)).astype(np.float32), "W"))
        nodes.append(helper.make_node("MatMul", ["Xc", "W"], ["Y"]))
    graph = helper.make_graph(nodes, route, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k_in])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def cpu_ms(sessions: dict, x: np.ndarray, repeats: int, budget_ms: float = 20.0) -> dict:
    """Median CPU time (ms) per run of each session, samples round-robin in a rotated order; each
    sample runs a session as many times as fill about `budget_ms` (from a first timing)."""
    names = list(sessions)
    calls = {}
    for name in names:
        sessions[name].run(None, {"X": x})
        start = time.thread_time()
        sessions[name].run(None, {"X": x})
        calls[name] = max(1, min(200, int(budget_ms / max(1000 * (time.thread_time() - start), 1e-3))))
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.thread_time()
            for _ in range(calls[name]):
                sessions[name].run(None, {"X": x})
            samples[name].append(1000 * (time.thread_time() - start) / calls[name])
    return {name: {"median_ms": float(np.median(v)), "calls_per_sample": calls[name], "samples_ms": [round(t, 5) for t in v]}
            for name, v in samples.items()}


def fit(route: str, timed: dict) -> tuple[float, float]:
    """Fixed cost (us) and time per weight (ns) of a route: the time per weight of the largest class
    (t(r_max) / (r_max N): a layer's classes together outgrow the caches, as this one does), and
    what the smallest class takes beyond its weights, t(r_min) - b r_min N (a line fitted through
    every r would bend with the caches and give negative intercepts)."""
    small, large = min(ROWS), max(ROWS)
    per_weight_ns = 1e6 * timed[f"{route} r={large}"]["median_ms"] / (large * N)
    return 1000 * timed[f"{route} r={small}"]["median_ms"] - per_weight_ns * small * N / 1000, per_weight_ns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--json", type=Path, default=TABLE)
    args = parser.parse_args()
    common.quiet()
    import onnxruntime as ort

    from qcompiler.passes.lower_ort import nbits_accuracy_level

    level = nbits_accuracy_level()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    sessions = {f"{route} r={rows}": ort.InferenceSession(class_graph(route, rows, N, level), options, providers=["CPUExecutionProvider"])
                for route in ROUTES for rows in ROWS}
    x = np.random.default_rng(7).normal(size=(1, max(ROWS))).astype(np.float32)
    load_before = [round(v, 2) for v in os.getloadavg()]
    timed = cpu_ms(sessions, x, args.repeats)
    load_after = [round(v, 2) for v in os.getloadavg()]
    fits = {route: fit(route, timed) for route in ROUTES}
    per_class_us = max(0.0, float(np.median([a for route, (a, _) in fits.items() if route.startswith("nbits")])))
    rows = [[route, *[f"{timed[f'{route} r={r}']['median_ms'] * 1000:.1f}" for r in ROWS], f"{a:.1f}", f"{b:.4f}"]
            for route, (a, b) in fits.items()]
    print(f"\none class of r channels x {N} outputs at M=1, CPU us per run on one thread (median of {args.repeats}), "
          f"MatMulNBits accuracy_level {level}")
    print(common.table(["route", *[f"r={r}" for r in ROWS], "intercept us", "ns / weight"], rows))
    print(f"fixed cost per class: {per_class_us:.1f} us; load average before {load_before}, after {load_after}")
    body = {"target": "ort", "per_weight_ns": {route: round(b, 5) for route, (_, b) in fits.items()},
            "per_class_us": round(per_class_us, 2),
            "measured": {"command": common.command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": common.machine(),
                         "onnxruntime": ort.__version__, "accuracy_level": level, "threads": 1, "m": 1, "n": N, "rows": list(ROWS),
                         "repeats": args.repeats, "load_average_before": load_before, "load_average_after": load_after,
                         "intercept_us": {route: round(a, 2) for route, (a, _) in fits.items()},
                         "median_us": {name: round(v["median_ms"] * 1000, 2) for name, v in timed.items()}}}
    common.write_json(args.json, body)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
