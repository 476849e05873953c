"""Compile cost against model size: synthetic Llama-architecture models in float16 with external data.

    python benchmarks/scale.py                                  # 0.135B only
    python benchmarks/scale.py --sizes 0.135B,0.5B --windows 32
    python benchmarks/scale.py --sizes 7B --keep-models /big/disk  # Llama-2-7B shapes, 13.5 GB

Each model is written directly as a float16 ONNX file plus one external data file, layer by layer
(seeded random weights; memory for one layer, never the model): token embedding, per layer
RMSNorm, attention with rotary position embedding, grouped key/value heads and a causal mask,
RMSNorm, SwiGLU MLP; final RMSNorm and an untied output projection. Shapes:

| size   | layers | hidden | FFN   | heads | kv heads | vocab |
|--------|--------|--------|-------|-------|----------|-------|
| 0.135B | 30     | 576    | 1536  | 9     | 3        | 49152 | (SmolLM2-135M's, output projection untied)
| 0.5B   | 24     | 1024   | 4096  | 16    | 16       | 32000 |
| 1.5B   | 32     | 2048   | 5632  | 32    | 4        | 32000 |
| 3B     | 26     | 3200   | 8640  | 32    | 32       | 32000 |
| 7B     | 32     | 4096   | 11008 | 32    | 32       | 32000 | (Llama-2-7B's)

For each size, in a fresh child process each (so peak RSS is one job's): `qcompiler.compile` with
`w8a8{act-mode=per-token}` and `mixed{avg-bits=4.25}` on `--windows` calibration windows of 128
random token ids (seeded; random weights have no quality to measure), recording the wall time of
each pass, the total, peak RSS (`ru_maxrss` of the child, in GB of 10^9 bytes as the target) and the bytes written; then ONNX
Runtime's `quantize_dynamic` (int8 weights) and `MatMulNBitsQuantizer` (4-bit, blocks of 128) on
the same file, their time and peak RSS, or their error. Each compiled model is then loaded in
ONNX Runtime in a fresh process and run on 16 tokens (`check_output`: load time, peak RSS, whether
every logit is finite). With two or more sizes the exponent of
compile time against parameters is fitted (least squares on logs). A table goes to stdout and the
JSON (machine, package versions, commit) to `benchmarks/results/scale.json`.

`--pipeline P` (repeatable) compiles with other pipelines (`--pipeline calibrate`: calibration
alone); `--block-sequential` calibrates one block at a time at every size (sizes whose weights pass
`qcompiler.ir.EXTERNAL_DATA_THRESHOLD` always do); `--no-peers` skips ONNX Runtime's quantizers,
`--peers-only` runs only them. Their address space is capped at 85 % of the machine's memory, so
that one that needs more fails with a MemoryError row instead of swapping or being killed.

`--fit A.json B.json ...` compiles nothing: it merges earlier runs (say one per size, run in turn;
a job of a size given again in a later file replaces the earlier run),
prints each job beside the memory target (half the source's bytes + 2 GB), fits the time exponent
of each job over all the sizes, and writes the merged JSON to `--json` and a plot of time and
peak RSS against size beside it (`.png`, where matplotlib is installed: the `peers` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = {  # layers, hidden, ffn, heads, kv heads, vocab
    "0.135B": (30, 576, 1536, 9, 3, 49152),
    "0.5B": (24, 1024, 4096, 16, 16, 32000),
    "1.5B": (32, 2048, 5632, 32, 4, 32000),
    "3B": (26, 3200, 8640, 32, 32, 32000),
    "7B": (32, 4096, 11008, 32, 32, 32000),
}
PIPELINES = ("w8a8{act-mode=per-token}", "mixed{avg-bits=4.25}")
SEQ = 128
MAX_POSITIONS = 2048
THREADS = 2
RSS_UNIT = "GB (1e9 bytes), as the memory target and the source's size"  # ru_maxrss (KiB) * 1024 / 1e9
PEER_MEMORY_CAP = int(0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # ONNX Runtime's quantizers' address space


def parameters(size: str) -> int:
    layers, hidden, ffn, heads, kv, vocab = SHAPES[size]
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


class _DataFile:
    """External data written tensor by tensor; each tensor gets its TensorProto reference."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def add(self, name: str, array: np.ndarray):
        from onnx import TensorProto

        data = np.ascontiguousarray(array, np.float16).tobytes()
        self.file.write(data)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.offset += len(data)
        return tensor

    def close(self) -> None:
        self.file.close()


