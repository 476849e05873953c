"""Quality against effective bits per weight (a Pareto curve) for channel-wise mixed precision.

    python benchmarks/mixed_pareto.py                        # smollm2-135m and minilm-l6 (30-50 min on 2 cores)
    python benchmarks/mixed_pareto.py --models minilm-l6     # one model
    python benchmarks/mixed_pareto.py --quick --windows 4    # fewer budgets and windows (a smoke run)
    python benchmarks/mixed_pareto.py --budgets 3.25,4.25 --no-uniform --float-from DIR   # the mixed curve only, float read from DIR/NAME

Each model is captured once: `qcompiler.compile(NAME, DIR, pipeline="default", drift=False)` writes
the float ONNX Runtime model; every variant below is compiled FROM that `model.onnx` file, with the
same calibration feed dicts (passed as `calibration=`), 2 ONNX Runtime threads.

Rows, per model:
- `float32`: the float artifact (our `default` pipeline).
- `ours mixed B`: the `mixed{avg-bits=B}` preset (canonicalize, calibrate, allocate-bits{avg-bits=B
  scope=layer codebook=uniform, candidates 2,4,8, 0.5 % fp16 channels, no sparse outliers,
  integer zero points for 2/4/8 bits}, quantize-weights{grid=mse}, fold-permutation, lower-ort:
  MatMulNBits at the accuracy level picked for the CPU, 4 = int8 compute on x86), B in 2.5, 3.0,
  3.25, 3.5, 4.0, 4.25 (`--quick`: 2.5, 3.25, 4.0; `--budgets` any list; `--mixed-options` adds
  preset options such as `scope=model sensitivity=output`). A budget the preset refuses as infeasible is recorded with the compiler's message,
  and the same budget is tried once more with both kinds of outliers off (`ours mixed B
  no-outliers`: the expanded preset with `outliers-act=0 outliers-weight=0`; not on the curve).
- `ours uniform b-bit RTN`: `calibrate,allocate-bits{avg-bits=8 candidates=b other-widths=expand outliers-act=0
  outliers-weight=0},quantize-weights{grid=minmax}`: every channel at b bits, asymmetric min-max
  groups of 128 rows, fp16 scale per group and a zero point per group: integer for 4 bits (the
  MatMulNBits form), fp16 for 3 bits (b = 3, 4).
- ONNX Runtime's `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(bits=4,
  block_size=128)` applied to the float artifact; every MatMul with a constant weight becomes
  `com.microsoft.MatMulNBits` (accuracy_level left at its default, so the product is computed in
  float; `--peers-from FILE` copies these rows from an earlier run instead):
  - `ort 4-bit RTN asym`: `RTNWeightOnlyQuantConfig()`, is_symmetric=False. In onnxruntime 1.32 it
    fails when a weight has an odd number of 128-row blocks per column (MiniLM's K=384: 3 blocks;
    SmolLM2's K=576: 5): its zero-point packing (neural_compressor/weight_only.py,
    `make_matmul_weight_only_node`) packs the nibbles of all columns as one flat array and then
    reshapes it to [N, -1]. The failure is recorded as the row's result.
  - `ort 4-bit RTN sym`: `RTNWeightOnlyQuantConfig()`, is_symmetric=True (no zero points).
  - `ort 4-bit default (RTN asym)`: `DefaultWeightOnlyQuantConfig(block_size=128,
    is_symmetric=False)`, ONNX Runtime's built-in blockwise round-to-nearest (min-max, asym).
  - `ort 4-bit HQQ`: `HQQWeightOnlyQuantConfig(block_size=128, bits=4)` (fp32 scales and zero points).
  "ORT 4-bit RTN" in the targets means the best of the RTN rows that ran.

Effective bits per weight: ours = the manifest's `effective_bits_per_weight` (bytes the backend
wrote for weights * 8 / the float model's MatMul weight count, the float manifest's `weights`).
ORT peers = (bytes of every MatMulNBits' B, scales and zero_points initializers [+ g_idx if any]
+ bytes of any MatMul/Gemm weight left in float) * 8 / the same weight count. K not a multiple of
128 (SmolLM2's 576) is padded to whole blocks by MatMulNBits; those padded bytes count.

Quality: smollm2-135m = perplexity over the first N (`--windows`, default 8) non-overlapping
256-token windows of the first three quarters of the WikiText excerpt (cut at the line boundary at
3/4 of its characters); minilm-l6 = STS Spearman x100 of embedding cosines over all pairs of
sts-pairs-dev.tsv. Every row is scored by the same code on an ONNX Runtime session (2 threads;
`next_token_nll`, `read_sts`, `spearman` of `qcompiler.tools.evaluate`, the batching of
`qcompiler.tools.evaluate`); the float artifact and the first mixed artifact are also scored by
`qcompiler.tools.evaluate.evaluate(..., model=NAME)` (which adds the float torch model) as a cross-check
(`via_qcompiler_evaluate` in the JSON; the two must agree). smollm2 rows also give the top-1
next-token agreement with the float artifact, minilm rows the mean cosine to its embeddings.

Calibration (never overlapping evaluation): smollm2-135m = 28 windows of 128 tokens spread evenly
over the tokens of the last quarter of the excerpt (it holds only 22 disjoint ones, so they overlap
by about a fifth), batches of 4; minilm-l6 =
the first 128 sentences of the excerpt (non-empty lines split after ' . ', since it has only 93
non-empty lines), tokenised with the model's `inputs_from_raw` in batches of 8.

`compile s`: wall time of `qcompiler.compile` from the float ONNX file (load, calibration,
passes, emit, session check) for ours; quantizer construction + process + save for ORT.

Output: one table per model on stdout, `benchmarks/results/mixed_pareto.json`, and
`benchmarks/results/mixed_pareto.png` (quality vs effective bits) when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import RESULTS, STS, THREADS, WIKITEXT, git_state, machine, ort_nbits_quantize, packages, sentences, table, wikitext_split  # noqa: E402

MODELS = ("smollm2-135m", "minilm-l6")
BUDGETS = (2.5, 3.0, 3.25, 3.5, 4.0, 4.25)
QUICK_BUDGETS = (2.5, 3.25, 4.0)
UNIFORM_BITS = (3, 4)
WINDOW = 256
CALIB_WINDOWS = 28
CALIB_WINDOW = 128
CALIB_SENTENCES = 128
MIXED_NO_OUTLIERS = "mixed{avg-bits=%g outliers-act=0 outliers-weight=0%s}"  # the preset, both kinds of outliers off
UNIFORM_PIPELINE = ("calibrate,allocate-bits{avg-bits=8 candidates=%d other-widths=expand outliers-act=0 outliers-weight=0},"
                    "quantize-weights{grid=minmax}")
TASK = {"smollm2-135m": "perplexity", "minilm-l6": "sts"}
METRIC = {"smollm2-135m": "perplexity", "minilm-l6": "spearman_x100"}
HIGHER_IS_BETTER = {"smollm2-135m": False, "minilm-l6": True}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch", "qcompiler", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------------------------
# Data (calibration never overlaps evaluation)


def calibration(name: str, sts_windows: int = 0) -> tuple[list[dict[str, np.ndarray]], str]:
    """The calibration batches of `name` and their description; for smollm2-135m, `sts_windows`
    more windows of text from the STS pairs' sentences (held out from the perplexity text too)."""
    from qcompiler import models

    if name == "smollm2-135m":
        from qcompiler.models import smollm2
        from qcompiler.tools.evaluate import read_sts

        _, tail = wikitext_split()
        ids = np.asarray(smollm2.encode(tail), dtype=np.int64)
        # the last quarter holds only len(ids) // 128 (22) disjoint windows: CALIB_WINDOWS windows
        # spread evenly over it (start i * stride), overlapping by about a fifth
        stride = (len(ids) - CALIB_WINDOW) / max(CALIB_WINDOWS - 1, 1)
        rows = np.stack([ids[round(i * stride): round(i * stride) + CALIB_WINDOW] for i in range(CALIB_WINDOWS)])
        desc = (f"{len(rows)} windows of {CALIB_WINDOW} tokens spread evenly over the last quarter of "
                f"{WIKITEXT.name} ({len(ids)} tokens; stride {stride:.1f}, so they overlap)")
        if sts_windows:
            first, second, _ = read_sts(STS)
            extra = np.asarray(smollm2.encode(" ".join(first + second)), dtype=np.int64)
            count = min(sts_windows, len(extra) // CALIB_WINDOW)
            rows = np.concatenate([rows, extra[: count * CALIB_WINDOW].reshape(count, CALIB_WINDOW)])
            desc += (f", then {count} disjoint windows of {CALIB_WINDOW} tokens of {STS.name}'s sentences "
                     f"(sent1 then sent2, joined by spaces)")
        batches = [{"input_ids": np.ascontiguousarray(rows[i:i + 4])} for i in range(0, len(rows), 4)]
        return batches, desc + ", batches of 4"
    bundled = models.get(name)
    lines = sentences(WIKITEXT.read_text(encoding="utf-8"))[:CALIB_SENTENCES]
    batches = [bundled.inputs_from_raw(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    return batches, (f"first {len(lines)} sentences of {WIKITEXT.name} (non-empty lines split after ' . '), "
                     f"tokenised by inputs_from_raw in batches of 8")


# --------------------------------------------------------------------------------------------
# Compile: ours


def compile_ours(source: Path, out: Path, pipeline: str, batches) -> dict[str, Any]:
    import qcompiler
    from qcompiler.errors import UserError

    report = out.parent / f"{out.name}.report.json"
    start = time.perf_counter()
    try:
        result = qcompiler.compile(str(source), out, pipeline=pipeline, calibration=batches, drift=False,
                                   threads=THREADS, report=report)
    except UserError as exc:
        return {"pipeline": pipeline, "error": str(exc), "compile_s": round(time.perf_counter() - start, 2)}
    wall = time.perf_counter() - start
    body = json.loads(report.read_text())
    manifest = result.manifest
    passes = {p.get("name", "?"): p for p in body.get("passes", [])}
    alloc = passes.get("allocate-bits", {}).get("stats", {}) or {}
    return {
        "pipeline": result.pipeline,
        "artifact": str(out),
        "compile_s": round(wall, 2),
        "timings": body.get("timings"),
        "pass_seconds": {name: round(p.get("seconds", p.get("time_s", 0.0)) or 0.0, 3) for name, p in passes.items()},
        "effective_bits": manifest["effective_bits_per_weight"],
        "weight_bytes": manifest["weight_bytes"],
        "weights": manifest["weights"],
        "predicted_bits_per_weight": alloc.get("predicted_bits_per_weight"),
        "bits_histogram": _histogram(alloc.get("per_layer", {})),
        "model_bytes": _files_size(out),
    }


def _histogram(per_layer: dict) -> dict[str, int]:
    """Channels per bit width over all layers (from allocate-bits' statistics)."""
    total: dict[str, int] = {}
    for layer in per_layer.values():
        for bits, count in (layer.get("bits_histogram") or {}).items():
            total[str(bits)] = total.get(str(bits), 0) + int(count)
    return dict(sorted(total.items(), key=lambda kv: int(kv[0])))


def _files_size(directory: Path) -> int:
    return int(sum(p.stat().st_size for p in Path(directory).glob("model.onnx*") if p.is_file()))


# --------------------------------------------------------------------------------------------
# Compile: ONNX Runtime's MatMulNBitsQuantizer


ORT_PEERS = {
    # label: (config class, is_symmetric)
    "ort 4-bit RTN asym": ("RTN", False),
    "ort 4-bit RTN sym": ("RTN", True),
    "ort 4-bit default (RTN asym)": ("DEFAULT", False),
    "ort 4-bit HQQ": ("HQQ", False),
}


def compile_ort(float_model: Path, out: Path, algorithm: str, symmetric: bool, weights: int) -> dict[str, Any]:
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    start = time.perf_counter()
    proto, config = ort_nbits_quantize(float_model, algorithm, symmetric)
    large = proto.ByteSize() > 1_800_000_000
    onnx.save(proto, str(path), save_as_external_data=large, location="model.onnx.data" if large else None)
    wall = time.perf_counter() - start
    counted = ort_weight_bytes(onnx.load(str(path)))
    return {
        "algorithm": (f"MatMulNBitsQuantizer(bits=4, block_size=128, is_symmetric={symmetric}, "
                      f"algo_config={config})"),
        "artifact": str(out),
        "compile_s": round(wall, 2),
        "effective_bits": round(8 * counted["total"] / weights, 4),
        "weight_bytes": counted["total"],
        "weights": weights,
        "byte_breakdown": counted,
        "model_bytes": _files_size(out),
    }


def ort_weight_bytes(proto) -> dict[str, Any]:
    """Bytes of MatMulNBits' B / scales / zero_points (and g_idx) initializers, and of MatMul/Gemm
    weights left in float."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}

    def nbytes(name: str) -> int:
        return int(numpy_helper.to_array(inits[name]).nbytes) if name in inits else 0

    out = {"B": 0, "scales": 0, "zero_points": 0, "g_idx": 0, "float_matmul_weights": 0,
           "matmulnbits_nodes": 0, "float_matmul_nodes": 0, "zero_point_dtype": None, "scale_dtype": None}
    seen = set()
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            out["matmulnbits_nodes"] += 1
            for key, index in (("B", 1), ("scales", 2), ("zero_points", 3), ("g_idx", 4)):
                if len(node.input) > index and node.input[index] and node.input[index] not in seen:
                    seen.add(node.input[index])
                    out[key] += nbytes(node.input[index])
                    if key in ("scales", "zero_points") and node.input[index] in inits:
                        out[f"{key[:-1] if key == 'scales' else 'zero_point'}_dtype"] = str(numpy_helper.to_array(inits[node.input[index]]).dtype)
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits and node.input[1] not in seen:
            seen.add(node.input[1])
            out["float_matmul_nodes"] += 1
            out["float_matmul_weights"] += nbytes(node.input[1])
    out["total"] = out["B"] + out["scales"] + out["zero_points"] + out["g_idx"] + out["float_matmul_weights"]
    return out


# --------------------------------------------------------------------------------------------
# Evaluation on an ONNX Runtime session (float artifact, ORT peers)


class Evaluator:
    """Scores a model.onnx on the model's task; holds the float artifact's outputs for comparison."""

    def __init__(self, name: str, eval_text: Path, windows: int):
        from qcompiler import models

        self.name, self.eval_text, self.windows = name, eval_text, windows
        self.bundled = models.get(name)
        self.float_outputs: list[np.ndarray] | None = None
        self.first_is_float = True  # the first model scored is the float reference of the agreement (False: none)

    def __call__(self, path: Path) -> dict[str, Any]:
        from qcompiler.analysis.execute import ort_session

        session = ort_session(str(path), THREADS)
        return self.score(lambda feeds: session.run(None, feeds)[0])

    def score(self, run) -> dict[str, Any]:
        """The task's score of `run` (feed dict -> first output as a numpy array), timed."""
        start = time.perf_counter()
        result = self._perplexity(run) if self.name == "smollm2-135m" else self._sts(run)
        result["eval_s"] = round(time.perf_counter() - start, 2)
        return result

    def _perplexity(self, run) -> dict[str, Any]:
        from qcompiler.models import smollm2
        from qcompiler.tools.evaluate import next_token_nll

        rows = smollm2.windows(self.eval_text.read_text(encoding="utf-8"), WINDOW)[: self.windows]
        nll, tokens, outputs = 0.0, 0, []
        agree = 0
        for i, row in enumerate(rows):
            logits = run({"input_ids": row[None]})[0]
            nll += next_token_nll(logits, row)
            tokens += len(row) - 1
            top = np.argmax(logits, axis=-1)
            outputs.append(top)
            if self.float_outputs is not None:
                agree += int(np.sum(top == self.float_outputs[i]))
        result = {"perplexity": round(float(np.exp(nll / tokens)), 4), "windows": int(len(rows)), "predicted_tokens": tokens}
        if self.float_outputs is None:
            if self.first_is_float:
                self.float_outputs = outputs
        else:
            result["top1_agreement_vs_float"] = round(agree / sum(len(o) for o in outputs), 5)
        return result

    def _sts(self, run) -> dict[str, Any]:
        from qcompiler.tools.evaluate import read_sts, spearman

        first, second, scores = read_sts(STS)
        sents = first + second
        order = np.argsort([len(s) for s in sents], kind="stable")
        chunks = [run(self.bundled.inputs_from_raw([sents[j] for j in order[i:i + 16]])) for i in range(0, len(sents), 16)]
        e = np.empty((len(sents), chunks[0].shape[1]), np.float64)
        e[order] = np.concatenate(chunks)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        n = len(scores)
        result = {"spearman_x100": round(100 * spearman(np.sum(e[:n] * e[n:], axis=1), scores), 3), "pairs": n}
        if self.float_outputs is None:
            self.float_outputs = [e]
        else:
            result["mean_cosine_vs_float"] = round(float(np.mean(np.sum(e * self.float_outputs[0], axis=1))), 6)
        return result


def evaluate_ours(name: str, artifact: Path, eval_text: Path, windows: int) -> dict[str, Any]:
    from qcompiler.tools.evaluate import evaluate

    start = time.perf_counter()
    if name == "smollm2-135m":
        r = evaluate(artifact, "perplexity", eval_text, count=windows, window=WINDOW, threads=THREADS, model=name)
        out = {"perplexity": r["perplexity_compiled"], "perplexity_float_torch": r["perplexity_float"],
               "windows": r["windows"], "predicted_tokens": r["predicted_tokens"]}
    else:
        r = evaluate(artifact, "sts", STS, threads=THREADS, model=name)
        out = {"spearman_x100": r["spearman_compiled"], "spearman_float_torch": r["spearman_float"], "pairs": r["pairs"],
               "mean_cosine_vs_float": r["mean_cosine_float_vs_compiled"]}
    out["eval_s"] = round(time.perf_counter() - start, 2)
    return out


# --------------------------------------------------------------------------------------------
# One model


def run_model(name: str, args, work: Path) -> dict[str, Any]:
    import qcompiler

    t_model = time.perf_counter()
    head, _ = wikitext_split()
    eval_text = work / "eval-head.txt"
    eval_text.write_text(head, encoding="utf-8")
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)

    log(f"{name}: capture + float compile")
    start = time.perf_counter()
    if args.float_from:  # the float artifact of an earlier run (capture is deterministic: the same bytes)
        float_dir = Path(args.float_from) / name
        manifest = json.loads((float_dir / "manifest.json").read_text())
    else:
        float_dir = mdir / "float"
        manifest = qcompiler.compile(name, float_dir, pipeline="default", drift=False, threads=THREADS).manifest
    float_s = time.perf_counter() - start
    float_path = float_dir / "model.onnx"
    weights = int(manifest["weights"])
    batches, calib_desc = calibration(name, args.lm_calib_sts)
    evaluator = Evaluator(name, eval_text, args.windows)

    rows: dict[str, dict[str, Any]] = {}
    log(f"{name}: evaluate float artifact")
    rows["float32"] = {"kind": "float", "effective_bits": manifest["effective_bits_per_weight"],
                       "weight_bytes": manifest["weight_bytes"], "weights": weights,
                       "compile_s": round(float_s, 2), "compile_note": "capture (torch.export) + default pipeline + emit"
                       + (f" (read from {args.float_from})" if args.float_from else ""),
                       **evaluator(float_path)}
    # the same artifact through qcompiler.tools.evaluate: checks that the two evaluation paths agree
    check = evaluate_ours(name, float_dir, eval_text, args.windows)
    rows["float32"]["via_qcompiler_evaluate"] = check

    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
    cross_checked = False
    for budget in budgets:
        label = f"ours mixed {budget:g}"
        pipeline = f"mixed{{avg-bits={budget:g}{' ' + args.mixed_options if args.mixed_options else ''}}}"
        _wait_for_peers(args)
        log(f"{name}: compile {label}")
        row = {"kind": "ours-mixed", "budget": budget, **compile_ours(float_path, mdir / f"mixed-{budget:g}", pipeline, batches)}
        if "error" in row:
            log(f"{name}: {label} refused: {row['error']}")
            rows[label] = row
            # the same budget with both kinds of outliers off (they cost about 0.3 bits per weight)
            label = f"ours mixed {budget:g} no-outliers"
            pipeline = MIXED_NO_OUTLIERS % (budget, " " + args.mixed_options if args.mixed_options else "")
            log(f"{name}: compile {label}")
            row = {"kind": "ours-mixed", "budget": budget, "variant": "no-outliers",
                   **compile_ours(float_path, mdir / f"mixed-{budget:g}-no", pipeline, batches)}
        if "error" not in row:
            log(f"{name}: evaluate {label} ({row['effective_bits']} bits, {row['compile_s']} s)")
            row.update(evaluator(Path(row["artifact"]) / "model.onnx"))
            if not cross_checked:  # the other evaluation path must give the same number
                row["via_qcompiler_evaluate"] = evaluate_ours(name, Path(row["artifact"]), eval_text, args.windows)
                cross_checked = True
        else:
            log(f"{name}: {label} refused: {row['error']}")
        rows[label] = row
        _drop(row, args)

    for bits in () if args.no_uniform else UNIFORM_BITS:
        label = f"ours uniform {bits}-bit RTN"
        _wait_for_peers(args)
        log(f"{name}: compile {label}")
        row = {"kind": "ours-uniform", "bits": bits, **compile_ours(float_path, mdir / f"uniform-{bits}", UNIFORM_PIPELINE % bits, batches)}
        if "error" not in row:
            log(f"{name}: evaluate {label} ({row['effective_bits']} bits, {row['compile_s']} s)")
            row.update(evaluator(Path(row["artifact"]) / "model.onnx"))
        rows[label] = row
        _drop(row, args)

    earlier = {}
    if args.peers_from:  # ONNX Runtime's rows from an earlier run on the same data (they do not depend on this code)
        earlier = json.loads(Path(args.peers_from).read_text())["models"].get(name, {}).get("rows", {})
    for label, (algorithm, symmetric) in ORT_PEERS.items():
        if label in earlier:
            rows[label] = {**earlier[label], "copied_from": args.peers_from_commit}
            continue
        _wait_for_peers(args)
        log(f"{name}: {label}")
        try:
            row = {"kind": "ort", **compile_ort(float_path, mdir / f"ort-{len(rows)}", algorithm, symmetric, weights)}
            row.update(evaluator(Path(row["artifact"]) / "model.onnx"))
        except Exception as exc:  # a peer failing is a result, not a crash of the benchmark
            log(f"{name}: {label} failed: {type(exc).__name__}: {exc}")
            row = {"kind": "ort", "algorithm": f"{algorithm} is_symmetric={symmetric}",
                   "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        rows[label] = row
        _drop(row, args)

    metric = METRIC[name]
    base = rows["float32"].get(metric)
    for row in rows.values():
        if row.get(metric) is not None and base:
            row["ratio_to_float"] = round(row[metric] / base, 5)
    result = {
        "task": TASK[name], "metric": metric, "higher_is_better": HIGHER_IS_BETTER[name],
        "weights": weights, "calibration": calib_desc,
        "evaluation": (f"first {args.windows} non-overlapping {WINDOW}-token windows of the first three quarters of {WIKITEXT.name}"
                       if name == "smollm2-135m" else f"all pairs of {STS.name}"),
        "rows": rows,
        "seconds": round(time.perf_counter() - t_model, 1),
    }
    result["checks"] = checks(name, rows)
    if not args.keep:
        shutil.rmtree(mdir, ignore_errors=True)
    return result


def _drop(row: dict, args) -> None:
    if not args.keep and row.get("artifact"):
        shutil.rmtree(row["artifact"], ignore_errors=True)


def _wait_for_peers(args) -> None:
    """Other benchmarks share this machine: before a heavy step, wait while they run (poll every
    20 s, at most `--wait-max` s per step and `--wait-total` s over the whole run), then go on."""
    if args.no_wait or WAIT_SPENT[0] >= args.wait_total:
        return
    import subprocess

    pattern = "w8a8_peers|lm_sweep|foundation.py"
    start = time.perf_counter()
    limit = min(args.wait_max, args.wait_total - WAIT_SPENT[0])
    announced = False
    try:
        while True:
            found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
            found = [p for p in found if int(p) != os.getpid()]
            if not found:
                return
            if time.perf_counter() - start >= limit:
                log(f"other jobs still running after {time.perf_counter() - start:.0f} s of waiting ({' '.join(found)}); going on")
                WAITED.append(f"{time.strftime('%H:%M:%S')}: went on while {' '.join(found)} ran")
                return
            if not announced:
                log(f"waiting for other jobs ({pattern}: {' '.join(found)})")
                announced = True
            time.sleep(20)
    finally:
        WAIT_SPENT[0] += time.perf_counter() - start


WAIT_SPENT = [0.0]
WAITED: list[str] = []


# --------------------------------------------------------------------------------------------
# Targets and checks


def best_labelled(pairs, metric: str, higher: bool):
    """(label, row) of the best quality among `pairs`, or (None, None)."""
    if not pairs:
        return None, None
    return (max if higher else min)(pairs, key=lambda lr: lr[1][metric])


def checks(name: str, rows: dict[str, dict]) -> dict[str, Any]:
    metric, higher = METRIC[name], HIGHER_IS_BETTER[name]
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    ours = sorted((r for r in rows.values() if r["kind"] == "ours-mixed" and r.get(metric) is not None
                   and r.get("variant") is None), key=lambda r: r["effective_bits"])
    out: dict[str, Any] = {}
    # monotone: more effective bits never worse
    violations = []
    for lo, hi in zip(ours, ours[1:]):
        if better(lo[metric], hi[metric]):
            violations.append(f"{lo['budget']:g} ({lo['effective_bits']} b: {lo[metric]}) better than "
                              f"{hi['budget']:g} ({hi['effective_bits']} b: {hi[metric]})")
    out["monotone"] = {"ok": not violations, "violations": violations}
    # effective bits against the budget
    out["budget_vs_effective"] = {f"{r['budget']:g}": round(r["effective_bits"] - r["budget"], 4) for r in ours}
    float_q = rows["float32"].get(metric)
    rtn_rows = [(label, r) for label, r in rows.items() if r["kind"] == "ort" and "RTN" in label and r.get(metric) is not None]
    rtn_label, rtn_row = best_labelled(rtn_rows, metric, higher)
    rtn = rtn_row.get(metric) if rtn_row else None
    uni3 = rows.get("ours uniform 3-bit RTN", {})
    le425 = [r for r in ours if r["effective_bits"] <= 4.25]
    le35 = [r for r in ours if r["effective_bits"] <= 3.5]
    best = lambda rs: (max if higher else min)(rs, key=lambda r: r[metric]) if rs else None  # noqa: E731
    b425, b35 = best(le425), best(le35)
    if name == "smollm2-135m":
        out["within_5pct_of_float_at_le_4.25"] = {
            "ok": bool(b425 and b425[metric] <= 1.05 * float_q),
            "best": b425 and {"budget": b425["budget"], "effective_bits": b425["effective_bits"], metric: b425[metric],
                              "ratio": round(b425[metric] / float_q, 4)}}
    out["better_than_ort_rtn4_at_le_4.25"] = {
        "ok": bool(b425 and rtn is not None and better(b425[metric], rtn)),
        "best": b425 and {"budget": b425["budget"], "effective_bits": b425["effective_bits"], metric: b425[metric]},
        "ort_rtn4": rtn, "ort_rtn4_row": rtn_label, "ort_rtn4_effective_bits": rtn_row.get("effective_bits") if rtn_row else None}
    out["better_than_uniform3_at_le_3.5"] = {
        "ok": bool(b35 and uni3.get(metric) is not None and better(b35[metric], uni3[metric])),
        "best": b35 and {"budget": b35["budget"], "effective_bits": b35["effective_bits"], metric: b35[metric]},
        "uniform3": uni3.get(metric), "uniform3_effective_bits": uni3.get("effective_bits")}
    # the closest-in-bits comparison: mixed vs uniform 3-bit at no more bits than uniform's
    if uni3.get("effective_bits") is not None:
        same = [r for r in ours if r["effective_bits"] <= uni3["effective_bits"] + 1e-9]
        b = best(same)
        out["better_than_uniform3_at_le_its_bits"] = {
            "ok": bool(b and better(b[metric], uni3[metric])),
            "best": b and {"budget": b["budget"], "effective_bits": b["effective_bits"], metric: b[metric]}}
    return out


# --------------------------------------------------------------------------------------------
# Output


def model_table(name: str, result: dict) -> str:
    metric = result["metric"]
    rows = []
    for label, r in result["rows"].items():
        if "error" in r:
            rows.append([label, "-", "refused" if r["kind"].startswith("ours") else "failed", "-", r.get("compile_s", "-")])
            continue
        q = r.get(metric)
        rows.append([label, f"{r['effective_bits']:.3f}", f"{q:.3f}" if q is not None else "-",
                     f"{r['ratio_to_float']:.4f}" if r.get("ratio_to_float") is not None else "-",
                     f"{r['compile_s']:.1f}"])
    head = f"{name}: {metric} vs effective bits per weight ({result['evaluation']}; {result['weights']} MatMul weights)"
    return head + "\n" + table(["variant", "eff. bits", metric, "ratio to float", "compile s"], rows)


def checks_text(name: str, result: dict) -> str:
    c = result["checks"]
    lines = [f"{name} checks:"]
    for key, value in c.items():
        if isinstance(value, dict) and "ok" in value:
            detail = {k: v for k, v in value.items() if k != "ok"}
            lines.append(f"  {'PASS' if value['ok'] else 'FAIL'} {key}: {json.dumps(detail)}")
        else:
            lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> str | None:
    plt, missing = common.pyplot()
    if missing:
        return missing
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    markers = {"ours uniform 3-bit RTN": ("s", "tab:orange"), "ours uniform 4-bit RTN": ("D", "tab:orange"),
               "ort 4-bit RTN asym": ("^", "tab:red"), "ort 4-bit RTN sym": ("<", "tab:red"),
               "ort 4-bit default (RTN asym)": (">", "tab:brown"), "ort 4-bit HQQ": ("v", "tab:purple")}
    for ax, (name, result) in zip(axes[0], results.items()):
        metric, rows = result["metric"], result["rows"]
        ours = sorted((r for r in rows.values() if r["kind"] == "ours-mixed" and r.get(metric) is not None
                       and r.get("variant") is None), key=lambda r: r["effective_bits"])
        ax.plot([r["effective_bits"] for r in ours], [r[metric] for r in ours], "o-", color="tab:blue", label="ours mixed{avg-bits=B}")
        extra = [r for r in rows.values() if r.get("variant") == "no-outliers" and r.get(metric) is not None]
        if extra:
            ax.plot([r["effective_bits"] for r in extra], [r[metric] for r in extra], "o", color="tab:cyan",
                    markerfacecolor="none", linestyle="none", label="ours mixed B, outliers off")
        for r in ours + extra:
            ax.annotate(f"{r['budget']:g}", (r["effective_bits"], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for label, (marker, color) in markers.items():
            r = rows.get(label, {})
            if r.get(metric) is not None:
                ax.plot([r["effective_bits"]], [r[metric]], marker, color=color, markersize=8, linestyle="none", label=label)
        f = rows["float32"].get(metric)
        if f is not None:
            ax.axhline(f, color="gray", linestyle="--", linewidth=1, label=f"float32 ({f:.3f})")
            if not result["higher_is_better"]:
                ax.axhline(1.05 * f, color="gray", linestyle=":", linewidth=1, label="float32 + 5 %")
        if not result["higher_is_better"]:
            ax.set_yscale("log")  # perplexity spans orders of magnitude at 3 bits
        ax.set_xlabel("effective bits per weight (emitted bytes)")
        ax.set_ylabel(metric + (" (lower is better)" if not result["higher_is_better"] else " (higher is better)"))
        ax.set_title(f"{name}: {result['task']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--windows", type=int, default=8, help="smollm2 perplexity windows of 256 tokens (default 8)")
    parser.add_argument("--quick", action="store_true", help="budgets 2.5, 3.25, 4.0 only")
    parser.add_argument("--budgets", default="", help="comma-separated budgets instead of the default list")
    parser.add_argument("--peers-from", default="", help="copy ONNX Runtime's rows from this earlier JSON instead of recomputing them")
    parser.add_argument("--mixed-options", default="", help="more options of the mixed preset for the curve, e.g. 'scope=model sensitivity=output'")
    parser.add_argument("--lm-calib-sts", type=int, default=0,
                        help="smollm2: this many more calibration windows of 128 tokens from the STS pairs' sentences (default 0)")
    parser.add_argument("--float-from", default="", help="read each model's float artifact from DIR/NAME (an earlier run's --work) instead of capturing it again")
    parser.add_argument("--no-uniform", action="store_true", help="leave out the uniform RTN rows (only the mixed curve and the peers)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the compiled artifacts in --work")
    parser.add_argument("--output", default=str(RESULTS / "mixed_pareto.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --output")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmark jobs before each step")
    parser.add_argument("--wait-max", type=float, default=900.0, help="longest wait for other jobs before one step, seconds")
    parser.add_argument("--wait-total", type=float, default=1800.0, help="longest total wait for other jobs, seconds")
    args = parser.parse_args(argv)
    args.peers_from_commit = None
    if args.peers_from:
        earlier = json.loads(Path(args.peers_from).read_text())
        args.peers_from_commit = f"{args.peers_from} (run at commit {earlier.get('git_at_start', {}).get('commit')})"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    if args.replot:
        output = Path(args.output)
        note = plot(json.loads(output.read_text())["models"], output.with_suffix(".png"))
        print(note or f"wrote {output.with_suffix('.png')}")
        return 0
    quiet()
    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    git_start = git_state()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mixed_pareto-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    try:
        for name in names:
            _wait_for_peers(args)
            results[name] = run_model(name, args, work)
            print(model_table(name, results[name]), flush=True)
            print(checks_text(name, results[name]) + "\n", flush=True)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    output = Path(args.output)
    png = output.with_suffix(".png")
    note = plot(results, png) if results else "no results"
    total = round(time.perf_counter() - started, 1)
    body = {
        "benchmark": "mixed_pareto",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "packages": packages(),
        "threads": THREADS,
        "git_at_start": git_start,
        "git_at_end": git_state(),
        "options": {"models": names, "windows": args.windows, "quick": args.quick, "mixed_options": args.mixed_options,
                    "lm_calib_sts": args.lm_calib_sts, "no_uniform": args.no_uniform, "float_from": args.float_from,
                    "budgets": [float(b) for b in args.budgets.split(",")] if args.budgets else list(QUICK_BUDGETS if args.quick else BUDGETS),
                    "peers_from": args.peers_from_commit},
        "waited_for_other_jobs_s": round(WAIT_SPENT[0], 1),
        "went_on_while_other_jobs_ran": WAITED,
        "png": None if note else str(png),
        "png_note": note,
        "total_seconds": total,
        "models": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(output)
    print(f"wrote {output}" + (f" and {png}" if not note else f" ({note})"))
    print(f"total {total} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
