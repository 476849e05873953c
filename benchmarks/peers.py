"""Our presets and the peer quantizers side by side, on the same models, data and scoring code.

    python benchmarks/peers.py --threads 2            # everything (see docs/results.md for the time)
    python benchmarks/peers.py --quick                # 2 windows, budgets 3.25 and 4.25, one row per peer family
    python benchmarks/peers.py --only ours,nncf       # some families: ours ort nncf hqq autoround llmcompressor llamacpp
    python benchmarks/peers.py --rows 'hqq 4-bit g128;ort GPTQ g32' --output NEW.json   # some rows, by label
    python benchmarks/peers.py --merge benchmarks/results/peers.json NEW.json         # add them to the result
    python benchmarks/peers.py --replot               # redraw the PNG from the JSON

Installing the peers, in an environment of their own so the project's stays as it is:

    cp -al .venv .venv-peers            # a hard-linked copy (pip replaces files, never edits them)
    .venv-peers/bin/python -m pip install -c <(echo torch==2.13.0) '.[peers]'   # nncf hqq auto-round matplotlib llama-cpp-python
    .venv-peers/bin/python -m pip install --no-deps llmcompressor compressed-tensors loguru nvidia-ml-py
    .venv-peers/bin/python benchmarks/peers.py --threads 2

llama-cpp-python compiles llama.cpp from source (about 30 min on 2 cores). llmcompressor is
installed without its dependencies because it pins an older transformers than the project's.
A peer that is not installed or fails is a row that says why (`error`), never a crash.
On a busy machine the families can run side by side and be merged (the JSON is rewritten after
every row, `complete: false` until the end):

    python benchmarks/peers.py --only ours --work DIR --output A.json &
    python benchmarks/peers.py --only nncf,ort --work DIR --output B.json &
    python benchmarks/peers.py --merge A.json B.json --work DIR      # -> peers.json and peers.png

Settings forced by SmolLM2's 576-wide rows: NNCF's g128 rows use `group_size_fallback=ADJUST`
(groups of 64 where 128 does not divide the row), llm-compressor runs groups of 64 and 32 (it
refuses 128), llama.cpp falls back to Q4_0/Q5_0/Q8_0 for rows that are no multiple of 256.

Models: each is captured once (`qcompiler.compile(NAME, DIR, pipeline="default")`, the float ONNX
Runtime model, row `float32`); every ONNX row is made from that file. The torch rows (hqq,
AutoRound, llm-compressor) start from the same float32 weights, loaded into transformers'
`LlamaForCausalLM` with the LM head untied from the embedding (so that quantizing the head leaves
the embedding as it is). llama.cpp requantizes the bundled Q4_1 GGUF the float weights come from
(`--allow-requantize`); its embedding and head start from that file's Q8_0 table.

Data (calibration never overlaps evaluation). The WikiText excerpt is cut at the line boundary at
3/4 of its characters (`common.wikitext_split`).
- SmolLM2-135M: evaluation = perplexity over the first N (`--windows`, 8; `--quick` 2)
  non-overlapping 256-token windows of the first three quarters; calibration = 28 windows of 128
  tokens spread over the last quarter (`mixed_pareto.calibration`), the same token rows for every
  data-aware tool (ours, ORT GPTQ, NNCF, AutoRound, llm-compressor).
- MiniLM-L6: evaluation = STS Spearman x100 over all 432 pairs of sts-pairs-dev.tsv; calibration =
  the first 128 sentences of the excerpt, batches of 8 (the same feeds for ours, NNCF and ORT).
Every row is scored by `mixed_pareto.Evaluator.score`, which uses `qcompiler.tools.evaluate`'s
`next_token_nll`, `read_sts` and `spearman`: on an ONNX Runtime session for ONNX rows, on the
torch model for the torch rows, on llama.cpp's own logits (`Llama.eval`, same token ids, no BOS)
for llama.cpp rows. SmolLM2 rows also give the top-1 next-token agreement with the float32 row.

Effective bits per weight, one way for every row: stored bytes of the linear layers' weights,
LM head included (codes + scales + zero points + any index or float part), * 8 / the float
model's linear weight count (134,479,872 for SmolLM2: 30 layers + the 576 x 49152 head).
- ONNX rows: `common.linear_weight_bytes` over the saved graph (every constant that feeds a
  MatMul / Gemm weight or a MatMulNBits' B, scales, zero points, through DequantizeLinear, Reshape,
  Transpose...; 4-bit types packed two per byte). Our manifest's own count is kept beside it.
- llama.cpp: the GGUF's tensor bytes of every `blk.*` matrix plus `token_embd` (SmolLM2 ties the
  head to the embedding and llama.cpp stores one table for both).
- torch rows: the bytes of the format each tool packs to, from its configuration: b-bit codes,
  an fp16 scale per group, a zero point per group (fp16 for hqq, b bits for AutoRound's and
  llm-compressor's packed formats; none when symmetric).
The `head` and `embedding` columns say what the LM head and the embedding are stored as.

Compile time: wall seconds from the float model to the quantized one (ours: `qcompiler.compile`
from the float ONNX file; ORT / NNCF: quantizer + save; torch tools: their quantize call; llama.cpp:
`llama_model_quantize`). The capture of the float model is not included (all rows share it).
AutoRound runs its fastest documented recipe that still tunes ("light": 50 iterations, learning
rate 5e-3, batch 8; `--autoround-iters`, `--autoround-lr`; quick 5 iterations) on the 28 calibration
rows of 128 tokens (its recipes' 128 x 2048 tokens would not fit the row limit on 2 cores).
Every peer row runs within `--row-limit` wall seconds (1800); one that runs past it is a row marked
`not_finished` with the reason. Each row records the date, commit and command it was measured with
(`measured`); `--merge` keeps them, so rows measured by different runs can sit in one JSON.
MiniLM W8A8 rows also get latency: batch 8 x 128 tokens, rounds of every variant in turn
(`common.interleaved_latency`), ONNX Runtime with `--threads` intra-op threads; only the rows that
were made are timed.

Output: the tables on stdout, `benchmarks/results/peers.json` and `benchmarks/results/peers.png`
(`--quick` writes `peers_quick.json` / `.png`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import mixed_pareto  # noqa: E402
import w8a8_peers  # noqa: E402

LM, ENCODER = "smollm2-135m", "minilm-l6"
BUDGETS = (3.0, 3.25, 3.5, 4.0, 4.25)
QUICK_BUDGETS = (3.25, 4.25)
FAMILIES = ("ours", "ort", "nncf", "hqq", "autoround", "llmcompressor", "llamacpp")
LLAMA_TYPES = ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS", "IQ4_NL")
QUICK_LLAMA_TYPES = ("Q3_K_M", "Q4_K_M")
LLAMA_NEEDS_IMATRIX = ("IQ3_XXS", "IQ3_S", "IQ2_XS")
AUTOROUND_BATCH = 8  # its "light" recipe's batch (iters 50, lr 5e-3); our 28 calibration rows of 128 tokens

log = mixed_pareto.log


# --------------------------------------------------------------------------------------------
# Rows


class RowTimeLimit(Exception):
    """A row ran past its wall-clock limit (`--row-limit`)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise `RowTimeLimit` in the main thread once `seconds` of wall time have passed (SIGALRM:
    it lands at the next Python bytecode, so a single long native call finishes first)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise RowTimeLimit(f"ran past its wall-clock limit of {seconds:g} s (--row-limit), {where(frame)}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def where(frame) -> str:
    """Where a row was when its limit struck: the innermost benchmark function and the innermost
    frame (e.g. `in Evaluator._perplexity, inside torch/nn/functional.py`)."""
    here = Path(__file__).resolve().parent
    inner = frame
    while frame is not None and Path(frame.f_code.co_filename).resolve().parent != here:
        frame = frame.f_back
    ours = f"in {frame.f_code.co_qualname}" if frame is not None else "outside the benchmark's code"
    tail = "/".join(Path(inner.f_code.co_filename).parts[-3:]) if inner is not None else "?"
    return f"{ours}, inside {tail}"


def measured(commit: str) -> dict[str, str]:
    """When, on which commit and by which command a row was measured (kept through --merge)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "command": common.command_line()}


def selected(args, label: str) -> bool:
    """Whether a row is in this run: its label contains `--match` and is one of `--rows` (if given)."""
    rows = [r.strip() for r in (args.rows or "").split(";") if r.strip()]
    return (not args.match or args.match in label) and (not rows or label in rows)


def row_limit(args, family: str) -> float | None:
    """The wall-clock limit of a row: `--row-limit` for the peers, none for our own presets."""
    return None if family == "ours" or not args.row_limit else args.row_limit


def attempt(label: str, family: str, make: Callable[[], dict[str, Any]], limit: float | None = None,
            commit: str = "") -> dict[str, Any]:
    """Run one row within `limit` wall seconds; a peer that is missing, fails or runs past the
    limit gives a row with a one-line `error` (`not_finished` too for the limit)."""
    log(f"{label}")
    start = time.perf_counter()
    try:
        with time_limit(limit):
            row = make()
    except RowTimeLimit as exc:
        row = {"error": f"not finished: {exc}", "not_finished": True}
    except ImportError as exc:
        row = {"error": f"not installed ({exc}); see the install lines at the top of benchmarks/peers.py"}
    except Exception as exc:  # a peer failing is a result, not a crash of the benchmark
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row = {"error": f"{type(exc).__name__}: {first}"[:300], "traceback": traceback.format_exc()[-3000:]}
    row.setdefault("seconds", round(time.perf_counter() - start, 1))
    row["measured"] = measured(commit)
    if "error" in row:
        log(f"{label}: {row['error']}")
    return {"family": family, **row}


def onnx_bits(path: Path, weights: int) -> dict[str, Any]:
    """Effective bits of a saved ONNX model by `common.linear_weight_bytes`."""
    import onnx

    counted = common.linear_weight_bytes(onnx.load(str(path), load_external_data=False))
    return {"effective_bits": round(8 * counted["total"] / weights, 4), "weight_bytes": counted["total"],
            "head_bits": None, "byte_count": counted}


def save_onnx(proto, path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    large = proto.ByteSize() > 1_800_000_000
    onnx.save(proto, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
    return path


def artifact_of(work: Path, model: str, label: str, row: dict) -> Path | None:
    """The saved ONNX file of an ONNX row under a --work folder (the names lm_plan gives them)."""
    folder = work / model
    candidates = [Path(row["artifact"])] if row.get("artifact") else []
    if label == "float32":
        candidates.append(folder / "float" / "model.onnx")
    if label.startswith("ours mixed "):
        budget, _, options = label[len("ours mixed "):].partition(" ")
        candidates.append(folder / ours_mixed(float(budget), options)[1] / "model.onnx")
    candidates += [folder / label.replace(" ", "-") / "model.onnx", folder / label.replace(" ", "-").replace("+", "") / "model.onnx"]
    return next((c for c in candidates if c.is_file()), None)


def recount(body: dict, work: Path) -> int:
    """Effective bits of every ONNX row whose file is still in `work`, counted again by the
    current `common.linear_weight_bytes`; returns how many rows were recounted."""
    done = 0
    for model, result in body["models"].items():
        head_weights = 576 * 49152 if model == LM else 0
        for label, row in result["rows"].items():
            if "error" in row or row.get("family") not in ("float", "ours", "ort", "nncf"):
                continue
            path = artifact_of(work, model, label, row)
            if path is None:
                continue
            weights = result.get("weights") or result["rows"]["float32"]["weight_bytes"] // 4  # float32: 4 bytes a weight
            bits = onnx_bits(path, weights)
            row.update(bits, artifact=str(path))
            if head_weights and row.get("family") != "float":
                row["head"] = head_format(bits["byte_count"], head_weights)
            done += 1
    return done


def head_format(counted: dict[str, Any], head_weights: int) -> str:
    """The LM head's storage in bits per weight, from the byte count."""
    if not counted.get("head") or not head_weights:
        return "-"
    return f"{8 * counted['head'] / head_weights:.2f} b/w"


# --------------------------------------------------------------------------------------------
# ONNX tools: ours, ONNX Runtime, NNCF


def ours_mixed(budget: float, options: str = "") -> tuple[str, str, str]:
    """(row label, folder name, pipeline) of our `mixed` preset at `budget`, with `options` (preset
    options such as "rounding=gptq", --ours-options) added when given."""
    label = f"ours mixed {budget:g}" + (f" {options}" if options else "")
    folder = f"mixed-{budget:g}" + (f"-{re.sub(r'[^A-Za-z0-9.]+', '-', options).strip('-')}" if options else "")
    return label, folder, f"mixed{{avg-bits={budget:g}{' ' + options if options else ''}}}"


def ours_row(source: Path, out: Path, pipeline: str, batches, ctx: dict, recipe: str = "") -> dict[str, Any]:
    row = mixed_pareto.compile_ours(source, out, pipeline, batches)
    if "error" in row:
        return {"error": row["error"], "compile_s": row["compile_s"]}
    path = out / "model.onnx"
    bits = onnx_bits(path, ctx["weights"])
    return {"tool": "qcompiler", "config": pipeline, **({"recipe": recipe} if recipe else {}), "compile_s": row["compile_s"], **bits,
            "manifest_effective_bits": row["effective_bits"], "head": head_format(bits["byte_count"], ctx["head_weights"]),
            "artifact": str(path),
            "embedding": ctx["embedding_note"], **ctx["score_onnx"](path)}


def ort_nbits_row(algorithm: str, block: int, ctx: dict, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    proto, config = common.ort_nbits_quantize(ctx["float_path"], algorithm, symmetric=False, block_size=block,
                                              calibration=ctx["batches"] if algorithm == "GPTQ" else None)
    path = save_onnx(proto, out / "model.onnx")
    wall = time.perf_counter() - start
    bits = onnx_bits(path, ctx["weights"])
    return {"tool": "onnxruntime", "config": f"MatMulNBitsQuantizer(bits=4, block_size={block}, algo_config={config})",
            "compile_s": round(wall, 2), **bits, "head": head_format(bits["byte_count"], ctx["head_weights"]),
            "embedding": ctx["embedding_note"], "artifact": str(path), **ctx["score_onnx"](path)}


def nncf_compress_row(options: dict[str, Any], data_aware: bool, ctx: dict, out: Path) -> dict[str, Any]:
    import nncf
    import onnx

    model = onnx.load(str(ctx["float_path"]))
    kwargs = dict(options)
    kwargs["mode"] = getattr(nncf.CompressWeightsMode, kwargs["mode"])
    if "sensitivity_metric" in kwargs:
        kwargs["sensitivity_metric"] = getattr(nncf.SensitivityMetric, kwargs["sensitivity_metric"])
    if "group_size_fallback" in kwargs:  # 576 is no multiple of 128: such layers get the largest power of two dividing it
        mode = getattr(nncf.GroupSizeFallbackMode, kwargs.pop("group_size_fallback"))
        kwargs["advanced_parameters"] = nncf.AdvancedCompressionParameters(group_size_fallback_mode=mode)
    if data_aware:
        rows = ctx["calibration_rows"]
        kwargs["dataset"] = nncf.Dataset([{"input_ids": r[None]} for r in rows])
        kwargs["subset_size"] = len(rows)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        compressed = nncf.compress_weights(model, **kwargs)
    path = save_onnx(compressed, out / "model.onnx")
    wall = time.perf_counter() - start
    bits = onnx_bits(path, ctx["weights"])
    return {"tool": "nncf", "config": "compress_weights(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")",
            "compile_s": round(wall, 2), **bits, "head": head_format(bits["byte_count"], ctx["head_weights"]),
            "embedding": _onnx_embedding(bits["byte_count"], ctx), "artifact": str(path), **ctx["score_onnx"](path)}


def _onnx_embedding(counted: dict, ctx: dict) -> str:
    if counted.get("embedding_tied_to_a_linear"):
        return "shares the head's constants"
    if counted.get("embedding") and ctx.get("embedding_weights"):
        return f"{8 * counted['embedding'] / ctx['embedding_weights']:.2f} b/w"
    return ctx["embedding_note"]


NNCF_ROWS = {
    # label: (options, data_aware, in quick)
    "nncf INT4_ASYM g128 data-free": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0}, False, True),
    "nncf INT4_ASYM g32 data-free": ({"mode": "INT4_ASYM", "group_size": 32, "ratio": 1.0}, False, False),
    "nncf INT4_ASYM g128 data-free all layers": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0, "all_layers": True}, False, False),
    "nncf INT4_ASYM g128 AWQ+SE all layers": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0, "all_layers": True,
                                               "awq": True, "scale_estimation": True}, True, True),
    "nncf INT4_ASYM g128 AWQ+SE, head int8": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0,
                                               "awq": True, "scale_estimation": True}, True, False),
    "nncf INT4_ASYM g32 AWQ+SE all layers": ({"mode": "INT4_ASYM", "group_size": 32, "ratio": 1.0, "all_layers": True,
                                              "awq": True, "scale_estimation": True}, True, False),
    # the head in 4 bits (all_layers) gives a blocked DequantizeLinear ONNX Runtime 1.32 rejects: the
    # single-method rows keep NNCF's default int8 head so that they measure something
    "nncf INT4_ASYM g128 AWQ, head int8": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0,
                                           "awq": True}, True, False),
    "nncf INT4_ASYM g128 SE, head int8": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0,
                                          "scale_estimation": True}, True, False),
    "nncf INT4_ASYM g128 ratio 0.8 hessian, AWQ+SE, head int8": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 0.8,
                                                       "sensitivity_metric": "HESSIAN_INPUT_ACTIVATION", "awq": True,
                                                       "scale_estimation": True}, True, False),
    "nncf INT4_ASYM g128 GPTQ": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0, "all_layers": True, "gptq": True}, True, False),
    "nncf INT4_ASYM g128 LoRA correction": ({"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0, "all_layers": True,
                                             "lora_correction": True}, True, False),
}

