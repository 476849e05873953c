"""When ONNX Runtime's integer 3D Conv pays: one Conv3d (+ Relu) compiled to int8 against float32,
by input and output channels, kernel and stride (the measurement behind
`qcompiler.analysis.placement.narrow_conv3d`).

    python benchmarks/conv3d_integer.py                   # 2 threads, writes benchmarks/results/conv3d_integer.json
    python benchmarks/conv3d_integer.py --cases 16:16:3:1:32 --repeats 9     # one case, a quick run

Each case `CIN:COUT:K:STRIDE:S` is `x [1, CIN, S, S, S] -> Conv3d (CIN -> COUT, K^3, stride, 'same'
padding) -> Relu -> Sigmoid`, seeded weights, compiled with `calibrate,quantize{force=*},lower-ort`
(int8 forced even where `w8a8` would leave the Conv float) on 4 seeded batches: ONNX Runtime fuses
it into a `QLinearConv` (the quantize of the input and the dequantize of the output run too), which
`lower-ort` writes as a 2D Conv over depth slices where the kernel has more than one depth tap
(`passes/lower_ort/conv3d.py`). The float model and the artifact run as sessions with 2 intra-op
threads, interleaved (`common.interleaved_latency`); the ratio is the median over rounds of int8 /
float32. The default cases are deepbet's 3D Convs (its 7^3 stride-2 stem at 128^3, its 8 -> 8 head
at 64^3, 16- to 128-channel 3^3 layers) and narrow ones around the placement rule.

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

CASES = ("1:16:7:2:128", "8:8:3:1:64", "1:16:3:1:64", "2:16:3:1:64", "4:16:3:1:64", "8:16:3:1:64", "32:8:3:1:32",
         "16:16:3:1:32", "16:32:3:2:32", "32:32:3:1:16", "64:64:3:1:8", "128:128:3:1:4", "16:16:1:1:32", "64:128:1:2:8")


def conv3d_model(channels: int, kernel: int, size: int, outputs: int = 16, stride: int = 1):
    """One Conv3d (channels -> outputs, kernel^3, stride, 'same' padding, bias), Relu, Sigmoid."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(channels * 10 + kernel)
    fan_in = channels * kernel**3
    w = rng.normal(0, np.sqrt(2 / fan_in), (outputs, channels, kernel, kernel, kernel)).astype(np.float32)
    b = rng.normal(0, 0.05, outputs).astype(np.float32)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[kernel // 2] * 6, strides=[stride] * 3, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("Sigmoid", ["r"], ["y"], name="sigmoid")]
    graph = helper.make_graph(nodes, "conv3d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs, out, out, out])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def measure(case: str, work: Path, repeats: int) -> dict:
    import onnx

    import qcompiler
    from qcompiler.analysis.execute import ort_session

    channels, outputs, kernel, stride, size = (int(v) for v in case.split(":"))
    name = case.replace(":", "_")
    path = work / f"{name}.onnx"
    onnx.save(conv3d_model(channels, kernel, size, outputs, stride), str(path))
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(0, 1, (1, channels, size, size, size)).astype(np.float32)} for _ in range(4)]
    result = qcompiler.compile(str(path), work / name, pipeline="calibrate,quantize{force=*},lower-ort",
                               calibration=batches, drift=False, threads=common.THREADS)
    kernels = next(r.stats for r in result.records if r.name == "lower-ort")["kernels"]
    feeds = {"x": rng.normal(0, 1, (1, channels, size, size, size)).astype(np.float32)}
    sessions = {"float32": ort_session(str(path), common.THREADS),
                "int8": ort_session(str(work / name / "model.onnx"), common.THREADS)}
    timing = common.interleaved_latency({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                        warmup=2, repeats=repeats, reference="float32")
    routes = next(r.stats for r in result.records if r.name == "lower-ort")["routes"]
    return {"channels": channels, "outputs": outputs, "kernel": kernel, "stride": stride, "size": size,
            "integer_kernels": kernels["integer_kernels"], "as_2d": any("depth slices" in k for k in routes),
            "float_ms": timing["float32"]["median_ms"], "int8_ms": timing["int8"]["median_ms"],
            "ratio": timing["int8"]["paired_ratio"], "ratio_p25": timing["int8"]["paired_ratio_p25"],
            "ratio_p75": timing["int8"]["paired_ratio_p75"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="CIN:COUT:K:STRIDE:S each (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "conv3d_integer.json")
    args = parser.parse_args(argv)
    common.quiet()
    threads = common.fix_threads(common.THREADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            rows.append(measure(case, Path(tmp), args.repeats))
            print(f"  {case}: {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    text = common.table(["in -> out channels", "kernel", "stride", "input", "2D over depth", "float32 ms", "int8 ms", "int8 / float32",
                         "interquartile"],
                        [[f"{r['channels']} -> {r['outputs']}", f"{r['kernel']}^3", r["stride"], f"{r['size']}^3", "yes" if r["as_2d"] else "no",
                          f"{r['float_ms']:.1f}", f"{r['int8_ms']:.1f}", f"{r['ratio']:.2f}", f"{r['ratio_p25']:.2f} to {r['ratio_p75']:.2f}"]
                         for r in rows])
    common.finish_run(args.json, threads, rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
