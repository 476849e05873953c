"""Helpers shared by the benchmark scripts in this folder (not part of the qcompiler package).

- `machine()` / `packages()`: what the numbers were measured on, for the JSON files.
- `fix_threads(n)`: torch and ONNX Runtime thread counts, fixed and recorded.
- `interleaved_latency(...)`: latency of several variants measured round-robin (each round runs
  every variant once, in a rotated order), after warm-up; medians and spreads per variant, so
  that the ratios between variants come from the same stretch of (noisy, shared) machine time.
- The data splits: calibration text that never overlaps the evaluation text.
- `table(...)`: fixed-width text tables.
- `add_mixed_options(parser)` / `with_mixed_options(...)`: `--mixed-options` (e.g. 'rounding=nearest') for
  the `mixed{...}` pipelines a script writes inside itself.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("QCOMPILER_DATA") or (REPO / ".." / "shared" / "data")).resolve()  # QCOMPILER_DATA: elsewhere
WIKITEXT = DATA / "wikitext2-valid-excerpt.txt"
STS = DATA / "sts-pairs-dev.tsv"

THREADS = 2


# --------------------------------------------------------------------------------------------
# Where and with what


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and the int8-relevant CPU features."""
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        if found:
            model = found.group(1).strip()
    except OSError:
        pass
    memory_gb = None
    try:
        found = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        memory_gb = round(int(found.group(1)) / 2**20, 1) if found else None
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": memory_gb,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "isa": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"}),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def packages() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("qcompiler", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "transformers", "tokenizers", "gguf", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on and any uncommitted changes (the code measured)."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "uncommitted": [line for line in git("status", "--porcelain").splitlines() if line]}


def fix_threads(n: int = THREADS) -> dict[str, int]:
    """torch intra-op threads = n, inter-op = 1 (ONNX Runtime sessions are made with the same n)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
            "ort_intra_op": n, "ort_inter_op": 1}


def quiet() -> None:
    """Keep the exporters' and optimizers' INFO chatter out of the benchmark output."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch", "qcompiler"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --------------------------------------------------------------------------------------------
# Timing


def interleaved_latency(
    runners: Mapping[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 15, budget_s: float | None = None,
    reference: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Time each runner `repeats` times, round-robin: round r runs all variants once, starting at
    variant r mod n, so no variant always runs first or last. Returns per variant: median, p25,
    p75, min (ms) and the raw samples; with `reference`, also the paired ratio: the median over
    rounds of (this variant's time / the reference's time in the same round), which cancels
    slow drifts of a shared machine better than a ratio of medians. `budget_s` stops adding
    rounds once exceeded (at least 3)."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            runners[name]()
            samples[name].append(1000 * (time.perf_counter() - t))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        out[name] = {
            "median_ms": round(statistics.median(values), 2),
            "p25_ms": round(q[0], 2),
            "p75_ms": round(q[2], 2),
            "min_ms": round(min(values), 2),
            "rounds": len(values),
            "samples_ms": [round(v, 2) for v in values],
        }
        if reference is not None:
            ratios = [v / r for v, r in zip(values, samples[reference])]
            rq = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            out[name].update(paired_ratio=round(statistics.median(ratios), 4), paired_ratio_p25=round(rq[0], 4),
                             paired_ratio_p75=round(rq[2], 4))
    return out


def files_size(paths: Sequence[Path]) -> int:
    return int(sum(Path(p).stat().st_size for p in paths if Path(p).is_file()))


def onnx_files(model_path: Path) -> list[Path]:
    """A model file plus the external-data files it names (if any)."""
    import onnx

    model_path = Path(model_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    extra = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                extra.add(model_path.parent / entry.value)
    return [model_path, *sorted(extra)]


# --------------------------------------------------------------------------------------------
# Data: calibration never overlaps evaluation


def wikitext() -> str:
    return WIKITEXT.read_text(encoding="utf-8")


def wikitext_split(fraction: float = 0.75) -> tuple[str, str]:
    """(head, tail) of the WikiText excerpt, cut at the line boundary at or before `fraction` of
    its characters: head (first three quarters) for evaluation, tail (last quarter) for calibration."""
    text = wikitext()
    cut, pos = int(len(text) * fraction), 0
    for line in text.splitlines(keepends=True):
        if pos + len(line) > cut:
            break
        pos += len(line)
    return text[:pos], text[pos:]


def sentences(text: str) -> list[str]:
    """Sentences of WikiText's tokenized form: each non-empty line split after ' . '."""
    out = []
    for line in text.splitlines():
        for piece in re.split(r"(?<= \.) ", line.strip()):
            if piece.strip():
                out.append(piece.strip())
    return out


def word_windows(text: str, count: int, words: int) -> list[str]:
    """`count` windows of `words` words spread evenly over `text` (overlapping when the text is
    shorter than count * words), each one line of calibration text."""
    tokens = text.split()
    if len(tokens) <= words:
        return [" ".join(tokens)] * count
    stride = (len(tokens) - words) / max(count - 1, 1)
    return [" ".join(tokens[round(i * stride): round(i * stride) + words]) for i in range(count)]


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Output


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A fixed-width table; `align` is one letter per column, 'l' or 'r' (default: first l, rest r)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(row):
        return " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))

    lines = [fmt(cells[0]), "-+-".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def write_json(path: Path, body: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=False, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or the one-line reason it is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"matplotlib not importable ({exc}); no PNG"
    return plt, None


def per_model_folders(models):
    """(name, an empty scratch folder) for each of `models`, the folders removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            work = Path(tmp) / name
            work.mkdir()
            yield name, work


def log(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def finish_run(path: Path, threads: int, results: list, table: str) -> Path:
    """Print the run's table, write its JSON (`write_run`) and say where."""
    print(table)
    written = write_run(path, threads, results, table)
    log(f"wrote {path}")
    return written


def write_run(path: Path, threads: int, results: list, table: str) -> Path:
    """A benchmark run's JSON: the command, machine, packages and git state beside its results and
    the table it printed."""
    return write_json(path, {
        "command": command_line(), "machine": machine(), "packages": packages(), "git": git_state(),
        "threads": threads, "results": results, "table": table,
    })


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return repr(value)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def ort_nbits_quantize(float_model: Path, algorithm: str = "default", symmetric: bool = False,
                       accuracy_level: int | None = None, block_size: int = 128,
                       calibration: Sequence[dict[str, Any]] | None = None) -> tuple[Any, str]:
    """ONNX Runtime's own 4-bit weight-only quantizer (`MatMulNBitsQuantizer`, blocks of
    `block_size` rows) on an ONNX file: algorithm "default" (RTN with `symmetric`), "RTN", "HQQ" or
    "GPTQ" (which reads the feed dicts in `calibration`). Returns the quantized ModelProto and the
    name of the config class used."""
    import contextlib
    import io

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    level = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    if algorithm == "RTN":
        config = mnq.RTNWeightOnlyQuantConfig()
    elif algorithm == "HQQ":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    elif algorithm == "GPTQ":
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=ListReader(calibration or []), block_size=block_size)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=4, **level)
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(float_model)), bits=4, block_size=block_size, is_symmetric=symmetric,
                                         algo_config=config, **level)
    with contextlib.redirect_stdout(io.StringIO()):  # the RTN path prints a progress bar
        quantizer.process()
    proto = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    return proto, type(config).__name__


class ListReader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):  # ONNX Runtime's GPTQ path iterates the reader instead of calling get_next
        return iter(self.batches)

    def rewind(self):
        self.i = 0


# --------------------------------------------------------------------------------------------
# Options of the mixed preset for pipelines written inside a script


def add_mixed_options(parser) -> None:
    """`--mixed-options OPTIONS` on `parser` (default empty), for `with_mixed_options`."""
    parser.add_argument("--mixed-options", default="", metavar="OPTIONS",
                        help="more options of the mixed preset for every `mixed{...}` pipeline this script compiles, "
                        "e.g. 'rounding=nearest'")


def with_mixed_options(pipeline: str, options: str) -> str:
    """`pipeline` with `options` added inside every `mixed` preset call: `mixed` becomes
    `mixed{OPTIONS}`, `mixed{a=1}` becomes `mixed{a=1 OPTIONS}` (an option the call already sets
    keeps its own value); items of other passes (split at commas outside braces) stay as they are."""
    if not options.strip():
        return pipeline
    items, depth, start = [], 0, 0
    for i, ch in enumerate(pipeline + ","):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(pipeline[start:i])
            start = i + 1
    for n, item in enumerate(items):
        call = re.fullmatch(r"(\s*mixed\s*)(?:\{(.*)\})?(\s*)", item, re.S)
        if call:
            given = (call.group(2) or "").split()
            keys = {token.partition("=")[0] for token in given}
            extra = [token for token in options.split() if token.partition("=")[0] not in keys]
            if extra:
                items[n] = f"{call.group(1)}{{{' '.join(given + extra)}}}{call.group(3)}"
    return ",".join(items)


# --------------------------------------------------------------------------------------------
# Weight bytes of any ONNX graph, counted one way for every tool

LINEAR_WEIGHT_INPUTS = {"MatMul": (1,), "Gemm": (1,), "MatMulNBits": (1, 2, 3, 4), "MatMulInteger": (1, 3),
                        "DynamicQuantizeMatMul": (1, 2, 3), "MatMulIntegerToFloat": (1, 3, 5), "QLinearMatMul": (3, 4, 5)}
# inputs that carry shapes, axes or pads, not data: not followed and not counted
METADATA_INPUTS = {"Reshape": (1,), "Pad": (1, 3), "Slice": (1, 2, 3, 4), "Expand": (1,), "Unsqueeze": (1,),
                   "Squeeze": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Shape": (0,), "Size": (0,)}
ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
                17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4}  # onnx.TensorProto data types; 21/22 = UINT4/INT4


def tensor_bytes(tensor) -> int:
    """Stored bytes of a TensorProto (its dims and element type; 4-bit types packed two per byte),
    whether its data is inline or external."""
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return -(-count * ELEMENT_BITS.get(tensor.data_type, 32) // 8)


def constant_sources(proto) -> tuple[dict[str, Any], dict[str, frozenset[str]]]:
    """(constants by name, for every value computed from constants only: the constants it comes
    from). One pass in the graph's (topological) order; shape, axes and pads inputs are not data."""
    constants = {t.name: t for t in proto.graph.initializer}
    sources: dict[str, frozenset[str]] = {name: frozenset((name,)) for name in constants}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
            sources[node.output[0]] = frozenset(node.output[:1])
            continue
        skip = METADATA_INPUTS.get(node.op_type, ())
        data = [name for i, name in enumerate(node.input) if name and i not in skip]
        if data and all(name in sources for name in data):
            found = frozenset().union(*(sources[name] for name in data))
            for out in node.output:
                sources[out] = found
    return constants, sources


def linear_weight_bytes(proto) -> dict[str, Any]:
    """Bytes of every constant a linear layer's weight is computed from (MatMul / Gemm input B,
    MatMulNBits' B, scales, zero points and g_idx, followed back through DequantizeLinear,
    Transpose, Reshape, Cast, Gather of packed codes and the like): codes + scales + zero points +
    indices, whatever the format. An input that depends on anything but constants (attention's
    Q @ K^T) is not a weight. Each constant counts once. `head` = the new bytes of the linears the
    graph's first output comes from (the LM head); `embedding` = the bytes of the table a Gather
    with run-time indices reads that no linear already counted (0 when tied to the head)."""
    constants, sources = constant_sources(proto)
    producer = {out: node for node in proto.graph.node for out in node.output}
    head_nodes = _head_linears(proto, producer, sources)
    counted: set[str] = set()
    total, linears, head_bytes = 0, 0, 0
    for node in proto.graph.node:
        positions = LINEAR_WEIGHT_INPUTS.get(node.op_type)
        if not positions:
            continue
        inputs = [node.input[i] for i in positions if i < len(node.input) and node.input[i]]
        if not inputs or not all(name in sources for name in inputs):
            continue
        names = set().union(*(sources[name] for name in inputs))
        linears += 1
        new = names - counted
        counted |= new
        size = sum(tensor_bytes(constants[n]) for n in new)
        total += size
        if id(node) in head_nodes:
            head_bytes += size
    embedding: set[str] = set()
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in sources and node.input[1] not in sources:
            embedding |= {n for n in sources[node.input[0]] if len(constants[n].dims) >= 2}
    embedding_new = embedding - counted
    return {"total": total, "linears": linears, "head": head_bytes,
            "embedding": sum(tensor_bytes(constants[n]) for n in embedding_new),
            "embedding_tied_to_a_linear": bool(embedding) and not embedding_new}


def _head_linears(proto, producer, sources) -> set[int]:
    """ids of the linear nodes the graph's first output comes from (the LM head, possibly split
    into several linears by bit width): reached back from the output through run-time inputs,
    without passing a linear, at most 40 nodes."""
    start = proto.graph.output[0].name if proto.graph.output else None
    found, queue, seen = set(), [start], set()
    while queue and len(seen) < 40:
        node = producer.get(queue.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in LINEAR_WEIGHT_INPUTS:
            found.add(id(node))
            continue
        queue.extend(i for i in node.input if i and i not in sources)
    return found


def mixed_layer_mib(manifest: dict) -> dict:
    """The weight-only layers' bytes at rest and resident once the session starts (the manifest's `mixed_layers`), MiB."""
    layers = manifest.get("mixed_layers") or {}
    if not layers or any("bytes_resident" not in v for v in layers.values()):
        return {}
    return {"layers_at_rest_mib": round(sum(v["bytes_at_rest"] for v in layers.values()) / 2**20, 2),
            "layers_resident_mib": round(sum(v["bytes_resident"] for v in layers.values()) / 2**20, 2)}


SESSION_PROBE = """
import json, resource, sys
import onnxruntime as ort
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon", "RssFile")}
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = int(sys.argv[2]), 1, 3
if sys.argv[3] == "off":
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
before = status()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
after = status()
print(json.dumps({"added": after["VmRSS"] - before["VmRSS"], "anon_added": after["RssAnon"] - before["RssAnon"],
                  "file_backed_added": after["RssFile"] - before["RssFile"],
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def session_memory(path: Path, threads: int, optimize: bool = True) -> dict[str, float]:
    """MiB of process memory a fresh process adds by creating an ONNX Runtime session for `path`
    (the model read and its initializers folded and repacked, nothing run): `added` RSS, its
    anonymous (`anon_added`) and file-backed (`file_backed_added`, mapped external data) parts, and
    the process's `peak` RSS. `optimize=False`: graph optimizations off (no constant folding)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", SESSION_PROBE, str(path), str(threads), "on" if optimize else "off"],
                         check=True, capture_output=True, text=True)
    return {key: round(value / 2**20, 1) for key, value in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def session_rss(path: Path, threads: int) -> float:
    """MiB of process RSS added by creating an ONNX Runtime session for `path`, in a fresh process
    (`session_memory`'s `added`)."""
    return session_memory(path, threads)["added"]