ORT_ROWS = {
    # label: (algorithm, block size, in quick)
    "ort RTN asym g32": ("default", 32, True),
    "ort RTN asym g128": ("default", 128, False),
    "ort HQQ g128": ("HQQ", 128, False),
    "ort HQQ g64": ("HQQ", 64, False),
    "ort GPTQ g32": ("GPTQ", 32, True),
    "ort GPTQ g128": ("GPTQ", 128, False),
}


# --------------------------------------------------------------------------------------------
# torch tools: hqq, AutoRound, llm-compressor (scored in torch on the same windows)


def hf_smollm2():
    """transformers' LlamaForCausalLM holding the float32 weights the ONNX rows start from; the LM
    head is a copy of the embedding (untied), so quantizing it leaves the embedding as it is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.models import smollm2

    cfg, state = smollm2.read_gguf(smollm2.gguf_path())
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.eps, max_position_embeddings=cfg.max_positions,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
                         bos_token_id=smollm2.tokenizer().bos_token_id, eos_token_id=smollm2.tokenizer().eos_token_id)
    model = LlamaForCausalLM(config)
    state = dict(state)
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


def torch_runner(model):
    import torch

    def run(feeds):
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(feeds["input_ids"])).logits.float().numpy()
    return run


def packed_bits(bits: int, group: int, zero_bits: float, linears: list[tuple[int, int]], weights: int) -> float:
    """Bits per weight of b-bit codes + an fp16 scale and a `zero_bits` zero point per group of
    `group` input rows, over the linears' (rows, columns) shapes."""
    total = 0.0
    for k, n in linears:
        groups = -(-k // group) * n
        total += k * n * bits + groups * (16 + zero_bits)
    return round(total / weights, 4)


def linear_shapes(model) -> list[tuple[int, int]]:
    from torch import nn

    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def hqq_row(bits: int, group: int, ctx: dict) -> dict[str, Any]:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from torch import nn

    model = hf_smollm2()
    shapes = linear_shapes(model)
    config = BaseQuantizeConfig(nbits=bits, group_size=group, quant_zero=False, quant_scale=False, axis=1)
    start = time.perf_counter()
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, HQQLinear(child, quant_config=config, compute_dtype=torch.float32, device="cpu",
                                                del_orig=True))
    wall = time.perf_counter() - start
    return {"tool": "hqq", "config": f"HQQLinear(nbits={bits}, group_size={group}, axis=1), every Linear incl. the head",
            "compile_s": round(wall, 2), "effective_bits": packed_bits(bits, group, 16, shapes, ctx["weights"]),
            "bits_note": "codes + fp16 scale + fp16 zero per group", "head": f"{bits}-bit g{group}",
            "embedding": "fp32 (not quantized)", **ctx["score_torch"](model)}


