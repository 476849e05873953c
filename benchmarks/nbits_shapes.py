#!/usr/bin/env python3
"""One `MatMulNBits` at a decoder's M=1 shapes: how its time depends on the block size, on zero
points and on merging two layers of one input into one wide kernel.

    python benchmarks/nbits_shapes.py [--threads 1] [--rounds 5] [--json FILE]

For SmolLM2's shapes (K=576: Q/K/V 960 wide, gate or up 1536, gate and up merged 3072, the head
49152; K=1536: down 576), 4-bit codes of random bytes, blocks of 32 and 128 (128 pads K=576 to 640),
with and without uint8 zero points, accuracy level 4 (int8 compute): microseconds per call, the
minimum over `--rounds` interleaved rounds of 200 calls each (after 20 warm-up calls). Prints a
table; `--json` writes it with the machine and versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = [(576, 960), (576, 1536), (576, 3072), (1536, 576), (576, 49152)]


def nbits_model(k: int, n: int, block: int, zero_points: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    blocks = -(-k // block)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random((n, blocks), dtype=np.float32) * 0.01), "S")]
    inputs = ["X", "B", "S"]
    if zero_points:
        inits.append(numpy_helper.from_array(np.full((n, (blocks + 1) // 2), 0x88, np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def main() -> None:
    import time

    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "nbits_shapes.json")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    configs = [(k, n, block, zp) for k, n in SHAPES for block in (32, 128) for zp in (False, True)]
    sessions = {c: ort.InferenceSession(nbits_model(*c), options, providers=["CPUExecutionProvider"]) for c in configs}
    inputs = {c: np.random.default_rng(2).random((1, 1, c[0]), dtype=np.float32) for c in configs}
    samples: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs[r % len(configs):] + configs[: r % len(configs)]:
            session, x = sessions[c], {"X": inputs[c]}
            for _ in range(20):
                session.run(None, x)
            start = time.perf_counter()
            for _ in range(200):
                session.run(None, x)
            samples[c].append((time.perf_counter() - start) / 200 * 1e6)
    results = [{"K": k, "N": n, "block_size": block, "zero_points": zp, "us": round(min(samples[(k, n, block, zp)]), 1),
                "samples_us": [round(v, 1) for v in samples[(k, n, block, zp)]]} for k, n, block, zp in configs]
    rows = [[r["K"], r["N"], r["block_size"], "yes" if r["zero_points"] else "no", r["us"]] for r in results]
    common.finish_run(args.json, args.threads, results, common.table(["K", "N", "block", "zero points", "us"], rows))


if __name__ == "__main__":
    main()
