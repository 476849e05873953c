"""When ONNX Runtime's integer 3D Conv pays: one Conv3d (+ Relu) compiled to int8 against float32,
by input channels and kernel size (the measurement behind `qcompiler.analysis.placement.MIN_CONV3D_CHANNELS`).

    python benchmarks/conv3d_integer.py                   # 2 threads, writes benchmarks/results/conv3d_integer.json
    python benchmarks/conv3d_integer.py --size 32 --repeats 9     # a quick run

Each case is `x [1, C, S, S, S] -> Conv3d (C -> 16, k^3, 'same' padding) -> Relu -> Sigmoid`,
seeded weights, compiled with `calibrate,quantize{force=*},lower-ort` (int8 forced even where
`w8a8` would leave the Conv float) on 4 seeded batches: ONNX Runtime fuses it into a
`QLinearConv` (the quantize of the input and the dequantize of the output run too). The float
model and the artifact run as sessions with 2 intra-op threads, interleaved
(`common.interleaved_latency`); the ratio is the median over rounds of int8 / float32.

Output: a table on stdout and `benchmarks/results/conv3d_integer.json`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHANNELS = (1, 4, 8, 16, 32)
KERNELS = (3, 1)
OUTPUTS = 16


def conv3d_model(channels: int, kernel: int, size: int):
    """One Conv3d (channels -> 16, kernel^3, 'same' padding, bias), Relu, Sigmoid."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(channels * 10 + kernel)
    fan_in = channels * kernel**3
    w = rng.normal(0, np.sqrt(2 / fan_in), (OUTPUTS, channels, kernel, kernel, kernel)).astype(np.float32)
    b = rng.normal(0, 0.05, OUTPUTS).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[kernel // 2] * 6, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("Sigmoid", ["r"], ["y"], name="sigmoid")]
    graph = helper.make_graph(nodes, "conv3d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUTPUTS, size, size, size])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def measure(channels: int, kernel: int, size: int, work: Path, repeats: int) -> dict:
    import onnx

    import qcompiler
    from qcompiler.analysis.execute import ort_session

    path = work / f"c{channels}k{kernel}.onnx"
    onnx.save(conv3d_model(channels, kernel, size), str(path))
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(0, 1, (1, channels, size, size, size)).astype(np.float32)} for _ in range(4)]
    result = qcompiler.compile(str(path), work / f"c{channels}k{kernel}", pipeline="calibrate,quantize{force=*},lower-ort",
                               calibration=batches, drift=False, threads=common.THREADS)
    kernels = next(r.stats for r in result.records if r.name == "lower-ort")["kernels"]
    feeds = {"x": rng.normal(0, 1, (1, channels, size, size, size)).astype(np.float32)}
    sessions = {"float32": ort_session(str(path), common.THREADS),
                "int8": ort_session(str(work / f"c{channels}k{kernel}" / "model.onnx"), common.THREADS)}
    timing = common.interleaved_latency({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                        warmup=2, repeats=repeats, reference="float32")
    return {"channels": channels, "kernel": kernel, "size": size, "integer_kernels": kernels["integer_kernels"],
            "float_ms": timing["float32"]["median_ms"], "int8_ms": timing["int8"]["median_ms"],
            "ratio": timing["int8"]["paired_ratio"], "ratio_p25": timing["int8"]["paired_ratio_p25"],
            "ratio_p75": timing["int8"]["paired_ratio_p75"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="the volume's edge S (default 64)")
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "conv3d_integer.json")
    args = parser.parse_args(argv)
    common.quiet()
    threads = common.fix_threads(common.THREADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in KERNELS:
            for channels in args.channels:
                rows.append(measure(channels, kernel, args.size, Path(tmp), args.repeats))
                r = rows[-1]
                print(f"  C={channels} k={kernel}: {r['ratio']:.2f}", file=sys.stderr, flush=True)
    text = common.table(["input channels", "kernel", f"float32 ms ({args.size}^3)", "int8 ms", "int8 / float32", "interquartile"],
                        [[r["channels"], f"{r['kernel']}^3", f"{r['float_ms']:.1f}", f"{r['int8_ms']:.1f}", f"{r['ratio']:.2f}",
                          f"{r['ratio_p25']:.2f} to {r['ratio_p75']:.2f}"] for r in rows])
    common.finish_run(args.json, threads, rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