def autoround_row(bits: int, group: int, iters: int, lr: float | None, ctx: dict) -> dict[str, Any]:
    from auto_round import AutoRound

    from qcompiler.models import smollm2

    model = hf_smollm2()
    shapes = linear_shapes(model)
    texts = [smollm2.tokenizer().decode(r) for r in ctx["calibration_rows"]]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rounder = AutoRound(model, smollm2.tokenizer(), bits=bits, group_size=group, sym=False, dataset=texts,
                            iters=iters, lr=lr, nsamples=len(texts), seqlen=len(ctx["calibration_rows"][0]), batch_size=AUTOROUND_BATCH,
                            device_map="cpu", quant_lm_head=True, enable_torch_compile=False)
        quantized, _ = rounder.quantize()
    wall = time.perf_counter() - start
    return {"tool": "auto-round", "config": (f"AutoRound(bits={bits}, group_size={group}, sym=False, iters={iters}, lr={lr}, "
                                             f"batch_size={AUTOROUND_BATCH}, "
                                             f"nsamples={len(texts)}, seqlen={len(ctx['calibration_rows'][0])}, quant_lm_head=True)"),
            "compile_s": round(wall, 2), "effective_bits": packed_bits(bits, group, bits, shapes, ctx["weights"]),
            "bits_note": f"codes + fp16 scale + {bits}-bit zero per group (its packed export)",
            "head": f"{bits}-bit g{group}", "embedding": "fp32 (not quantized)", **ctx["score_torch"](quantized)}


