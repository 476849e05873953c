"""Latency and memory of one weight-only layer in ONNX Runtime: mixed precision against uniform
4-bit `com.microsoft.MatMulNBits` and float32 MatMul, at M=1 and M=32 rows, for the layer shapes
4096x4096 and 4096x11008 (K x N).

    python benchmarks/mixed_latency.py                     # both shapes, 21 rounds (about 10 minutes on 2 cores)
    python benchmarks/mixed_latency.py --repeats 5         # a quicker, noisier run
    python benchmarks/mixed_latency.py --shapes 4096x4096  # one shape
    python benchmarks/mixed_latency.py --only 'uniform|3.25}|cost=' --json benchmarks/results/mixed_latency_cost.json
    python benchmarks/mixed_latency.py --stage class-sets --json benchmarks/results/mixed_latency_class_sets.json
    python benchmarks/mixed_latency.py --stage compile --work build/mixed_latency   # compile here,
    python benchmarks/mixed_latency.py --stage time --work build/mixed_latency      # time elsewhere

The layer: W [K, N] ~ N(0, 0.02) with 16 input channels 8x larger; calibration inputs whose
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
- `ours mixed{avg-bits=3.25}`, `ours mixed{avg-bits=4.25}`: the preset (candidates 2, 4, 8 on
  MatMulNBits, one per class, summed; 0.5 % fp16 channels cast from fp16 at every run; no sparse
  outliers).
  On these layers (32 and more blocks of 128 rows) the presets' `blocks=auto` prices each
  MatMulNBits class in whole blocks, as ONNX Runtime holds them: the classes fill their blocks.
- `ours mixed{avg-bits=3.25 blocks=tight}`, `... 4.25 ...`: the presets with each class priced by
  the rows it fills (the default before `blocks=auto`): each class's last block is padding,
  resident once the session starts.
- `ours mixed 3.25 single`, `ours mixed 4.25 single`: the presets' passes with
  `lower-ort{mixed-route=single}` (one MatMulNBits a layer, every class in the widest class's
  containers: 8 bits here).
- `ours mixed 4.25 digits`: `mixed{avg-bits=4.25 route=digits}` (one MatMulNBits a layer at the
  narrowest class's width, the wider classes as its digits: 2-bit here, a 4-bit code as 2 rows,
  an 8-bit one as 4; the fp16 class cast at load).
- `ours mixed 3.25 Gather+Add`, `ours mixed 4.25 Gather+Add`: the presets' artifacts as `lower-ort`
  wrote them before (`as_gathers_and_adds`: each class's input columns read by a Gather along the
  last axis instead of GatherElements, the partial products added by a chain of Adds instead of one
  Sum; the same numbers).
- `ours mixed 3.25 cost=latency`: the 3.25 preset's passes with `allocate-bits{cost=latency}` (the
  class set chosen by predicted error x predicted time from `codegen/ort/kernel_costs.json`, the same
  bit budget); `bits_histogram` in the JSON: channels per width of each allocation.
- `ours mixed 3.25 expand`: the 3.25 preset's passes with `lower-ort{mixed-route=expand}` (one float
  MatMul of a weight expanded to float32 when the session starts: small file, float32 in memory).

Latency: `interleaved_latency` (round-robin over variants, warm-up 3; each sample is 20 runs at
M=1 and 2 at M=32, reported per run), ONNX Runtime CPU provider, 2 intra-op threads, 1 inter-op; ratios to uniform 4-bit MatMulNBits (ONNX Runtime's quantizer):
the median of per-round ratios (paired) and the ratio of the fastest rounds (min). On a shared
machine wall time follows the other processes' load, so every variant is also timed by the CPU time
of the calling thread with one intra-op thread (`CPU ms (1 thread)`, `cpu_time_per_run`), with its
paired ratio to ONNX Runtime's 4-bit row; the load average before and after timing is printed.
`column_read_cost` times the ops that read a class's input columns (Gather against GatherElements). `rel err` is
||Y - Y_float|| / ||Y_float|| on 64 held-out rows drawn like the calibration rows. Effective bits:
the manifest's (weight bytes the backend wrote * 8 / (K N)); for ONNX Runtime's model, the bytes of
its MatMulNBits initializers. Memory: `rss_mib`, the process RSS added by creating the session
(measured in a fresh subprocess per artifact: RSS before and after `InferenceSession`, the model read
from its file), next to the weight bytes at rest (`at_rest_mib`) and, for ours, the bytes the
manifest computes as resident (`resident_mib`: the initializers ONNX Runtime keeps after folding).

Output: a table per shape and M on stdout and `benchmarks/results/mixed_latency.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008))
THREADS = 2
RESULTS = common.RESULTS / "mixed_latency.json"
ORT_ROW = "ort MatMulNBits 4-bit"
CALLS = {1: 20, 32: 2}  # runs per timed sample at M rows (one run at M=1 is a fraction of a millisecond)


def float_model(path: Path, k: int = 4096, n: int = 4096) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    K, N = k, n
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


def inputs(rows: int, seed: int, k: int = 4096) -> np.ndarray:
    channel_scale = np.exp(np.random.default_rng(1).normal(0, 1, k)).astype(np.float32)
    return (np.random.default_rng(seed).normal(0, 1, (rows, k)) * channel_scale).astype(np.float32)




def ort_nbits(source: Path, out: Path, level: int, k: int, n: int) -> dict:
    import onnx

    proto, _ = common.ort_nbits_quantize(source, symmetric=False, accuracy_level=level)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out / "model.onnx"))
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    levels = [a.i for node in proto.graph.node if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "accuracy_level"]
    return {"effective_bits": round(8 * stored / (k * n), 4), "accuracy_level": levels, "at_rest_mib": round(stored / 2**20, 2)}


def preset_passes(budget: str, options: str = "") -> str:
    """The passes of the `mixed{avg-bits=budget}` preset with `options` (`--mixed-options`) added."""
    from qcompiler.pipeline.spec import PRESETS

    return PRESETS["mixed"].expand("mixed", {**dict(token.split("=", 1) for token in options.split()), "avg-bits": budget})


def preset_with_route(budget: str, route: str, options: str = "") -> str:
    """The `mixed{avg-bits=budget}` preset's passes with `lower-ort{mixed-route=route}`."""
    passes = preset_passes(budget, options)
    head, lowering = passes.rsplit(",", 1)
    assert lowering.startswith("lower-ort"), passes
    return f"{head},lower-ort{{mixed-route={route}}}"