def write_llama(size: str, folder: Path, seed: int = 0) -> Path:
    """The synthetic model as `folder/model.onnx` + `folder/model.onnx.data` (float16)."""
    from onnx import TensorProto, helper, numpy_helper, save

    layers, hidden, ffn, heads, kv, vocab = SHAPES[size]
    head_dim, group = hidden // heads, heads // kv
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = _DataFile(folder / "model.onnx.data")
    inits, nodes = [], []

    def weight(name, shape, scale, offset=0.0):
        inits.append(data.add(name, rng.standard_normal(shape, np.float32) * scale + offset))
        return name

    def small(name, array):  # inline constants: shapes, axes, scalars
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def rms_norm(x, prefix):
        w = weight(f"{prefix}.weight", [hidden], 0.1, offset=1.0)
        sq = node("Mul", [x, x], f"{prefix}.sq")
        mean = node("ReduceMean", [sq, "axes_last"], f"{prefix}.mean", keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}.add_eps")], f"{prefix}.rms")
        return node("Mul", [node("Div", [x, rms], f"{prefix}.normed"), w], f"{prefix}.out")

    def rotary(x, prefix, n_heads):  # x: [b, s, n_heads * head_dim] -> [b, n_heads, s, head_dim]
        shaped = node("Reshape", [x, f"shape_{n_heads}"], f"{prefix}.heads")
        t = node("Transpose", [shaped], f"{prefix}.t", perm=[0, 2, 1, 3])
        first = node("Slice", [t, "zero", "half", "axes_last"], f"{prefix}.x1")
        second = node("Slice", [t, "half", "full", "axes_last"], f"{prefix}.x2")
        rotated = node("Concat", [node("Neg", [second], f"{prefix}.neg"), first], f"{prefix}.rot", axis=-1)
        return node("Add", [node("Mul", [t, "cos"], f"{prefix}.cos"), node("Mul", [rotated, "sin"], f"{prefix}.sin")], f"{prefix}.rope")

    small("axes_last", np.array([-1], np.int64))
    small("eps", np.array(1e-5, np.float16))
    small("zero", np.array([0], np.int64))
    small("half", np.array([head_dim // 2], np.int64))
    small("full", np.array([head_dim], np.int64))
    small("one", np.array([1], np.int64))
    small(f"shape_{heads}", np.array([0, 0, heads, head_dim], np.int64))
    if kv != heads:  # one constant when they agree (the loader refuses a name defined twice)
        small(f"shape_{kv}", np.array([0, 0, kv, head_dim], np.int64))
    small("shape_group", np.array([0, kv, 1, -1, head_dim], np.int64))
    small("shape_merged", np.array([0, -1, hidden], np.int64))
    small("scale", np.array(head_dim**-0.5, np.float16))
    positions = np.arange(MAX_POSITIONS)[:, None] / (10000 ** (np.arange(0, head_dim, 2) / head_dim))[None, :]
    angles = np.concatenate([positions, positions], axis=1)
    small("cos_table", np.cos(angles).astype(np.float16))
    small("sin_table", np.sin(angles).astype(np.float16))
    small("mask_table", np.triu(np.full((MAX_POSITIONS, MAX_POSITIONS), -1e4, np.float16), 1))
    # sequence-dependent tables: rows [0, seq) of the position tables and the causal mask
    seq_len = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), "one", "two"], "seq_len")
    small("two", np.array([2], np.int64))
    node("Slice", ["cos_table", "zero", seq_len, "zero"], "cos")
    node("Slice", ["sin_table", "zero", seq_len, "zero"], "sin")
    mask_rows = node("Slice", ["mask_table", "zero", seq_len, "zero"], "mask_rows")
    node("Slice", [mask_rows, "zero", seq_len, "one"], "mask")

    x = node("Gather", [weight("embed_tokens.weight", [vocab, hidden], 0.02), "input_ids"], "embed")
    for i in range(layers):
        p = f"layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm")
        q = node("MatMul", [h, weight(f"{p}.self_attn.q_proj.weight", [hidden, hidden], hidden**-0.5)], f"{p}.q")
        k = node("MatMul", [h, weight(f"{p}.self_attn.k_proj.weight", [hidden, kv * head_dim], hidden**-0.5)], f"{p}.k")
        v = node("MatMul", [h, weight(f"{p}.self_attn.v_proj.weight", [hidden, kv * head_dim], hidden**-0.5)], f"{p}.v")
        q, k = rotary(q, f"{p}.q", heads), rotary(k, f"{p}.k", kv)
        v = node("Transpose", [node("Reshape", [v, f"shape_{kv}"], f"{p}.v.heads")], f"{p}.v.t", perm=[0, 2, 1, 3])
        if group > 1:  # grouped key/value heads: each serves `group` query heads
            small(f"{p}.expand", np.array([1, 1, group, 1, 1], np.int64))
            k, v = (node("Reshape", [node("Tile", [node("Reshape", [t, "shape_group"], f"{t}.g"), f"{p}.expand"], f"{t}.tile"),
                                     f"shape_all_{heads}"], f"{t}.all") for t in (k, v))
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], f"{p}.kt", perm=[0, 1, 3, 2])], f"{p}.qk"), "scale"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, "mask"], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"{p}.ctx")
        merged = node("Reshape", [node("Transpose", [ctx], f"{p}.ctx.t", perm=[0, 2, 1, 3]), "shape_merged"], f"{p}.merged")
        attn = node("MatMul", [merged, weight(f"{p}.self_attn.o_proj.weight", [hidden, hidden], hidden**-0.5)], f"{p}.o")
        x = node("Add", [x, attn], f"{p}.residual1")
        h = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [h, weight(f"{p}.mlp.gate_proj.weight", [hidden, ffn], hidden**-0.5)], f"{p}.gate")
        up = node("MatMul", [h, weight(f"{p}.mlp.up_proj.weight", [hidden, ffn], hidden**-0.5)], f"{p}.up")
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sig")], f"{p}.silu"), up], f"{p}.act")
        down = node("MatMul", [act, weight(f"{p}.mlp.down_proj.weight", [ffn, hidden], ffn**-0.5)], f"{p}.down")
        x = node("Add", [x, down], f"{p}.residual2")
    h = rms_norm(x, "norm")
    node("MatMul", [h, weight("lm_head.weight", [hidden, vocab], hidden**-0.5)], "logits")
    if group > 1:
        small(f"shape_all_{heads}", np.array([0, heads, -1, head_dim], np.int64))
    data.close()
    graph = helper.make_graph(
        nodes, f"llama-{size}", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(folder / "model.onnx"))
    return folder / "model.onnx"