def llmcompressor_row(group: int, ctx: dict) -> dict[str, Any]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from qcompiler.models import smollm2

    model = hf_smollm2()
    shapes = linear_shapes(model)
    rows = ctx["calibration_rows"]
    # oneshot re-reads the model's config from its name or path: give it a folder that holds it
    config_dir = Path(tempfile.mkdtemp(prefix="peers-llama-config-"))
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = str(config_dir)
    data = Dataset.from_dict({"input_ids": [r.tolist() for r in rows], "attention_mask": [[1] * len(r) for r in rows]})
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                 "strategy": "group", "group_size": group}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=[], block_size=128, dampening_frac=0.01)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        oneshot(model=model, processor=smollm2.tokenizer(), dataset=data, recipe=recipe, max_seq_length=len(rows[0]),
                num_calibration_samples=len(rows))
    wall = time.perf_counter() - start
    shutil.rmtree(config_dir, ignore_errors=True)
    return {"tool": "llm-compressor", "config": f"oneshot(GPTQModifier(W4 asym group {group}, ignore=[]))",
            "compile_s": round(wall, 2), "effective_bits": packed_bits(4, group, 4, shapes, ctx["weights"]),
            "bits_note": "codes + fp16 scale + 4-bit zero per group (pack-quantized)",
            "head": f"4-bit g{group}", "embedding": "fp32 (not quantized)", **ctx["score_torch"](model)}


# --------------------------------------------------------------------------------------------
# llama.cpp: requantize the bundled GGUF, score with llama.cpp's own logits


def llamacpp_row(qtype: str, ctx: dict, out: Path) -> dict[str, Any]:
    import gguf
    import llama_cpp

    from qcompiler.models import smollm2

    if qtype in LLAMA_NEEDS_IMATRIX:
        raise RuntimeError(f"{qtype} needs an importance matrix (llama-imatrix), which llama-cpp-python does not compute")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"smollm2-{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    params.nthread = ctx["threads"]
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(smollm2.gguf_path()).encode(), str(target).encode(), ctypes.byref(params))
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"llama_model_quantize returned {code}")
    reader = gguf.GGUFReader(str(target))
    linear = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    embd = [t for t in reader.tensors if t.name == "token_embd.weight"][0]
    head = [t for t in reader.tensors if t.name == "output.weight"]
    head_bytes = int(head[0].n_bytes) if head else int(embd.n_bytes)
    head_type = (head[0] if head else embd).tensor_type.name
    types = sorted({t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2})
    llm = llama_cpp.Llama(model_path=str(target), n_ctx=mixed_pareto.WINDOW, n_batch=mixed_pareto.WINDOW,
                          n_threads=ctx["threads"], logits_all=True, verbose=False)

    def run(feeds):
        ids = [int(t) for t in feeds["input_ids"][0]]
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)], dtype=np.float32)[None]

    score = ctx["score"](run)
    del llm
    return {"tool": "llama.cpp", "config": f"llama_model_quantize(ftype={qtype}, allow_requantize) from the Q4_1 GGUF",
            "compile_s": round(wall, 2), "effective_bits": round(8 * (linear + head_bytes) / ctx["weights"], 4),
            "weight_bytes": linear + head_bytes, "bits_note": f"blk.* matrices ({', '.join(types)}) + head", "head": f"{head_type} (tied)",
            "embedding": f"{head_type}, same table as the head" if not head else embd.tensor_type.name, **score}


