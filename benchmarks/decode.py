"""SmolLM2-135M with its KV cache: prefill and decode tokens/s and held-out perplexity per pipeline.

    python benchmarks/decode.py                                   # 5 pipelines, 5 rounds, 128 + 128 tokens, 8 windows
    python benchmarks/decode.py --rounds 2 --prompt-tokens 32 --new-tokens 32 --windows 2   # a short run
    python benchmarks/decode.py --build build/decode --reuse ...  # time and score artifacts compiled by an earlier run
    python benchmarks/decode.py --pipelines "float32,float32 int8-kv,w8a8 per-token,w8a8 per-token int8-kv"   # the int8 KV cache
    .venv-peers/bin/python benchmarks/decode.py --peers genai,llamacpp ...   # with ONNX Runtime GenAI and llama.cpp beside them

Each pipeline compiles `smollm2-135m-kv` (captured once, reused) into an ONNX Runtime artifact:
`float32` (the `default` pipeline), `w8a8{act-mode=per-token}`, `mixed{avg-bits=4.25}`,
`mixed 4.25 digits` (`mixed{avg-bits=4.25 route=digits}`: the same allocation, one MatMulNBits a
layer with the wider classes as digits of the narrowest, the fp16 class cast at load; `mixed 4.25
auto` on request: one kernel only where the kernel-cost table predicts it faster at M=1) and
`uniform 4-bit` (`allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},
quantize-weights{grid=minmax}`: every linear layer in asymmetric 4-bit min-max groups of 128 input
channels with an fp16 scale and an integer zero point, lowered to one plain `MatMulNBits` per
layer, the form of ONNX Runtime's own 4-bit RTN), and on
request the first two with an int8 KV cache (`kv-cache=int8`, passes/kv_cache.py). Every one is lowered with
`lower-ort`'s defaults for a decoder: attention as `GroupQueryAttention` reading Q, K and V packed,
residual norms as `SkipSimplifiedLayerNormalization`, gate and up as one product; `... unfused`
rows (`attention=as-is`, and `shared-input=separate` for uniform 4-bit) keep the attention and
norms as exported, as every row was before those defaults (the mixed preset cannot pass
`shared-input`: its single-class layers, if any, still share one kernel). All are
calibrated on `--calib-count` windows of 110 words from the last quarter of the WikiText excerpt
(`benchmarks/common.py: wikitext_split`). The first three quarters are held out: the prompt is
their first `--prompt-tokens` tokens and perplexity is `qcompiler eval --task perplexity` on
`--windows` windows of `--window` tokens, run through each artifact's cache (a prefill of half the
window, then one token per step), beside the float torch model on the whole window.

Speed: batch 1, ONNX Runtime with `--threads` intra-op threads (default 2), one session per
artifact; each round runs every artifact once in a rotated order (interleaved, so the ratios come
from the same stretch of machine time): a prefill step over the prompt, then `--new-tokens` - 1
greedy single-token steps whatever token comes (end-of-sequence does not stop it), each step's
present keys and values fed back as the next step's past without a copy through numpy. Reported:
medians over rounds of prefill tokens/s (prompt tokens / prefill time) and decode tokens/s
(decode steps / their time), and the KV cache's bytes at the end of a round (prompt + new tokens,
batch 1: keys and values of every layer, an int8 cache's scales included).

Greedy agreement (`--agree-prompts`, default 8; 0 skips it): that many prompts of
`--agree-prompt-tokens` tokens, taken at evenly spaced places of the held-out text, each continued
by `--agree-tokens` greedy tokens (end-of-sequence does not stop it) by transformers'
LlamaForCausalLM loaded from the same GGUF (the float reference, with its own KV cache) and by
each artifact through its cache. Per prompt: how many of the first tokens agree before the first
difference; the row gives the sum over prompts (of prompts x tokens), the prompts that agree
throughout and the per-prompt counts. JSON to `--out` (default benchmarks/results/decode.json).

Peers (`--peers genai,llamacpp`, none by default; benchmarks/decode_peers.py says how each is made
and how to install them): ONNX Runtime GenAI's model builder output at int4 and fp32 (`genai
int4`, `genai fp32`) and llama.cpp on the bundled Q4_1 GGUF and it requantized to Q4_K and Q3_K
(`llama.cpp Q4_1`, `llama.cpp Q4_K`, `llama.cpp Q3_K`), built into `--build` (reused there when
present). `--in-genai NAMES` adds rows `NAME in genai`: our artifact of that row run by ONNX Runtime
GenAI's generator instead of `CachedSession` (the same runtime as the GenAI rows, so the graphs are
compared without the loops that drive them). They join the same interleaved rounds, the same greedy agreement and the same perplexity
windows and protocol (their own logits, the same token ids); their row gives the model's file size
in place of bits per weight and no cache size. A peer whose package is absent is skipped with one
line. With llama.cpp rows, OMP_WAIT_POLICY defaults to PASSIVE: llama.cpp's OpenMP threads
otherwise spin at every barrier, which on a loaded 2-core machine made its decode 5 to 7 times
slower at 2 threads (set OMP_WAIT_POLICY=ACTIVE to measure it spinning); ONNX Runtime's threads
spin as they do by default; `--ort-spin off` makes our rows' wait passively too (ONNX Runtime
GenAI's configuration has no switch for it, so its rows spin either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PIPELINES = {
    "float32": "default",
    "w8a8 per-token": "w8a8{act-mode=per-token}",
    # each per-token linear MatMulIntegerToFloat and its row scale, as before int-kernels=auto chose one 8-bit
    # MatMulNBits a linear for a decoder (the kernel quantizes its input per block)
    "w8a8 per-token fused": "w8a8{act-mode=per-token int-kernels=fused}",
    "mixed 4.25": "mixed{avg-bits=4.25}",
    "mixed 4.25 int4-embedding": "mixed{avg-bits=4.25 embedding=int4}",
    "mixed 4.25 gptq": "mixed{avg-bits=4.25 rounding=gptq}",
    "mixed 4.25 blocks=whole": "mixed{avg-bits=4.25 blocks=whole}",
    "mixed 3.25": "mixed{avg-bits=3.25}",
    "mixed 3.25 blocks=whole": "mixed{avg-bits=3.25 blocks=whole}",
    # the same allocation, one MatMulNBits a layer (wider classes as 2-bit digits), fp16 class cast at load
    "mixed 4.25 digits": "mixed{avg-bits=4.25 route=digits}",
    "mixed 4.25 apart": "mixed{avg-bits=4.25 shared-input=apart}",
    "mixed 4.25 latency": "canonicalize,calibrate,allocate-bits{avg-bits=4.25 outliers-weight=0 cost=latency},quantize-weights,"
                          "fold-permutation,lower-ort",
    "mixed 3.25 apart": "mixed{avg-bits=3.25 shared-input=apart}",
    # the same, one kernel only in the layers where the kernel-cost table predicts it faster at M=1
    "mixed 4.25 auto": "mixed{avg-bits=4.25 route=auto}",
    # every linear layer at 4 bits: asymmetric min-max groups of 128 input channels, an fp16 scale and an
    # integer zero point per group, no fp16 channels or outliers: one plain MatMulNBits per layer
    "uniform 4-bit": "canonicalize,calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                     "quantize-weights{grid=minmax},fold-permutation,lower-ort",
    # uniform 4-bit with its RMSNorms written in the form ONNX Runtime fuses (SimplifiedLayerNormalization)
    "uniform 4-bit rms-norm fused": "canonicalize,calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                                    "quantize-weights{grid=minmax},fold-permutation,lower-ort{rms-norm=fused}",
    # each layer's attention as one GroupQueryAttention (lower-ort{attention=fused})
    "float32 attention fused": "default{attention=fused}",
    "mixed 4.25 attention fused": "mixed{avg-bits=4.25 attention=fused}",
    "mixed 4.25 digits attention fused": "mixed{avg-bits=4.25 route=digits attention=fused}",
    "uniform 4-bit attention fused": "canonicalize,calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                                     "quantize-weights{grid=minmax},fold-permutation,lower-ort{attention=fused}",
    # the `int4` preset: every linear one uniform 4-bit class rounded by gptq, one MatMulNBits each
    "int4": "int4",
    # its grid by group size: symmetric (no zero points stored; the preset's, at 64), or asymmetric with integer zero points
    "int4 g128": "int4{group-size=128}",
    "int4 g32": "int4{group-size=32}",
    "int4 zero points g128": "int4{group-size=128 zero-points=auto}",
    "int4 int4-embedding": "int4{embedding=int4}",
    # the tied table reads the head's 4-bit codes, stored once
    "int4 shared-embedding": "int4{embedding=shared}",
    # as the rows above were before lower-ort fused a decoder's attention, norms and Q/K/V by default
    "float32 unfused": "default{attention=as-is}",
    "w8a8 per-token unfused": "w8a8{act-mode=per-token attention=as-is}",
    "mixed 4.25 unfused": "mixed{avg-bits=4.25 attention=as-is}",
    "uniform 4-bit unfused": "canonicalize,calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                             "quantize-weights{grid=minmax},fold-permutation,lower-ort{attention=as-is shared-input=separate}",
    "float32 int8-kv": "default{kv-cache=int8}",
    "w8a8 per-token int8-kv": "w8a8{act-mode=per-token kv-cache=int8}",
}
DEFAULT_PIPELINES = ("float32", "w8a8 per-token", "mixed 4.25", "mixed 4.25 digits", "uniform 4-bit")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--pipelines", default=",".join(DEFAULT_PIPELINES), help="comma-separated names from: " + ", ".join(PIPELINES))
    parser.add_argument("--agree-prompts", type=int, default=8, help="prompts of the greedy agreement check (0: skip it)")
    parser.add_argument("--agree-prompt-tokens", type=int, default=32)
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--build", type=Path, help="where the artifacts go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="use the artifacts already in --build (compiled by an earlier run with the same --calib-count) instead of compiling")
    parser.add_argument("--text", type=Path, default=common.WIKITEXT, help="the WikiText excerpt (default ../shared/data beside the repository)")
    parser.add_argument("--ort-spin", choices=("on", "off"), default="on",
                        help="off: our rows' ONNX Runtime threads wait passively (session.intra_op.allow_spinning=0)")
    parser.add_argument("--peers", default="", help="comma-separated peer runtimes beside our rows: genai, llamacpp (default: none)")
    parser.add_argument("--in-genai", default="", help="comma-separated names of our rows also run by ONNX Runtime GenAI's "
                        "generator, as rows 'NAME in genai' (needs onnxruntime-genai; default: none)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "decode.json")
    common.add_mixed_options(parser)
    return parser.parse_args()


def capture_once() -> None:
    """Capture the bundled model once per process: every pipeline starts from the same IR."""
    import onnx_ir as ir

    import importlib

    capture = importlib.import_module("qcompiler.driver.capture")  # the module (the package exports a function of that name)
    captured: dict[str, bytes] = {}
    original = capture.capture_bundled

    def memo(bundled, dtype=None):
        if bundled.name not in captured:
            captured[bundled.name] = ir.serde.serialize_model(original(bundled, dtype)).SerializeToString()
        import onnx

        return ir.serde.deserialize_model(onnx.load_from_string(captured[bundled.name]))

    capture.capture_bundled = memo


def time_round(session, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill step and of `new_tokens` - 1 greedy decode steps."""
    session.reset(capacity=len(prompt) + new_tokens)  # a shared cache buffer sized for the round
    start = time.perf_counter()
    token = int(np.argmax(session.step(prompt)[-1]))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(np.argmax(session.step(np.asarray([token]))[-1]))
    return prefill, time.perf_counter() - start


