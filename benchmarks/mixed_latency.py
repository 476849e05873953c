"""Latency of one 4096x4096 weight-only layer in ONNX Runtime: mixed precision against uniform
4-bit `com.microsoft.MatMulNBits` and float32 MatMul, at M=1 and M=32 rows.

    python benchmarks/mixed_latency.py                 # about 3 minutes on 2 cores
    python benchmarks/mixed_latency.py --repeats 9     # a quicker, noisier run
    python benchmarks/mixed_latency.py --stage compile --work build/mixed_latency   # compile here,
    python benchmarks/mixed_latency.py --stage time --work build/mixed_latency      # time elsewhere

The layer: W [4096, 4096] ~ N(0, 0.02) with 16 input channels 8x larger; calibration inputs whose
per-channel scale is log-normal (sigma 1, so channel energies differ as in a transformer's
activations), 8 batches of 32 rows. Every variant is compiled by `qcompiler.compile` from the same
float ONNX file with the same calibration feeds, except ONNX Runtime's own quantizer.

Variants:
- `float32`: the MatMul as is (our `default` pipeline).
- `ort MatMulNBits 4-bit`: `MatMulNBitsQuantizer(bits=4, block_size=128, is_symmetric=False,
  accuracy_level=A)` with `DefaultWeightOnlyQuantConfig` (round-to-nearest min-max blocks), A the
  accuracy level `lower-ort` picks for this CPU (`nbits_accuracy_level()`).
- `ours uniform 4-bit`: every channel at 4 bits (`allocate-bits{avg-bits=8 candidates=4
  outliers-act=0 outliers-weight=0}`): one MatMulNBits.
- `ours mixed{avg-bits=3.25}`: the preset (candidates 2, 3, 4, 8, 0.5 % fp16 channels, no sparse
  outliers); its 3-bit class has no MatMulNBits kernel in ONNX Runtime and runs as a float MatMul
  of a weight expanded at load.
- `ours mixed 3.25 {2,4,8}`: the same with candidates 2, 4, 8, so every class runs on MatMulNBits
  (the fp16 channels on a small float MatMul); also without the fp16 channels (`no outliers`), with
  0.45 % sparse fp16 weights (`+ sparse`, added by ScatterElements), and lowered with
  `lower-ort{mixed-route=expand}` (the whole layer one float MatMul of a weight expanded at load).

Latency: `interleaved_latency` (round-robin over variants, warm-up 3), ONNX Runtime CPU provider,
2 intra-op threads, 1 inter-op; ratios to uniform 4-bit MatMulNBits (ONNX Runtime's quantizer):
the median of per-round ratios (paired) and the ratio of the fastest rounds (min, the steadier of
the two on a machine shared with other jobs). `rel err` is ||Y - Y_float|| / ||Y_float|| on 64 held-out
rows drawn like the calibration rows. Effective bits: the manifest's (weight bytes the backend
wrote * 8 / 4096^2); for ONNX Runtime's model, the bytes of its MatMulNBits initializers.

Output: a table per M on stdout and `benchmarks/results/mixed_latency.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

K = N = 4096
THREADS = 2
RESULTS = common.RESULTS / "mixed_latency.json"
ORT_ROW = "ort MatMulNBits 4-bit"


def float_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (K, N)).astype(np.float32)
    w[rng.choice(K, 16, replace=False)] *= 8
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="layer")], "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def inputs(rows: int, seed: int) -> np.ndarray:
    channel_scale = np.exp(np.random.default_rng(1).normal(0, 1, K)).astype(np.float32)
    return (np.random.default_rng(seed).normal(0, 1, (rows, K)) * channel_scale).astype(np.float32)


def ort_nbits(source: Path, out: Path, level: int) -> dict:
    import onnx

    proto, _ = common.ort_nbits_quantize(source, symmetric=False, accuracy_level=level)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out / "model.onnx"))
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    levels = [a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    return {"effective_bits": round(8 * stored / (K * N), 4), "accuracy_level": levels}


def compile_variants(work: Path) -> dict:
    """Compile every variant into `work`; their facts (bits, error, routes) into variants.json."""
    common.fix_threads(THREADS)
    import qcompiler
    from qcompiler import execute
    from qcompiler.passes.lower_ort import nbits_accuracy_level

    level = nbits_accuracy_level()
    source = float_model(work / "float.onnx")
    calibration = [{"X": inputs(32, seed)} for seed in range(8)]
    mixed = "calibrate,allocate-bits{avg-bits=3.25 candidates=2,4,8%s},quantize-weights"
    variants = {
        "float32": "default",
        "ours uniform 4-bit": ("calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                               "quantize-weights{grid=minmax}"),
        "ours mixed{avg-bits=3.25}": "mixed{avg-bits=3.25}",
        "ours mixed 3.25 {2,4,8}": mixed % " outliers-weight=0",
        "ours mixed 3.25 {2,4,8} no outliers": mixed % " outliers-act=0 outliers-weight=0",
        "ours mixed 3.25 {2,4,8} + sparse 0.45%": mixed % "",
        "ours mixed 3.25 {2,4,8} expand": mixed % " outliers-weight=0" + ",lower-ort{mixed-route=expand}",
    }
    rows: dict[str, dict] = {}
    start = time.perf_counter()
    rows[ORT_ROW] = ort_nbits(source, work / "ort", level)
    rows[ORT_ROW]["compile_s"] = round(time.perf_counter() - start, 2)
    for name, pipeline in variants.items():
        out = work / re.sub(r"[^a-z0-9.]+", "_", name.lower()).strip("_")
        start = time.perf_counter()
        result = qcompiler.compile(str(source), out, pipeline=pipeline, calibration=calibration, threads=THREADS, drift=False)
        lowered = [r.stats for r in result.records if r.name == "lower-ort"]
        rows[name] = {"path": str(out.relative_to(work) / "model.onnx"), "pipeline": result.manifest["pipeline"],
                      "effective_bits": 32.0 if name == "float32" else result.manifest["effective_bits_per_weight"],
                      "compile_s": round(time.perf_counter() - start, 2),
                      "routes": lowered[0].get("routes") if lowered else None}
    rows[ORT_ROW]["path"] = str(Path("ort") / "model.onnx")
    held_out = inputs(64, 99)
    y_float = None
    for name in ["float32", *[n for n in rows if n != "float32"]]:
        y = execute.ort_session(str(work / rows[name]["path"]), threads=THREADS).run(None, {"X": held_out})[0]
        y_float = y if y_float is None else y_float
        rows[name]["rel_err"] = round(float(np.linalg.norm(y - y_float) / np.linalg.norm(y_float)), 5)
    (work / "float.onnx").unlink()  # 64 MiB each; the timing stage writes the same float model again
    shutil.rmtree(work / Path(rows["float32"]["path"]).parent)
    rows["float32"]["path"] = "float.onnx"
    facts = {"compiled_with": {"packages": common.packages(), "git": common.git_state(), "machine": common.machine()},
             "matmul_nbits_accuracy_level": level, "rows": rows}
    (work / "variants.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def time_variants(work: Path, repeats: int, json_path: Path) -> dict:
    """Time the compiled variants in this machine's ONNX Runtime (needs only numpy, onnx, onnxruntime)."""
    import onnxruntime as ort

    facts = json.loads((work / "variants.json").read_text())
    rows = facts["rows"]
    float_model(work / "float.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(work / row["path"]), options, providers=["CPUExecutionProvider"])
                for name, row in rows.items()}
    latency = {}
    for m in (1, 32):
        x = inputs(m, 7)
        runners = {name: (lambda s=session: s.run(None, {"X": x})) for name, session in sessions.items()}
        latency[m] = common.interleaved_latency(runners, repeats=repeats, reference=ORT_ROW)
    order = ["float32", ORT_ROW, *[n for n in rows if n not in ("float32", ORT_ROW)]]
    body = {
        "benchmark": "mixed_latency",
        "command": common.command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "timed_on": {"machine": common.machine(), "onnxruntime": ort.__version__, "numpy": np.__version__,
                     "threads": {"ort_intra_op": THREADS, "ort_inter_op": 1}},
        **{k: v for k, v in facts.items() if k != "rows"},
        "layer": f"MatMul [M, {K}] x [{K}, {N}]",
        "rows": {name: rows[name] for name in order},
        "latency": {f"M={m}": {name: latency[m][name] for name in order} for m in latency},
    }
    level = facts["matmul_nbits_accuracy_level"]
    for m in latency:
        print(f"\nM={m} (onnxruntime {ort.__version__}, {THREADS} threads, accuracy_level {level}; "
              f"ratio: paired, to {ORT_ROW})")
        table_rows = []
        for name in order:
            lat = latency[m][name]
            best = latency[m][ORT_ROW]["min_ms"]
            table_rows.append([name, rows[name]["effective_bits"], f"{lat['median_ms']:.3f}", f"{lat['paired_ratio']:.2f}",
                               f"{lat['min_ms']:.3f}", f"{lat['min_ms'] / best:.2f}",
                               f"{latency[m]['float32']['min_ms'] / lat['min_ms']:.2f}", rows[name]["rel_err"]])
        print(common.table(["variant", "eff. bits", "median ms", "x ort 4-bit (paired)", "min ms", "x ort 4-bit (min)",
                            "f32 / this (min)", "rel err"], table_rows))
    common.write_json(json_path, body)
    print(f"\nwrote {json_path}")
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--work", type=Path, default=None, help="the compiled models (kept)")
    parser.add_argument("--stage", choices=("all", "compile", "time"), default="all",
                        help="compile only, time an already compiled --work folder only (numpy, onnx, onnxruntime), or both")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    common.quiet()
    work = args.work or Path(tempfile.mkdtemp(prefix="mixed_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "compile"):
        compile_variants(work)
    if args.stage in ("all", "time"):
        time_variants(work, args.repeats, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