def write_calibration(path: Path, windows: int, vocab: int, seed: int = 1) -> Path:
    ids = np.random.default_rng(seed).integers(0, vocab, (windows, SEQ), dtype=np.int64)
    np.savez(path, input_ids=ids)
    return path


_COMPILE_CHILD = """
import json, resource, sys, time
from qcompiler.driver.compiler import compile
start = time.perf_counter()
result = compile(sys.argv[1], sys.argv[2], pipeline=sys.argv[3], calibration=sys.argv[4], calib_count=int(sys.argv[5]),
                 threads=int(sys.argv[6]), drift=False, block_sequential=sys.argv[7] == "1")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "passes": {r.name: r.seconds for r in result.records},
                  "timings": result.timings, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                  "output_bytes": sum(f.stat().st_size for f in result.output.iterdir()),
                  "effective_bits": result.manifest.get("effective_bits_per_weight")}))
"""

_PEER_CHILD = """
import json, resource, sys, time
from pathlib import Path
cap = int(sys.argv[5])
if cap:  # address space capped below the machine's memory: a MemoryError row, not the kernel's OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.path.insert(0, sys.argv[4])
source, out, which = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out.mkdir(parents=True, exist_ok=True)
start = time.perf_counter()
if which == "quantize_dynamic":
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(source, out / "model.onnx", weight_type=QuantType.QInt8, use_external_data_format=True)
else:
    import onnx, common
    proto, _ = common.ort_nbits_quantize(source)
    onnx.save(proto, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                  "output_bytes": sum(f.stat().st_size for f in out.iterdir())}))
"""


_RUN_CHILD = """
import json, resource, sys, time
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads, options.log_severity_level = int(sys.argv[2]), 3
start = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
loaded = time.perf_counter() - start
ids = np.random.default_rng(0).integers(0, int(sys.argv[3]), (1, 16)).astype(np.int64)
start = time.perf_counter()
logits = session.run(None, {session.get_inputs()[0].name: ids})[0]
print(json.dumps({"load_s": loaded, "run_s": time.perf_counter() - start, "logits_finite": bool(np.isfinite(logits).all()),
                  "logits_dtype": str(logits.dtype), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def check_output(model: Path, vocab: int) -> dict:
    """The emitted model loaded in ONNX Runtime (a fresh process) and run on 16 tokens: load and run
    seconds, whether every logit is finite, the process's peak RSS."""
    return _child(_RUN_CHILD, [str(model), str(THREADS), str(vocab)])