def greedy(step, prompt: np.ndarray, count: int) -> list[int]:
    """`count` greedy tokens after `prompt`; `step(ids)` runs ids after what came before and gives
    their logits [len, vocab]."""
    token = int(np.argmax(step(prompt)[-1]))
    tokens = [token]
    while len(tokens) < count:
        token = int(np.argmax(step(np.asarray([token]))[-1]))
        tokens.append(token)
    return tokens


def transformers_greedy(prompts: list[np.ndarray], count: int) -> list[list[int]]:
    """The float reference: transformers' Llama from the bundled GGUF, greedy with its own cache."""
    import torch
    import transformers

    from qcompiler.models import smollm2

    path = smollm2.gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        state = {"past": None}

        def step(ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = model(torch.from_numpy(np.asarray(ids, np.int64))[None], past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[0].numpy()

        results.append(greedy(step, prompt, count))
    return results


def agreement(reference: list[list[int]], got: list[list[int]]) -> dict:
    """Per prompt, the tokens that agree before the first difference; their sum and the prompts
    that agree throughout."""
    counts = []
    for want, have in zip(reference, got):
        same = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), len(want))
        counts.append(same)
    return {"agreeing_tokens": sum(counts), "of": sum(len(r) for r in reference),
            "prompts_agreeing_throughout": sum(c == len(r) for c, r in zip(counts, reference)), "per_prompt": counts}