# --------------------------------------------------------------------------------------------
# One model


def float_model(name: str, args, work: Path) -> tuple[Path, int, float | None]:
    """(folder, linear weight count, capture seconds) of the float ONNX model of `name`: compiled
    with the `default` pipeline into WORK/NAME/float, or reused from there when a `--work` folder
    already holds it (capture seconds None then)."""
    import qcompiler

    float_dir = work / name / "float"
    manifest = float_dir / "manifest.json"
    if manifest.is_file() and (float_dir / "model.onnx").is_file():
        log(f"{name}: reusing the float model in {float_dir}")
        return float_dir, int(json.loads(manifest.read_text())["weights"]), None
    log(f"{name}: capture + float compile")
    start = time.perf_counter()
    result = qcompiler.compile(name, float_dir, pipeline="default", drift=False, threads=args.threads)
    return float_dir, int(result.manifest["weights"]), round(time.perf_counter() - start, 2)


def lm_plan(args, ctx: dict, work: Path) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(label, family, make) of every SmolLM2 row, in the order they run: ours first, then the
    peers from the fastest to the slowest, so that an interrupted run still holds the main rows."""
    quick, families = args.quick, args.families
    plan: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    if "ours" in families:
        for budget in (QUICK_BUDGETS if quick else BUDGETS):
            label, folder, pipeline = ours_mixed(budget, args.ours_options)
            plan.append((label, "ours", lambda f=folder, p=pipeline: ours_row(
                ctx["float_path"], work / f, p, ctx["batches"], ctx, args.ours_options)))
    if "llamacpp" in families:
        for qtype in (QUICK_LLAMA_TYPES if quick else LLAMA_TYPES + LLAMA_NEEDS_IMATRIX[:1]):
            plan.append((f"llama.cpp {qtype}", "llamacpp", lambda q=qtype: llamacpp_row(q, ctx, work / "gguf")))
    if "nncf" in families:
        for label, (options, data_aware, in_quick) in NNCF_ROWS.items():
            if in_quick or not quick:
                plan.append((label, "nncf", lambda o=options, d=data_aware, lb=label: nncf_compress_row(
                    o, d, ctx, work / lb.replace(" ", "-").replace("+", ""))))
    if "ort" in families:
        for label, (algorithm, block, in_quick) in ORT_ROWS.items():
            if in_quick or not quick:
                plan.append((label, "ort", lambda a=algorithm, b=block, lb=label: ort_nbits_row(a, b, ctx, work / lb.replace(" ", "-"))))
    if "hqq" in families:
        for bits, group in ((4, 128),) if quick else ((4, 128), (3, 64)):
            plan.append((f"hqq {bits}-bit g{group}", "hqq", lambda b=bits, g=group: hqq_row(b, g, ctx)))
    if "llmcompressor" in families:
        for group in (64,) if quick else (64, 32):  # it refuses groups that do not divide 576 (128)
            plan.append((f"llm-compressor GPTQ g{group}", "llmcompressor", lambda g=group: llmcompressor_row(g, ctx)))
    if "autoround" in families:
        iters = min(args.autoround_iters, 5) if quick else args.autoround_iters
        for bits, group in ((4, 128),) if quick else ((4, 128), (3, 128)):
            plan.append((f"autoround {bits}-bit g{group}", "autoround",
                         lambda b=bits, g=group: autoround_row(b, g, iters, args.autoround_lr or None, ctx)))
    return plan


def earlier_float_row(args, name: str, float_bits: dict[str, Any]) -> dict[str, Any] | None:
    """The float32 row of `--float-row JSON` instead of scoring the float model again, when that
    run scored the same number of windows and its float model has the same weight bytes."""
    if not args.float_row:
        return None
    earlier = json.loads(Path(args.float_row).read_text())
    row = earlier["models"].get(name, {}).get("rows", {}).get("float32")
    if row is None or earlier["options"]["windows"] != args.windows or row.get("weight_bytes") != float_bits["weight_bytes"]:
        raise SystemExit(f"--float-row {args.float_row}: no float32 row of {name} with {args.windows} windows and the same "
                         "float model; run without --float-row")
    log(f"{name}: float32 row taken from {args.float_row}")
    return {**row, "taken_from": args.float_row}


def lm_rows(args, work: Path) -> dict[str, Any]:
    name = LM
    head, _ = common.wikitext_split()
    eval_text = work / "eval-head.txt"
    eval_text.write_text(head, encoding="utf-8")
    float_dir, weights, float_s = float_model(name, args, work)
    batches, calib_desc = mixed_pareto.calibration(name)
    evaluator = mixed_pareto.Evaluator(name, eval_text, args.windows)
    ctx = {
        "float_path": float_dir / "model.onnx", "weights": weights, "threads": args.threads, "batches": batches,
        "calibration_rows": np.concatenate([b["input_ids"] for b in batches]),
        "head_weights": 576 * 49152, "embedding_weights": 576 * 49152, "embedding_note": "fp32 (not quantized)",
        "score": evaluator.score,
        "score_onnx": evaluator,
        "score_torch": lambda model: evaluator.score(torch_runner(model)),
    }
    rows: dict[str, dict] = args.live.setdefault(name, {"rows": {}})["rows"]
    float_bits = onnx_bits(ctx["float_path"], weights)
    earlier = earlier_float_row(args, name, float_bits)
    if earlier is not None:
        rows["float32"] = earlier
        evaluator.first_is_float = False  # the float tokens are not in the JSON: no agreement rather than one with a peer row
    else:
        rows["float32"] = {"family": "float", "tool": "qcompiler", "config": "default", "compile_s": float_s,
                           "compile_note": "capture + default pipeline (None: reused from --work)", **float_bits, "head": "fp32 (tied)",
                           "embedding": "fp32", **evaluator(ctx["float_path"])}
        if {"hqq", "autoround", "llmcompressor"} & set(args.families):  # the torch float model must score as the ONNX one
            rows["float32"]["torch_float_check"] = evaluator.score(torch_runner(hf_smollm2()))
    for label, family, make in lm_plan(args, ctx, work / name):
        if not selected(args, label):
            continue
        rows[label] = attempt(label, family, make, row_limit(args, family), args.commit)
        args.save()
    base = rows["float32"]["perplexity"]
    for row in rows.values():
        if row.get("perplexity") is not None:
            row["ratio_to_float"] = round(row["perplexity"] / base, 4)
    return {"metric": "perplexity", "higher_is_better": False, "weights": weights, "calibration": calib_desc,
            "evaluation": f"first {args.windows} non-overlapping {mixed_pareto.WINDOW}-token windows of the first three quarters of {common.WIKITEXT.name}",
            "rows": rows}


def encoder_rows(args, work: Path) -> dict[str, Any]:
    name = ENCODER
    float_dir, weights, float_s = float_model(name, args, work)
    batches, calib_desc = mixed_pareto.calibration(name)
    evaluator = mixed_pareto.Evaluator(name, work / "unused.txt", 0)
    ctx = {"float_path": float_dir / "model.onnx", "weights": weights, "threads": args.threads, "batches": batches,
           "head_weights": 0, "embedding_note": "fp32 (not quantized)", "score_onnx": evaluator}
    rows: dict[str, dict] = args.live.setdefault(name, {"rows": {}})["rows"]

    def add(label: str, family: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if not selected(args, label):
            return {"error": "not selected (--match / --rows)"}
        rows[label] = attempt(label, family, make, row_limit(args, family), args.commit)
        args.save()
        return rows[label]

    rows["float32"] = {"family": "float", "tool": "qcompiler", "config": "default", "compile_s": float_s,
                       **onnx_bits(ctx["float_path"], weights), "head": "-", "embedding": "fp32", **evaluator(ctx["float_path"])}
    latency_models = {"float32": ctx["float_path"]}

    def timed(label: str, row: dict[str, Any]) -> None:
        """Time the row's model in the latency rounds if it was made (a failed row has no model)."""
        if "error" not in row and row.get("artifact"):
            latency_models[label] = Path(row["artifact"])
    if "ours" in args.families:
        timed("ours w8a8", add("ours w8a8", "ours", lambda: ours_row(ctx["float_path"], work / name / "w8a8", "w8a8", batches, ctx)))
        for budget in (3.0,) if args.quick else (3.0, 4.25):
            label, folder, pipeline = ours_mixed(budget, args.ours_options)
            add(label, "ours", lambda f=folder, p=pipeline: ours_row(
                ctx["float_path"], work / name / f, p, batches, ctx, args.ours_options))
    if "nncf" in args.families:
        timed("nncf quantize W8A8 (transformer)", add("nncf quantize W8A8 (transformer)", "nncf",
                                                      lambda: nncf_quantize_row(ctx, work / name / "nncf-w8a8")))
        add("nncf INT4_ASYM g128 data-free", "nncf", lambda: nncf_compress_row(
            {"mode": "INT4_ASYM", "group_size": 128, "group_size_fallback": "ADJUST", "ratio": 1.0}, False, ctx, work / name / "nncf-int4"))
    if "ort" in args.families:
        for kind, label in (("static", "ort static U8S8"), ("dynamic", "ort dynamic")):
            timed(label, add(label, "ort", lambda k=kind: ort_w8a8_row(k, ctx, work / name)))
    base = rows["float32"]["spearman_x100"]
    for row in rows.values():
        if row.get("spearman_x100") is not None:
            row["delta_to_float"] = round(row["spearman_x100"] - base, 3)
    latency = minilm_latency({k: v for k, v in latency_models.items() if v and v.is_file()}, batches[0], args)
    for label, timing in latency.items():
        rows[label]["latency_ms"] = timing["median_ms"]
        rows[label]["latency_ratio_to_float"] = timing.get("paired_ratio")
    return {"metric": "spearman_x100", "higher_is_better": True, "weights": weights, "calibration": calib_desc,
            "evaluation": f"STS Spearman x100 over all pairs of {common.STS.name}",
            "latency": "batch 8 x 128 tokens (the first calibration batch), interleaved rounds, median ms", "rows": rows}