def _child(code: str, args: list[str]) -> dict:
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip() and not line.startswith("WARNING")]
        failed = [line for line in lines if "Error" in line or "bad_alloc" in line or "Killed" in line]
        error = f"exit {run.returncode}: " + ((failed or lines)[-1][:300] if lines else "no message")
        if any(word in error for word in ("MemoryError", "bad_alloc", "Failed to allocate")):
            error = f"out of memory under the {PEER_MEMORY_CAP / 2**30:.1f} GiB address-space cap ({error[:200]})"
        return {"error": error}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _checked(check: dict | None) -> str:
    if not check:
        return ""
    if "error" in check:
        return f"no: {check['error'][:60]}"
    return f"{'finite' if check['logits_finite'] else 'NOT finite'} logits, load {check['load_s']:.0f} s, {check['peak_rss_gb']:.2f} GB"


def fitted_exponent(points: list[tuple[float, float]]) -> float | None:
    """The slope of log(seconds) against log(parameters), least squares; None below two sizes."""
    if len(points) < 2:
        return None
    x = np.log([p for p, _ in points])
    y = np.log([s for _, s in points])
    return float(np.polyfit(x, y, 1)[0])


def memory_target_gb(source_bytes: int) -> float:
    """The issue's bound on a compile's peak RSS: half the source's bytes plus 2 GB."""
    return 0.5 * source_bytes / 1e9 + 2.0


def fit(files: list[Path], out: Path) -> None:
    """Merge the results of earlier runs (one size each, or several), print every run with the
    memory target, fit the time exponent per job over all sizes, and write the merged JSON."""
    bodies = [json.loads(f.read_text()) for f in files]
    windows = sorted({b["windows"] for b in bodies})
    by_size: dict[str, dict] = {}
    for body in bodies:  # a job of a size given again in a later file replaces the earlier run
        for e in body["results"]:
            merged = by_size.setdefault(e["size"], {**e, "runs": {}})
            for job, run in e["runs"].items():
                merged["runs"][job] = {**run, "commit": body.get("git", {}).get("commit")}
    results = sorted(by_size.values(), key=lambda e: e["parameters"])
    rows, points = [], {}
    for e in results:
        target = memory_target_gb(e["source_bytes"])
        for job, run in e["runs"].items():
            if "seconds" not in run:
                rows.append([e["size"], f"{e['parameters'] / 1e9:.3f}", job, "error", "", f"{target:.2f}", "", run.get("error", "")[:60], ""])
                continue
            points.setdefault(job, []).append((e["parameters"], run["seconds"]))
            rows.append([e["size"], f"{e['parameters'] / 1e9:.3f}", job, f"{run['seconds']:.1f}", f"{run['peak_rss_gb']:.2f}",
                         f"{target:.2f}", "yes" if run["peak_rss_gb"] <= target else "no", f"{run['output_bytes'] / 1e9:.3f}",
                         _checked(run.get("output_check"))])
    print(common.table(["size", "params (B)", "job", "time s", "peak RSS GB", "target GB", "within", "output GB / error",
                        "output runs"], rows))
    exponents = {job: fitted_exponent(p) for job, p in points.items()}
    for job, exponent in exponents.items():
        sizes = len(points[job])
        print(f"time exponent {job}: {'n/a (one size)' if exponent is None else f'{exponent:.2f}'} over {sizes} sizes")
    body = {"command": common.command_line(), "merged": [str(f) for f in files], "windows": windows,
            "results": results, "time_exponent": exponents, "memory_target": "0.5 x source bytes + 2 GB", "rss_unit": RSS_UNIT}
    print(f"wrote {common.write_json(out, body)}")
    picture = plot(results, out.with_suffix(".png"))
    print(f"wrote {picture}" if picture else "no plot: matplotlib is not installed (pip install matplotlib)")


