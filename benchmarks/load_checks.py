"""What the load-time checks cost: `qcompiler.load` (every check in `qcompiler/ir/load_checks.py`,
external data read through `qcompiler/ir/external_data.py`) against the bare read it replaced
(`onnx.load` + `onnx_ir` deserialization + `onnx_ir.external_data.load_to_model`), on a
synthetic chain of MatMul + Relu layers whose weights are in an external data file.

    python benchmarks/load_checks.py --layers 400 --size 512     # 400 MiB of weights

Both are timed round-robin (`common.interleaved_latency`); prints medians and the paired ratio, writes
benchmarks/results/load_checks.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh

import common


def write_model(folder: Path, layers: int, size: int) -> Path:
    """X -> (MatMul by a [size, size] weight -> Relu) x layers -> Y, weights in `m.data`."""
    inits, nodes, prev = [], [], "X"
    for i in range(layers):
        inits.append(nh.from_array(np.full((size, size), 1e-3, np.float32), f"W{i}"))
        nodes += [oh.make_node("MatMul", [prev, f"W{i}"], [f"T{i}"], name=f"mm{i}"),
                  oh.make_node("Relu", [f"T{i}"], [f"R{i}"], name=f"relu{i}")]
        prev = f"R{i}"
    nodes.append(oh.make_node("Identity", [prev], ["Y"], name="out"))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("X", 1, ["N", size])],
                          [oh.make_tensor_value_info("Y", 1, ["N", size])], inits)
    path = folder / "m.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), str(path),
              save_as_external_data=True, location="m.data", size_threshold=0)
    return path


def bare_load(path: Path):
    import onnx_ir as ir

    model = ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False))
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    return ir.external_data.load_to_model(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "load_checks.json")
    args = parser.parse_args()
    common.quiet()
    from qcompiler.ir import load

    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp), args.layers, args.size)
        weights_mib = args.layers * args.size * args.size * 4 / 2**20
        timings = common.interleaved_latency(
            {"bare read": lambda: bare_load(path), "qcompiler.load (checked)": lambda: load(path, convert=False)},
            warmup=1, repeats=args.rounds, reference="bare read",
        )
    rows = [[name, f"{t['median_ms']:.0f}", f"{t['p25_ms']:.0f}-{t['p75_ms']:.0f}", f"{t['paired_ratio']:.2f}"]
            for name, t in timings.items()]
    print(f"{args.layers} layers, {weights_mib:.0f} MiB of external weights")
    print(common.table(["load", "median ms", "p25-p75 ms", "x bare"], rows))
    common.write_json(args.json, {
        "command": common.command_line(), "layers": args.layers, "size": args.size, "weights_mib": weights_mib,
        "timings": timings, "machine": common.machine(), "packages": common.packages(), "git": common.git_state(),
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