def nncf_quantize_row(ctx: dict, out: Path) -> dict[str, Any]:
    import nncf
    import onnx

    model = onnx.load(str(ctx["float_path"]))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(ctx["batches"]), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=sum(len(next(iter(b.values()))) for b in ctx["batches"]))
    path = save_onnx(quantized, out / "model.onnx")
    wall = time.perf_counter() - start
    return {"tool": "nncf", "config": "quantize(model_type=TRANSFORMER), defaults (u8 activations, s8 weights)",
            "compile_s": round(wall, 2), **onnx_bits(path, ctx["weights"]), "head": "-", "embedding": "-",
            "artifact": str(path), **ctx["score_onnx"](path)}


def ort_w8a8_row(kind: str, ctx: dict, work: Path) -> dict[str, Any]:
    info = w8a8_peers.compile_ort(kind, ctx["float_path"], work, ctx["batches"], 0.0)
    path = Path(info["model"])
    return {"tool": "onnxruntime", "config": f"quantize_{kind}({', '.join(f'{k}={v}' for k, v in info['settings'].items())})",
            "compile_s": info["from_float_s"], **onnx_bits(path, ctx["weights"]), "head": "-", "embedding": "-",
            "artifact": str(path), **ctx["score_onnx"](path)}


def minilm_latency(models: dict[str, Path], feeds: dict[str, np.ndarray], args) -> dict[str, dict]:
    from qcompiler.analysis.execute import ort_session

    sessions = {label: ort_session(str(path), args.threads) for label, path in models.items()}
    runners = {label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}
    return common.interleaved_latency(runners, warmup=3, repeats=5 if args.quick else 20, budget_s=60, reference="float32")


# --------------------------------------------------------------------------------------------
# Output