def plot(results: list[dict], path: Path) -> Path | None:
    """Compile time and peak RSS against parameters, one line per job, the memory target dashed (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    jobs = list(dict.fromkeys(job for e in results for job in e["runs"]))
    for job in jobs:
        points = [(e["parameters"] / 1e9, e["runs"][job]) for e in results if "seconds" in e["runs"].get(job, {})]
        if not points:
            continue
        times.plot([p for p, _ in points], [r["seconds"] for _, r in points], marker="o", label=job)
        memory.plot([p for p, _ in points], [r["peak_rss_gb"] for _, r in points], marker="o", label=job)
    sizes = [e["parameters"] / 1e9 for e in results]
    memory.plot(sizes, [memory_target_gb(e["source_bytes"]) for e in results], "k--", label="target: 0.5 x source + 2 GB")
    for axes, label in ((times, "compile time, s"), (memory, "peak RSS, GB")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(sorted(set(sizes)), [f"{size:.2g}" for size in sorted(set(sizes))], minor=False)
        axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes.set_xlabel("parameters, billions")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    memory.legend(fontsize=7)
    times.set_title("time against size")
    memory.set_title("memory against size")
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.135B", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows of 128 tokens (default 32)")
    parser.add_argument("--keep-models", metavar="DIR",
                        help="write the models here and keep them, or reuse those already there (default: a temporary folder)")
    parser.add_argument("--no-peers", action="store_true", help="skip ONNX Runtime's quantizers")
    parser.add_argument("--peers-only", action="store_true", help="only ONNX Runtime's quantizers (no compile)")
    parser.add_argument("--pipeline", action="append", metavar="P",
                        help=f"a pipeline to compile with (repeatable; default: {' and '.join(PIPELINES)})")
    parser.add_argument("--block-sequential", action="store_true", help="calibrate one block at a time at every size (large sizes always do)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "scale.json")
    parser.add_argument("--fit", nargs="+", type=Path, metavar="JSON",
                        help="compile nothing: merge these result files, print them with the memory target, fit the time exponents, write --json")
    args = parser.parse_args()
    if args.fit:
        fit(args.fit, args.json)
        return
    pipelines = tuple(args.pipeline) if args.pipeline else PIPELINES
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown size {unknown[0]}; choose from {', '.join(SHAPES)}")
    common.fix_threads(THREADS)
    root = Path(args.keep_models) if args.keep_models else Path(tempfile.mkdtemp(prefix="qcompiler-scale-"))
    rows, results = [], []
    for size in sizes:
        folder = root / f"llama-{size}"
        start = time.perf_counter()
        reused = args.keep_models is not None and (folder / "model.onnx").exists()
        source = folder / "model.onnx" if reused else write_llama(size, folder)  # a kept model is reused as written
        build_s = None if reused else time.perf_counter() - start
        source_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        calib = write_calibration(folder / "calib.npz", args.windows, SHAPES[size][5])
        entry = {"size": size, "parameters": parameters(size), "source_bytes": source_bytes, "build_s": build_s, "runs": {}}
        jobs = [(p, _COMPILE_CHILD, [str(source), str(root / "out"), p, str(calib), str(args.windows), str(THREADS),
                                       "1" if args.block_sequential else "0"]) for p in pipelines if not args.peers_only]
        if not args.no_peers:
            bench = str(Path(__file__).resolve().parent)
            jobs += [(name, _PEER_CHILD, [str(source), str(root / "out"), name, bench, str(PEER_MEMORY_CAP)])
                     for name in ("quantize_dynamic", "MatMulNBitsQuantizer")]
        for name, code, child_args in jobs:
            subprocess.run(["rm", "-rf", str(root / "out")], check=True)
            result = _child(code, child_args)
            if "seconds" in result and code is _COMPILE_CHILD:
                result["output_check"] = check_output(root / "out" / "model.onnx", SHAPES[size][5])
            entry["runs"][name] = result
            rows.append([size, f"{parameters(size) / 1e9:.3f}", f"{source_bytes / 1e9:.2f}", name,
                         f"{result['seconds']:.1f}" if "seconds" in result else "error",
                         f"{result['peak_rss_gb']:.2f}" if "peak_rss_gb" in result else "",
                         f"{result['output_bytes'] / 1e9:.3f}" if "output_bytes" in result else "",
                         result.get("error", "")[:60] or " ".join(f"{k}={v:.1f}" for k, v in result.get("passes", {}).items()),
                         _checked(result.get("output_check"))])
            print(rows[-1], flush=True)
        subprocess.run(["rm", "-rf", str(root / "out")], check=True)
        results.append(entry)
        if not args.keep_models:
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    exponents = {}
    for pipeline in pipelines:
        points = [(e["parameters"], e["runs"][pipeline]["seconds"]) for e in results if "seconds" in e["runs"].get(pipeline, {})]
        exponents[pipeline] = fitted_exponent(points)
    print(common.table(["size", "params (B)", "source GB", "job", "time s", "peak RSS GB", "output GB", "passes s / error",
                        "output runs"], rows))
    for pipeline, exponent in exponents.items():
        print(f"time exponent {pipeline}: {'n/a (one size)' if exponent is None else f'{exponent:.2f}'}")
    body = {"command": common.command_line(), "machine": common.machine(), "packages": common.packages(),
            "git": common.git_state(), "threads": THREADS, "windows": args.windows, "seq": SEQ,
            "block_sequential": args.block_sequential,
            "results": results, "time_exponent": exponents, "rss_unit": RSS_UNIT}
    print(f"wrote {common.write_json(args.json, body)}")
    if not args.keep_models:
        subprocess.run(["rm", "-rf", str(root)], check=True)


if __name__ == "__main__":
    main()
