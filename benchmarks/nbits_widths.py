"""Which widths ONNX Runtime's `com.microsoft.MatMulNBits` CPU kernel runs, and how fast.

    python benchmarks/nbits_widths.py                  # 4096x4096, block 128, 2 threads, M = 1 and 32
    python benchmarks/nbits_widths.py --repeats 5 --levels 4

For each width 2..8 and `accuracy_level` (4: int8 compute, what `lower-ort` picks on x86 with AVX2
and on Arm; 0: float compute), one session of a single MatMulNBits (random codes, scales and zero
points, K = N = 4096, block_size 128) is created; a width the kernel refuses at session start is
recorded with ONNX Runtime's message. The widths that run are timed at M = 1 and M = 32 rows,
interleaved per level, next to a float32 MatMul of the same shape. `lower-ort` stores a class of a
refused width in containers of the next width that runs (`qcompiler.analysis.bitcost.container_bits`).
Prints a table and writes benchmarks/results/nbits_widths.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = common.RESULTS / "nbits_widths.json"


def nbits_model(k: int, n: int, bits: int, block: int, level: int) -> bytes:
    from onnx import helper, numpy_helper

    blocks, blob = -(-k // block), block * bits // 8
    rng = np.random.default_rng(bits)
    weight = rng.integers(0, 256, (n, blocks, blob), dtype=np.uint8)
    scales = (rng.random(n * blocks) * 0.01).astype(np.float32)
    zeros = rng.integers(0, 256, n * -(-blocks * bits // 8), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["X", "W", "S", "Z"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
    return _model([node], [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(scales, "S"),
                           numpy_helper.from_array(zeros, "Z")], k, n)


def float_model(k: int, n: int) -> bytes:
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.02, (k, n)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [numpy_helper.from_array(w, "W")], k, n)


def _model(nodes, initializers, k: int, n: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--levels", default="4,0", help="accuracy levels, comma-separated")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    import onnxruntime as ort

    k = n = 4096
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 1, 4
    results: dict = {}
    for level in (int(v) for v in args.levels.split(",")):
        sessions, refused = {"float32 MatMul": ort.InferenceSession(float_model(k, n), options, providers=["CPUExecutionProvider"])}, {}
        for bits in range(2, 9):
            try:
                sessions[f"{bits}-bit"] = ort.InferenceSession(nbits_model(k, n, bits, 128, level), options,
                                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's refusal is the result
                refused[f"{bits}-bit"] = str(exc).split("was false.")[-1].strip().splitlines()[0][:120]
        timed = {}
        for m in (1, 32):
            x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float32)
            runners = {name: (lambda s=s: s.run(None, {"X": x})) for name, s in sessions.items()}
            timed[f"M={m}"] = common.interleaved_latency(runners, repeats=args.repeats)
        results[f"accuracy_level={level}"] = {"refused": refused, "latency": timed}
        rows = [[name, *[f"{timed[m][name]['min_ms']:.3f} ({timed[m][name]['median_ms']:.3f})" for m in timed]]
                for name in sessions] + [[name, "refused: " + why, ""] for name, why in refused.items()]
        print(f"\nMatMulNBits {k}x{n}, block 128, accuracy_level {level}, 2 threads: min ms (median)")
        print(common.table(["width", *timed], rows))
    common.write_json(args.json, {"benchmark": "nbits_widths", "command": common.command_line(),
                                  "timed_on": {"machine": common.machine(), "onnxruntime": ort.__version__}, "results": results})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