def text_table(name: str, result: dict) -> str:
    metric = result["metric"]
    rows = []
    for label, r in result["rows"].items():
        if "error" in r:
            rows.append([label, "-", "-", "-", "-", "-", r["error"][:110]])
            continue
        q = r.get(metric)
        extra = f"{r['latency_ms']:.1f} ms" if r.get("latency_ms") is not None else ""
        rows.append([label, f"{r['effective_bits']:.3f}", f"{q:.3f}" if q is not None else "-", r.get("head", "-"),
                     r.get("embedding", "-"), "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}", extra])
    return (f"{name}: {metric} vs effective bits per weight ({result['evaluation']})\n"
            + common.table(["variant", "eff. bits", metric, "head", "embedding", "compile s", "note"], rows, "lrrllrl"))


def markdown_table(name: str, result: dict) -> str:
    """The rows as a Markdown table for docs/results.md, sorted by effective bits; failed rows last."""
    metric = result.get("metric") or ("perplexity" if name == LM else "spearman_x100")
    done = sorted(((label, r) for label, r in result["rows"].items() if "error" not in r), key=lambda lr: -lr[1]["effective_bits"])
    failed = [(label, r) for label, r in result["rows"].items() if "error" in r]
    latency = any(r.get("latency_ms") is not None for _, r in done)
    head = ["variant", "effective bits", metric, "top-1 vs float" if name == LM else "cosine vs float", "LM head", "embedding",
            "compile s"] + (["latency ms (x float)"] if latency else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in done:
        agree = r.get("top1_agreement_vs_float", r.get("mean_cosine_vs_float"))
        cells = [label, f"{r['effective_bits']:.2f}", f"{r[metric]:.2f}" if r.get(metric) is not None else "-",
                 f"{agree:.3f}" if agree is not None else "", r.get("head", "-"), r.get("embedding", "-"),
                 "" if r.get("compile_s") is None else f"{r['compile_s']:.0f}"]
        if latency:
            cells.append(f"{r['latency_ms']:.1f} ({r.get('latency_ratio_to_float') or 0:.2f})" if r.get("latency_ms") else "")
        lines.append("| " + " | ".join(cells) + " |")
    for label, r in failed:
        why = r["error"].replace("|", "/")[:160]
        lines.append("| " + " | ".join([label, why if r.get("not_finished") else "did not run: " + why] + [""] * (len(head) - 2)) + " |")
    return "\n".join(lines)


STYLE = {"ours": ("o-", "tab:blue"), "ort": ("^", "tab:red"), "nncf": ("s", "tab:green"), "hqq": ("v", "tab:purple"),
         "autoround": ("D", "tab:orange"), "llmcompressor": ("P", "tab:brown"), "llamacpp": ("X", "tab:olive")}


def plot(results: dict[str, dict], path: Path) -> str | None:
    plt, missing = common.pyplot()
    if missing:
        return missing
    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 5.2), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        metric, rows = result["metric"], result["rows"]
        for family, (marker, color) in STYLE.items():
            series: dict[str, list] = {}  # our presets, and each recipe of --ours-options, as lines of their own
            for label, r in rows.items():
                if r.get("family") == family and r.get(metric) is not None and r["effective_bits"] < 16:
                    series.setdefault(r.get("recipe", ""), []).append((r["effective_bits"], r[metric], label))
            for recipe, points in sorted(series.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker[0], color=color,
                        linestyle=("--" if recipe else "-") if family == "ours" else "none", markersize=7,
                        label=f"{family} {recipe}" if recipe else family)
                for x, y, label in points:
                    ax.annotate(label.split(" ", 1)[1] if " " in label else label, (x, y), textcoords="offset points",
                                xytext=(4, 3), fontsize=6, color=color)
        base = rows["float32"].get(metric)
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"float32 ({base:.2f})")
        if not result["higher_is_better"]:
            ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight (linear layers incl. LM head: codes + scales + zero points)")
        ax.set_ylabel(metric + (" (higher is better)" if result["higher_is_better"] else " (lower is better)"))
        ax.set_title(f"{name}: {result['evaluation'][:70]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=f"{LM},{ENCODER}", help=f"comma-separated: {LM}, {ENCODER}")
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families: " + " ".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=common.THREADS, help="intra-op threads for every tool (default 2)")
    parser.add_argument("--windows", type=int, default=None, help="SmolLM2 perplexity windows of 256 tokens (8; --quick 2)")
    parser.add_argument("--autoround-iters", type=int, default=50, help="AutoRound tuning iterations per block (50; --quick 5)")
    parser.add_argument("--row-limit", type=float, default=1800,
                        help="wall-clock seconds a peer row may run before it is recorded as not finished (1800; 0: none); "
                             "our own rows run to the end")
    parser.add_argument("--autoround-lr", type=float, default=5e-3,
                        help="AutoRound learning rate (5e-3: its 'light' recipe, with 50 iterations; 0: its default 1/iters)")
    parser.add_argument("--quick", action="store_true", help="fewer windows, budgets and peer settings (a smoke run)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/peers.json, --quick peers_quick.json)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --output")
    parser.add_argument("--match", default="", help="SmolLM2: only the rows whose label contains this text (e.g. g128)")
    parser.add_argument("--rows", default="", help="only these rows: exact labels separated by ';' "
                        "(e.g. 'ours mixed 4;hqq 4-bit g128'; the float32 row always runs)")
    parser.add_argument("--float-row", default=None, metavar="JSON",
                        help="SmolLM2: take the float32 row from this earlier result (same windows, same float model) "
                             "instead of scoring it again (the rows then have no top-1 agreement: the float tokens are not in the JSON)")
    parser.add_argument("--ours-options", default="", metavar="OPTIONS",
                        help="preset options added to our mixed rows (e.g. 'rounding=gptq'): rows 'ours mixed B OPTIONS', drawn "
                             "as a line of their own; merge them with a run of the presets (--merge)")
    parser.add_argument("--markdown", action="store_true", help="only print the JSON at --output as Markdown tables")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the rows of runs made with different --only (later files win) into --output, then plot; "
                             "with --work, the ONNX rows' bits are counted again from the files kept there")
    args = parser.parse_args(argv)
    output = Path(args.output or common.RESULTS / ("peers_quick.json" if args.quick else "peers.json"))
    if args.merge:
        note = merge([Path(f) for f in args.merge], output, Path(args.work) if args.work else None)
        print(note or f"wrote {output} and {output.with_suffix('.png')}")
        return 0
    if args.markdown:
        for name, result in json.loads(output.read_text())["models"].items():
            print(f"{name}\n\n{markdown_table(name, result)}\n")
        return 0
    if args.replot:
        note = plot(json.loads(output.read_text())["models"], output.with_suffix(".png"))
        print(note or f"wrote {output.with_suffix('.png')}")
        return 0
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    args.families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [m for m in names if m not in (LM, ENCODER)] + [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown model or family: {', '.join(unknown)}")
    if args.windows is None:
        args.windows = 2 if args.quick else 8
    common.quiet()
    mixed_pareto.THREADS = args.threads  # compile_ours and Evaluator read it
    threads = common.fix_threads(args.threads)
    started = time.perf_counter()
    git = common.git_state()
    args.commit = git["commit"] + ("+uncommitted" if git["uncommitted"] else "")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="peers-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    body = {
        "benchmark": "peers", "complete": False, "quick": args.quick, "command": common.command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": common.machine(),
        "packages": {**common.packages(), **peer_versions()}, "threads": threads,
        "git_at_start": git, "options": {"models": names, "families": args.families, "windows": args.windows,
                                                        "autoround_iters": args.autoround_iters, "autoround_lr": args.autoround_lr, "row_limit_s": args.row_limit},
        "models": results,
    }
    args.live = results  # rows land here as they finish; the JSON is rewritten after each (complete: false until the end)
    args.save = lambda: common.write_json(output, {**body, "total_seconds": round(time.perf_counter() - started, 1)})
    try:
        for name in names:
            results[name] = lm_rows(args, work) if name == LM else encoder_rows(args, work)
            args.save()
            print(text_table(name, results[name]) + "\n", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    png = output.with_suffix(".png")
    note = plot(results, png) if results else "no results"
    body.update(complete=True, png=None if note else str(png), png_note=note)
    args.save()
    print(f"wrote {output}" + (f" and {png}" if not note else f" ({note})"))
    return 0


def merge(paths: list[Path], output: Path, work: Path | None = None) -> str | None:
    """One JSON (and PNG) from runs of the same models made with different `--only` families,
    e.g. run side by side, or new rows added to an earlier result (`--merge peers.json new.json`):
    rows of later files replace rows of the same label, except that a failed or unfinished row
    never replaces a measured one; every row keeps the date, commit and command it was measured
    with (`measured`); `merged_from` lists every run that contributed, earlier merges included."""
    runs = [json.loads(p.read_text()) for p in paths]
    for run in runs:
        stamp_rows(run)
    body = json.loads(json.dumps(runs[0]))
    for run in runs[1:]:
        for name, model in run["models"].items():
            target = body["models"].setdefault(name, model)
            if target is model:
                continue
            for label, row in model["rows"].items():
                old = target["rows"].get(label)
                if label == "float32" and old is not None or (old is not None and "error" in row and "error" not in old):
                    continue
                target["rows"][label] = row
    for name, result in body["models"].items():  # an unfinished run saved its rows only
        lm = name == LM
        result.setdefault("metric", "perplexity" if lm else "spearman_x100")
        result.setdefault("higher_is_better", not lm)
        result.setdefault("evaluation", (f"first {body['options']['windows']} non-overlapping {mixed_pareto.WINDOW}-token windows "
                                         f"of the first three quarters of {common.WIKITEXT.name}") if lm
                          else f"STS Spearman x100 over all pairs of {common.STS.name}")
        base = result["rows"]["float32"][result["metric"]]
        for row in result["rows"].values():
            if row.get(result["metric"]) is not None:
                row["ratio_to_float" if lm else "delta_to_float"] = (round(row[result["metric"]] / base, 4) if lm
                                                                    else round(row[result["metric"]] - base, 3))
    if work is not None:
        body["bits_recounted_from"] = {"work": str(work), "rows": recount(body, work)}
    body["merged_from"] = [entry for p, r in zip(paths, runs) for entry in run_entries(p, r)]
    body["complete"] = all(r.get("complete") for r in runs)
    if LM in body["models"]:
        body["unfinished"] = unfinished_rows(body["models"][LM]["rows"])
    png = output.with_suffix(".png")
    note = plot(body["models"], png)
    body.update(png=None if note else str(png), png_note=note)
    common.write_json(output, body)
    return note


def run_entries(path: Path, run: dict) -> list[dict[str, Any]]:
    """The `merged_from` entries of one input of --merge: its own, or those it was merged from."""
    if run.get("merged_from"):
        return run["merged_from"]
    return [{"file": str(path), "command": run["command"], "date": run["date"], "complete": run.get("complete"),
             "commit": run.get("git_at_start", {}).get("commit"), "families": run.get("options", {}).get("families"),
             "peer_packages": {k: v for k, v in run.get("packages", {}).items() if k in PEER_PACKAGES}}]


def stamp_rows(run: dict) -> None:
    """Give every row without its own `measured` that of the run it came from: the run's start
    date, commit and command; for a merged file, those of the last run it was merged from whose
    file still holds the row (rows measured before `measured` was recorded)."""
    sources = []
    for entry in reversed(run.get("merged_from") or []):
        path = Path(entry["file"])
        if path.is_file():
            sources.append((entry, json.loads(path.read_text())))
    for name, model in run["models"].items():
        for label, row in model["rows"].items():
            if "measured" in row:
                continue
            origin = next((entry for entry, part in sources if label in part["models"].get(name, {}).get("rows", {})), None)
            if origin is None and not run.get("merged_from"):
                origin = {"date": run["date"], "commit": run.get("git_at_start", {}).get("commit"), "command": run["command"]}
            if origin is not None:
                row["measured"] = {"date": origin["date"], "commit": origin["commit"], "command": origin["command"],
                                   "note": "the date its run started (rows measured before each row recorded its own)"}


def unfinished_rows(rows: dict[str, dict]) -> list[str]:
    """SmolLM2 rows of the full run that have no result: absent, failed or past the row limit."""
    plan = lm_plan(argparse.Namespace(quick=False, families=list(FAMILIES), autoround_iters=50, autoround_lr=5e-3,
                                      ours_options=""), {}, Path())
    return [f"{label}: " + ("not measured" if label not in rows else rows[label]["error"][:120])
            for label, _, _ in plan if label not in rows or "error" in rows[label]]


PEER_PACKAGES = ("nncf", "hqq", "auto-round", "llmcompressor", "compressed-tensors", "llama-cpp-python")


def peer_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in PEER_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


if __name__ == "__main__":
    sys.exit(main())
