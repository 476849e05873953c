"""A residual Add followed by LayerNormalization in ONNX Runtime: fused or kept apart.

    python benchmarks/residual_norm.py                  # MiniLM's shape, 8 x 128 x 384, 2 threads
    python benchmarks/residual_norm.py --shape 1,256,576 --threads 1

Times, at the graph optimisation level ONNX Runtime uses by default (all):
- `Add + LayerNormalization`: ONNX Runtime fuses the pair into `com.microsoft.SkipLayerNormalization`;
- `Sum + LayerNormalization`: what `lower-ort{residual-norm=apart}` writes; not fused;
- `SkipLayerNormalization` written directly, and `LayerNormalization` and `Add` alone, for scale.
Each variant is its own session; the rounds are interleaved and the ratios paired against
`Sum + LayerNormalization`. Prints a table and writes benchmarks/results/residual_norm.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REFERENCE = "Sum + LayerNormalization"


def graph(kind: str, shape: list[int]):
    from onnx import TensorProto, helper, numpy_helper

    channels = shape[-1]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "beta")]
    norm = lambda x: helper.make_node("LayerNormalization", [x, "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)  # noqa: E731
    nodes = {
        "Add + LayerNormalization": [helper.make_node("Add", ["x", "skip"], ["s"]), norm("s")],
        REFERENCE: [helper.make_node("Sum", ["x", "skip"], ["s"]), norm("s")],
        "SkipLayerNormalization": [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"],
                                                    domain="com.microsoft", epsilon=1e-12)],
        "LayerNormalization alone": [norm("x"), helper.make_node("Add", ["skip", "skip"], ["unused"])],
        "Add alone": [helper.make_node("Add", ["x", "skip"], ["y"])],
    }[kind]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if kind == "LayerNormalization alone":
        outputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, shape))
    return helper.make_model(helper.make_graph(nodes, kind, inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,128,384", help="activation shape, comma-separated (default 8,128,384)")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "residual_norm.json")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    shape = [int(v) for v in args.shape.split(",")]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.log_severity_level = 3
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "skip": rng.standard_normal(shape).astype(np.float32)}
    kinds = ["Add + LayerNormalization", REFERENCE, "SkipLayerNormalization", "LayerNormalization alone", "Add alone"]
    sessions, fused_ops = {}, {}
    for kind in kinds:
        sessions[kind] = ort.InferenceSession(graph(kind, shape).SerializeToString(), options, providers=["CPUExecutionProvider"])
    runners = {kind: (lambda s=s: s.run(["y"], feeds)) for kind, s in sessions.items()}
    expected = sessions[REFERENCE].run(["y"], feeds)[0]
    for kind in kinds[:3]:
        fused_ops[kind] = float(np.abs(sessions[kind].run(["y"], feeds)[0] - expected).max())
    timing = common.interleaved_latency(runners, warmup=10, repeats=args.repeats, reference=REFERENCE)
    rows = [[kind, f"{t['median_ms'] * 1000:.0f}", f"{t['p25_ms'] * 1000:.0f}-{t['p75_ms'] * 1000:.0f}", f"{t['paired_ratio']:.2f}",
             f"{fused_ops[kind]:.1e}" if kind in fused_ops else "-"] for kind, t in timing.items()]
    print(f"shape {shape}, {args.threads} ONNX Runtime threads, {args.repeats} interleaved rounds, optimisation level all")
    print(common.table(["variant", "median us", "p25-p75 us", f"x {REFERENCE}", "max |diff| vs Sum + LN"], rows))
    for t in timing.values():
        t.pop("samples_ms")
    common.write_json(args.json, {
        "benchmark": "residual_norm", "command": common.command_line(), "shape": shape, "threads": args.threads,
        "repeats": args.repeats, "reference": REFERENCE, "timing": timing, "max_abs_diff_vs_reference": fused_ops,
        "machine": common.machine(), "packages": common.packages(), "git": common.git_state(),
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