def preset_with_cost(budget: str, cost: str, options: str = "") -> str:
    """The `mixed{avg-bits=budget}` preset's passes with `allocate-bits{cost=cost}`."""
    passes = preset_passes(budget, options)
    assert "allocate-bits{" in passes, passes
    return passes.replace("allocate-bits{", f"allocate-bits{{cost={cost} ", 1)


def as_gathers_and_adds(source: Path, out: Path) -> int:
    """Copy `source` as `lower-ort` wrote mixed layers before: each `GatherElements(X, Expand(indices,
    shape))` as `Gather(X, indices, axis=-1)` and each `Sum` as a chain of Adds (the same bits);
    returns the nodes rewritten."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    producer = {o: node for node in model.graph.node for o in node.output}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        expand = producer.get(node.input[1]) if node.op_type == "GatherElements" else None
        if expand is not None and expand.op_type == "Expand":
            nodes.append(helper.make_node("Gather", [node.input[0], expand.input[0]], list(node.output), name=node.name, axis=-1))
        elif node.op_type == "Sum" and len(node.input) > 1:
            total = node.input[0]
            for i, term in enumerate(node.input[1:]):
                last = i == len(node.input) - 2
                out_name = node.output[0] if last else f"{node.output[0]}.add{i}"
                nodes.append(helper.make_node("Add", [total, term], [out_name], name=node.name if last else out_name))
                total = out_name
        else:
            nodes.append(node)
            continue
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return rewritten


def compile_variants(work: Path, k: int, n: int, only: str | None = None, mixed_options: str = "") -> dict:
    """Compile every variant of one shape into `work` (with `only`, those whose name matches that
    regular expression, and the two reference rows; the preset's with `mixed_options` added); their
    facts (bits, error, routes, memory) into variants.json."""
    common.fix_threads(THREADS)
    import qcompiler
    from qcompiler.analysis import execute
    from qcompiler.passes.lower_ort import nbits_accuracy_level

    level = nbits_accuracy_level()
    source = float_model(work / "float.onnx", k, n)
    calibration = [{"X": inputs(32, seed, k)} for seed in range(8)]
    variants = {
        "float32": "default",
        "ours uniform 4-bit": ("calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                               "quantize-weights{grid=minmax}"),
        "ours mixed{avg-bits=3.25}": "mixed{avg-bits=3.25}",
        "ours mixed{avg-bits=4.25}": "mixed{avg-bits=4.25}",
        "ours mixed{avg-bits=3.25 blocks=tight}": "mixed{avg-bits=3.25 blocks=tight}",
        "ours mixed{avg-bits=4.25 blocks=tight}": "mixed{avg-bits=4.25 blocks=tight}",
        "ours mixed 3.25 single": preset_with_route("3.25", "single", mixed_options),
        "ours mixed 4.25 single": preset_with_route("4.25", "single", mixed_options),
        "ours mixed 4.25 digits": "mixed{avg-bits=4.25 route=digits}",
        "ours mixed 3.25 cost=latency": preset_with_cost("3.25", "latency", mixed_options),
        "ours mixed 3.25 expand": "calibrate,allocate-bits{avg-bits=3.25 outliers-weight=0},quantize-weights,fold-permutation,"
                                  "lower-ort{mixed-route=expand}",
    }
    variants = {name: p for name, p in variants.items() if only is None or name == "float32" or re.search(only, name)}
    rows: dict[str, dict] = {}
    start = time.perf_counter()
    rows[ORT_ROW] = ort_nbits(source, work / "ort", level, k, n)
    rows[ORT_ROW]["compile_s"] = round(time.perf_counter() - start, 2)
    for name, pipeline in variants.items():
        out = work / re.sub(r"[^a-z0-9.]+", "_", name.lower()).strip("_")
        start = time.perf_counter()
        result = qcompiler.compile(str(source), out, pipeline=common.with_mixed_options(pipeline, mixed_options),
                                   calibration=calibration, threads=THREADS, drift=False)
        lowered = [r.stats for r in result.records if r.name == "lower-ort"]
        allocated = [r.stats for r in result.records if r.name == "allocate-bits"]
        rows[name] = {"path": str(out.relative_to(work) / "model.onnx"), "pipeline": result.manifest["pipeline"],
                      "bits_histogram": next(iter(allocated[0]["per_layer"].values()))["bits_histogram"] if allocated else None,
                      "effective_bits": 32.0 if name == "float32" else result.manifest["effective_bits_per_weight"],
                      "compile_s": round(time.perf_counter() - start, 2),
                      "routes": lowered[0].get("routes") if lowered else None,
                      "at_rest_mib": round(result.manifest["weight_bytes"] / 2**20, 2),
                      "resident_mib": common.mixed_layer_mib(result.manifest).get("layers_resident_mib")}
    rows[ORT_ROW]["path"] = str(Path("ort") / "model.onnx")
    for budget in ("3.25", "4.25"):  # the split route as it was written before: Gathers and Adds
        if f"ours mixed{{avg-bits={budget}}}" not in rows or (only is not None and not re.search(only, f"ours mixed {budget} Gather+Add")):
            continue
        split = rows[f"ours mixed{{avg-bits={budget}}}"]
        before = Path(split["path"]).parent.with_name(Path(split["path"]).parent.name + "_gather_add") / "model.onnx"
        rewritten = as_gathers_and_adds(work / split["path"], work / before)
        rows[f"ours mixed {budget} Gather+Add"] = {**split, "path": str(before), "nodes_rewritten": rewritten}
    held_out = inputs(64, 99, k)
    y_float = None
    for name in ["float32", *[v for v in rows if v != "float32"]]:
        y = execute.ort_session(str(work / rows[name]["path"]), threads=THREADS).run(None, {"X": held_out})[0]
        y_float = y if y_float is None else y_float
        rows[name]["rel_err"] = round(float(np.linalg.norm(y - y_float) / np.linalg.norm(y_float)), 5)
    (work / "float.onnx").unlink()  # the timing stage writes the same float model again
    shutil.rmtree(work / Path(rows["float32"]["path"]).parent)
    rows["float32"]["path"] = "float.onnx"
    facts = {"compiled_with": {"packages": common.packages(), "git": common.git_state(), "machine": common.machine(),
                               "mixed_options": mixed_options},
             "matmul_nbits_accuracy_level": level, "rows": rows}
    (work / "variants.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def per_call_latency(sessions: dict, x: np.ndarray, calls: int, repeats: int) -> dict:
    """`common.interleaved_latency` over samples of `calls` runs each, in ms per run."""
    def runner(session):
        def run():
            for _ in range(calls):
                session.run(None, {"X": x})
        return run

    out = common.interleaved_latency({name: runner(s) for name, s in sessions.items()}, repeats=repeats, reference=ORT_ROW)
    for lat in out.values():
        for key in ("median_ms", "p25_ms", "p75_ms", "min_ms"):
            lat[key] = round(lat[key] / calls, 4)
        lat["samples_ms"] = [round(v / calls, 4) for v in lat["samples_ms"]]
        lat["calls_per_sample"] = calls
    return out


def cpu_time_per_run(sessions: dict, x: np.ndarray, calls: int, repeats: int) -> dict:
    """CPU time of the calling thread per run (ms), sessions with one intra-op thread (ONNX Runtime
    then computes on the calling thread): what a run costs, little changed by other processes
    sharing the cores, unlike wall time. Round-robin as `common.interleaved_latency`; per variant
    the median, min and the median of per-round ratios to ONNX Runtime's 4-bit row."""
    names = list(sessions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sessions[name].run(None, {"X": x})
            start = time.thread_time()
            for _ in range(calls):
                sessions[name].run(None, {"X": x})
            samples[name].append(1000 * (time.thread_time() - start) / calls)
    reference = np.array(samples[ORT_ROW])
    return {name: {"median_ms": round(float(np.median(v)), 4), "min_ms": round(min(v), 4),
                   "paired_ratio": round(float(np.median(np.array(v) / reference)), 4), "samples_ms": [round(t, 4) for t in v]}
            for name, v in samples.items()}


def column_read_cost(k: int, repeats: int) -> dict:
    """CPU time (one thread, us per run) of reading X's K columns in a random order, [M, K] for M = 1
    and 32: Gather along the last axis, as the split route read a class's columns before, against
    GatherElements of the indices expanded to X's leading dimensions, as it reads them now (the same
    values), and Identity (a run that copies nothing: the session's own cost)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    order = np.random.default_rng(0).permutation(k)
    flat, row = numpy_helper.from_array(order.astype(np.int32), "i"), numpy_helper.from_array(order.astype(np.int32).reshape(1, k), "i")
    graphs = {
        "Gather": ([helper.make_node("Gather", ["X", "i"], ["Y"], axis=-1)], [flat]),
        "GatherElements": ([helper.make_node("Shape", ["X"], ["s"]), helper.make_node("Expand", ["i", "s"], ["e"]),
                            helper.make_node("GatherElements", ["X", "e"], ["Y"], axis=-1)], [row]),
        "Identity": ([helper.make_node("Identity", ["X"], ["Y"])], []),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    sessions = {}
    for name, (nodes, initializers) in graphs.items():
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", k])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        sessions[name] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = {}
    for m in (1, 32):
        x = inputs(m, 7, k)
        for name, session in sessions.items():
            y = session.run(None, {"X": x})[0]
            assert name == "Identity" or np.array_equal(y, x[:, order]), name
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(repeats):
            for name in list(sessions)[r % 3:] + list(sessions)[: r % 3]:
                start = time.thread_time()
                for _ in range(10 * CALLS[m]):
                    sessions[name].run(None, {"X": x})
                samples[name].append(1e6 * (time.thread_time() - start) / (10 * CALLS[m]))
        out[f"M={m}"] = {name: round(float(np.median(v)), 1) for name, v in samples.items()}
    print(f"\nreading {k} columns in a random order, CPU us per run on one thread (median of {repeats}): "
          + "; ".join(f"{m}: " + ", ".join(f"{name} {us}" for name, us in row.items()) for m, row in out.items()))
    return out


def time_variants(work: Path, k: int, n: int, repeats: int, only: str | None = None) -> dict:
    """Time the compiled variants of one shape in this machine's ONNX Runtime (numpy, onnx, onnxruntime
    only); with `only`, those whose name matches that regular expression (and the two reference rows)."""
    import onnxruntime as ort

    facts = json.loads((work / "variants.json").read_text())
    rows = {name: row for name, row in facts["rows"].items()
            if only is None or name in ("float32", ORT_ROW) or re.search(only, name)}
    float_model(work / "float.onnx", k, n)
    for name, row in rows.items():
        row["rss_mib"] = common.session_rss(work / row["path"], THREADS)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(work / row["path"]), options, providers=["CPUExecutionProvider"])
                for name, row in rows.items()}
    options.intra_op_num_threads = 1
    single_thread = {name: ort.InferenceSession(str(work / row["path"]), options, providers=["CPUExecutionProvider"])
                     for name, row in rows.items()}
    latency, cpu, load = {}, {}, {"before": [round(v, 2) for v in os.getloadavg()]}
    for m in (1, 32):
        x = inputs(m, 7, k)
        latency[m] = per_call_latency(sessions, x, CALLS[m], repeats)
        cpu[m] = cpu_time_per_run(single_thread, x, CALLS[m], repeats)
    column_reads = column_read_cost(k, repeats)
    load["after"] = [round(v, 2) for v in os.getloadavg()]
    print(f"\nload average (1, 5, 15 min) before timing {load['before']}, after {load['after']}")
    order = ["float32", ORT_ROW, *[v for v in rows if v not in ("float32", ORT_ROW)]]
    level = facts["matmul_nbits_accuracy_level"]
    for m in latency:
        print(f"\n{k}x{n}, M={m} (onnxruntime {ort.__version__}, {THREADS} threads, accuracy_level {level}; "
              f"ratio: paired, to {ORT_ROW})")
        table_rows = []
        for name in order:
            lat, row = latency[m][name], rows[name]
            best = latency[m][ORT_ROW]["min_ms"]
            table_rows.append([name, row["effective_bits"], f"{lat['median_ms']:.3f}", f"{lat['paired_ratio']:.2f}",
                               f"{lat['min_ms']:.3f}", f"{lat['min_ms'] / best:.2f}",
                               f"{latency[m]['float32']['min_ms'] / lat['min_ms']:.2f}",
                               f"{cpu[m][name]['median_ms']:.3f}", f"{cpu[m][name]['paired_ratio']:.2f}", row["rel_err"],
                               row.get("at_rest_mib"), row.get("resident_mib"), row["rss_mib"]])
        print(common.table(["variant", "eff. bits", "median ms", "x ort 4-bit (paired)", "min ms", "x ort 4-bit (min)",
                            "f32 / this (min)", "CPU ms (1 thread)", "CPU x ort 4-bit", "rel err", "at rest MiB", "resident MiB", "RSS at start MiB"], table_rows))
    return {**{key: v for key, v in facts.items() if key != "rows"}, "layer": f"MatMul [M, {k}] x [{k}, {n}]",
            "load_average": load, "column_reads_cpu_us": column_reads, "rows": {name: rows[name] for name in order},
            "latency": {f"M={m}": {name: latency[m][name] for name in order} for m in latency},
            "cpu_time_1_thread": {f"M={m}": {name: cpu[m][name] for name in order} for m in cpu}}


CLASS_SETS = ((2, 4, 8), (2, 4), (2, 8), (4, 8), (2,))


def class_sets(k: int, n: int, budget: str = "3.25") -> dict:
    """What `allocate-bits{cost=latency}` weighs on this layer: each candidate set allocated by
    `cost=bits` under the preset's budget (the pass's options of `mixed{avg-bits=budget}`), its
    predicted error (the pass's stats) and predicted M=1 time (ONNX Runtime's kernel-cost table)."""
    import qcompiler
    from qcompiler.analysis import bitcost
    from qcompiler.codegen.targets import get_target
    from qcompiler.pipeline.context import CompileContext, using
    from qcompiler.pipeline.pass_manager import run_pipeline
    from qcompiler.pipeline.spec import parse_pipeline

    costs = get_target("ort").cost_model
    calibration = [{"X": inputs(32, seed, k)} for seed in range(8)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = float_model(Path(tmp) / "float.onnx", k, n)
        for subset in CLASS_SETS:
            model = qcompiler.load(str(source))
            spec = f"calibrate,allocate-bits{{avg-bits={budget} outliers-weight=0 candidates={','.join(map(str, subset))}}}"
            try:
                with using(CompileContext(calibration=calibration, cost_model=costs)):
                    records = run_pipeline(model, parse_pipeline(spec))
            except qcompiler.UserError as exc:
                out[",".join(map(str, subset))] = {"infeasible": str(exc)}
                continue
            layer = next(iter(records[-1].stats["per_layer"].values()))
            hist = layer["bits_histogram"]
            us = sum(costs.kernel_costs.class_us(costs.route(bitcost.class_kind(int(b), False), int(b), "auto"), rows, n)
                     for b, rows in hist.items())
            out[",".join(map(str, subset))] = {"bits_histogram": hist, "bits_per_weight": layer["bits_per_weight"],
                                               "predicted_error": round(layer["predicted_error"], 2), "predicted_us": round(us, 1)}
    print(f"\n{k}x{n}, allocate-bits of mixed{{avg-bits={budget}}} per candidate set (cost=latency keeps the least error x us):")
    print(common.table(["candidates", "channels per width", "bits", "predicted error", "predicted us (M=1)"],
                       [[name, r.get("bits_histogram", "infeasible"), r.get("bits_per_weight", ""), r.get("predicted_error", ""),
                         r.get("predicted_us", "")] for name, r in out.items()]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="K x N of each layer, comma-separated")
    parser.add_argument("--work", type=Path, default=None, help="the compiled models (kept)")
    parser.add_argument("--stage", choices=("all", "compile", "time", "class-sets"), default="all",
                        help="compile only, time an already compiled --work folder only (numpy, onnx, onnxruntime), or both; "
                        "class-sets: print what allocate-bits{cost=latency} weighs on each layer (no timing)")
    parser.add_argument("--only", default=None, help="compile and time only the variants matching this regular expression "
                        "(with float32 and ORT's 4-bit)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    common.add_mixed_options(parser)
    args = parser.parse_args()
    common.quiet()
    shapes = [tuple(int(d) for d in text.lower().split("x")) for text in args.shapes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="mixed_latency_"))
    results = {}
    if args.stage == "class-sets":
        sets = {f"{k}x{n}": class_sets(k, n) for k, n in shapes}
        common.write_json(args.json, {"benchmark": "mixed_latency class sets", "command": common.command_line(), "shapes": sets})
        print(f"\nwrote {args.json}")
        return 0
    for k, n in shapes:
        folder = work / f"{k}x{n}"
        folder.mkdir(parents=True, exist_ok=True)
        if args.stage in ("all", "compile"):
            compile_variants(folder, k, n, args.only, args.mixed_options)
        if args.stage in ("all", "time"):
            results[f"{k}x{n}"] = time_variants(folder, k, n, args.repeats, args.only)
    if results:
        import onnxruntime as ort

        body = {"benchmark": "mixed_latency", "command": common.command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "timed_on": {"machine": common.machine(), "onnxruntime": ort.__version__, "numpy": np.__version__,
                             "threads": {"ort_intra_op": THREADS, "ort_inter_op": 1}},
                "shapes": results}
        common.write_json(args.json, body)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