def agreement_prompts(ids: list[int], count: int, length: int) -> list[np.ndarray]:
    """`count` prompts of `length` tokens at evenly spaced places of the token list."""
    stride = (len(ids) - length) // max(1, count)
    return [np.asarray(ids[i * stride : i * stride + length], np.int64) for i in range(count)]


def peer_perplexity(session, text: str, count: int, window: int) -> float:
    """Held-out perplexity of a peer on the windows `qcompiler eval --task perplexity` scores, with
    its protocol: a prefill of half the window, then one token per step."""
    from qcompiler.models import smollm2
    from qcompiler.tools.decode import cached_logits
    from qcompiler.tools.evaluate import next_token_nll

    rows = smollm2.windows(text, window)[:count]
    nll = sum(next_token_nll(cached_logits(session, row, max(1, len(row) // 2)), row) for row in rows)
    return round(float(np.exp(nll / (len(rows) * (window - 1)))), 4)


def passive_ort_sessions() -> None:
    """Open our artifacts' ONNX Runtime sessions with threads that wait passively between ops
    (`session.intra_op.allow_spinning=0`); ONNX Runtime's threads spin by default. For model files
    only: call it after compiling."""
    import onnxruntime as ort

    from qcompiler.analysis import execute

    def passive_session(model, threads=None, optimized_path=None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    execute.ort_session = passive_session


def artifact_bytes(folder: Path) -> int:
    """Bytes of the artifact's model: model.onnx and any external data beside it."""
    return sum(p.stat().st_size for p in folder.glob("model.onnx*") if p.is_file())



def main() -> None:
    args = parse_args()
    peer_families = [f.strip() for f in args.peers.split(",") if f.strip()]
    if "llamacpp" in peer_families:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any OpenMP runtime loads (torch's included)
    import decode_peers

    peer_families, skipped = decode_peers.available(peer_families)
    for line in skipped:
        print(line, flush=True)
    common.quiet()
    threads = common.fix_threads(args.threads)
    from qcompiler.codegen.lm_artifact import read_layout
    from qcompiler.driver.compiler import compile as qcompile
    from qcompiler.errors import QCompilerError, first_line
    from qcompiler.models import smollm2
    from qcompiler.tools.decode import CachedSession
    from qcompiler.tools.evaluate import evaluate

    names = [n.strip() for n in args.pipelines.split(",")]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        sys.exit(f"unknown pipeline names {unknown}; choose from {list(PIPELINES)}")
    common.WIKITEXT = args.text
    held_out, calib_text = common.wikitext_split()
    build = args.build or Path(tempfile.mkdtemp(prefix="decode-bench-"))
    build.mkdir(parents=True, exist_ok=True)
    calib = common.write_lines(build / "calib.txt", common.word_windows(calib_text, args.calib_count, 110))
    held_out_file = build / "held-out.txt"
    held_out_file.write_text(held_out, encoding="utf-8")
    held_out_ids = smollm2.encode(held_out)
    prompt = np.asarray(held_out_ids[: args.prompt_tokens], dtype=np.int64)

    capture_once()
    artifacts, compiled, failed = {}, {}, {}
    for name in names:
        folder = build / name.replace(" ", "-")
        if args.reuse and (folder / "manifest.json").is_file():
            manifest = json.loads((folder / "manifest.json").read_text())
            artifacts[name] = folder
            compiled[name] = {"pipeline": manifest["pipeline"], "compile_s": None, "reused": True,
                              "effective_bits": manifest.get("effective_bits_per_weight"), **common.mixed_layer_mib(manifest)}
            continue
        start = time.perf_counter()
        try:
            result = qcompile("smollm2-135m-kv", build / name.replace(" ", "-"),
                              pipeline=common.with_mixed_options(PIPELINES[name], args.mixed_options),
                              calibration=None if name == "float32" else str(calib), calib_count=args.calib_count,
                              threads=args.threads, drift=False)
        except QCompilerError as error:  # the row says why; the other rows still run
            failed[name] = first_line(str(error))
            print(f"{name}: did not compile: {failed[name]}", flush=True)
            continue
        artifacts[name] = result.output
        compiled[name] = {"pipeline": result.pipeline, "compile_s": round(time.perf_counter() - start, 1),
                          "effective_bits": result.manifest.get("effective_bits_per_weight"), **common.mixed_layer_mib(result.manifest)}
        print(f"compiled {name} in {compiled[name]['compile_s']} s", flush=True)

    names = [name for name in names if name not in failed]
    if args.ort_spin == "off":
        passive_ort_sessions()
    sessions = {name: CachedSession(path / "model.onnx", read_layout(path), args.threads) for name, path in artifacts.items()}
    context = max(len(prompt) + args.new_tokens, args.window, args.agree_prompt_tokens + args.agree_tokens) + 8
    peer_sessions, peer_scoring, peer_facts = decode_peers.make_peers(peer_families, build, args.threads, context)
    for name in [n.strip() for n in args.in_genai.split(",") if n.strip()]:
        if name not in artifacts:
            sys.exit(f"--in-genai: '{name}' is not one of this run's pipelines {list(artifacts)}")
        row = f"{name} in genai"
        facts = decode_peers.ours_in_genai(artifacts[name], build / f"{artifacts[name].name}-in-genai", args.threads)
        peer_facts[row] = {"peer": "onnxruntime-genai", **facts, "effective_bits": compiled[name]["effective_bits"]}
        peer_sessions[row] = decode_peers.GenaiSession(build / f"{artifacts[name].name}-in-genai")
        peer_scoring[row] = lambda s=peer_sessions[row]: s
    sessions.update(peer_sessions)
    names = names + list(peer_sessions)
    for session in sessions.values():  # warm-up
        time_round(session, prompt[:8], 4)
    samples = {name: {"prefill": [], "decode": []} for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            prefill, decode = time_round(sessions[name], prompt, args.new_tokens)
            samples[name]["prefill"].append(len(prompt) / prefill)
            samples[name]["decode"].append((args.new_tokens - 1) / decode)

    agree_prompts = agreement_prompts(held_out_ids, args.agree_prompts, args.agree_prompt_tokens) if args.agree_prompts else []
    reference_tokens = transformers_greedy(agree_prompts, args.agree_tokens) if agree_prompts else []
    agreements = {}
    for name, session in sessions.items():
        if agree_prompts:
            got = []
            for p in agree_prompts:
                session.reset()
                got.append(greedy(session.step, p, args.agree_tokens))
            agreements[name] = agreement(reference_tokens, got)

    rows, results = [], {}
    for name in names:
        if name in peer_facts:
            results[name] = {
                **peer_facts[name],
                "prefill_tokens_per_s": round(statistics.median(samples[name]["prefill"]), 1),
                "decode_tokens_per_s": round(statistics.median(samples[name]["decode"]), 1),
                "prefill_samples": [round(v, 1) for v in samples[name]["prefill"]],
                "decode_samples": [round(v, 1) for v in samples[name]["decode"]],
                "perplexity": peer_perplexity(peer_scoring[name](), held_out, args.windows, args.window),
                "greedy_agreement": agreements.get(name),
            }
            continue
        layout = sessions[name].layout
        quality = evaluate(artifacts[name], "perplexity", held_out_file, count=args.windows, window=args.window, threads=args.threads)
        results[name] = {
            **compiled[name],
            "file_bytes": artifact_bytes(artifacts[name]),
            "session_rss_mib": common.session_rss(artifacts[name] / "model.onnx", args.threads),
            "prefill_tokens_per_s": round(statistics.median(samples[name]["prefill"]), 1),
            "decode_tokens_per_s": round(statistics.median(samples[name]["decode"]), 1),
            "prefill_samples": [round(v, 1) for v in samples[name]["prefill"]],
            "decode_samples": [round(v, 1) for v in samples[name]["decode"]],
            "perplexity": quality["perplexity_compiled"],
            "perplexity_float_torch": quality["perplexity_float"],
            "kv_cache": layout.kv_cache,
            "cache_bytes_per_token": layout.cache_bytes_per_token(),
            "cache_bytes": layout.cache_bytes_per_token() * (len(prompt) + args.new_tokens),
            "greedy_agreement": agreements.get(name),
        }
    base = results.get("float32", {}).get("decode_tokens_per_s")
    for name, res in results.items():
        res["decode_vs_float32"] = round(res["decode_tokens_per_s"] / base, 3) if base else None
        agree = res["greedy_agreement"]
        cache = res.get("cache_bytes")
        memory = f"{res['layers_at_rest_mib']} / {res['layers_resident_mib']}" if "layers_resident_mib" in res else "-"
        rows.append([name, res.get("effective_bits", "-"), round(res["file_bytes"] / 2**20, 1), memory, res.get("session_rss_mib", "-"),
                     res["prefill_tokens_per_s"],
                     res["decode_tokens_per_s"], res["decode_vs_float32"], res["perplexity"],
                     round(cache / 2**20, 2) if cache else "-",
                     f"{agree['agreeing_tokens']}/{agree['of']} ({agree['prompts_agreeing_throughout']} whole)" if agree else "-"])
    print(common.table(["pipeline", "bits/weight", "file MiB", "weight-only layers MiB (at rest / resident)", "RSS at session start MiB", "prefill tok/s", "decode tok/s", "decode vs float32", "held-out ppl",
                        "cache MiB", "greedy agreement"], rows))
    body = {
        "command": common.command_line(),
        "settings": {"rounds": args.rounds, "prompt_tokens": int(len(prompt)), "new_tokens": args.new_tokens,
                     "windows": args.windows, "window": args.window, "calib_count": args.calib_count, "batch": 1,
                     "agree_prompts": args.agree_prompts, "agree_prompt_tokens": args.agree_prompt_tokens,
                     "agree_tokens": args.agree_tokens, "agreement_reference": "transformers LlamaForCausalLM from the GGUF",
                     "mixed_options": args.mixed_options},
        "greedy_reference_tokens": reference_tokens,
        "did_not_compile": failed,
        "threads": threads,
        "results": results,
        "machine": common.machine(),
        "packages": {**common.packages(), **decode_peers.versions()},
        "peers": peer_families,
        "peers_skipped": skipped,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ort_spin": args.ort_spin,
        "git": common.git_state(),
        "load_average": list(__import__("os").getloadavg()),
    }
    common.write_json(args.out, body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
