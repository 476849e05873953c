"""SmolLM2-135M with its KV cache: prefill and decode tokens/s and held-out perplexity per pipeline.

    python benchmarks/decode.py                                   # 3 pipelines, 5 rounds, 128 + 128 tokens, 8 windows
    python benchmarks/decode.py --rounds 2 --prompt-tokens 32 --new-tokens 32 --windows 2   # a short run
    python benchmarks/decode.py --build build/decode --reuse ...  # time and score artifacts compiled by an earlier run

Each pipeline compiles `smollm2-135m-kv` (captured once, reused) into an ONNX Runtime artifact:
`float32` (the `default` pipeline), `w8a8{act-mode=per-token}` and `mixed{avg-bits=4.25}`,
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
(decode steps / their time). JSON to `--out` (default benchmarks/results/decode.json).
"""

from __future__ import annotations

import argparse
import json
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
    "mixed 4.25": "mixed{avg-bits=4.25}",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated names from: " + ", ".join(PIPELINES))
    parser.add_argument("--build", type=Path, help="where the artifacts go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="use the artifacts already in --build (compiled by an earlier run with the same --calib-count) instead of compiling")
    parser.add_argument("--text", type=Path, default=common.WIKITEXT, help="the WikiText excerpt (default ../shared/data beside the repository)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "decode.json")
    return parser.parse_args()


def capture_once() -> None:
    """Capture the bundled model once per process: every pipeline starts from the same IR."""
    import onnx_ir as ir

    import importlib

    capture = importlib.import_module("qcompiler.capture")  # the module (the package exports a function of that name)
    captured: dict[str, bytes] = {}
    original = capture.capture_bundled

    def memo(bundled):
        if bundled.name not in captured:
            captured[bundled.name] = ir.serde.serialize_model(original(bundled)).SerializeToString()
        import onnx

        return ir.serde.deserialize_model(onnx.load_from_string(captured[bundled.name]))

    capture.capture_bundled = memo


def time_round(session, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill step and of `new_tokens` - 1 greedy decode steps."""
    session.reset()
    start = time.perf_counter()
    token = int(np.argmax(session.step(prompt)[-1]))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(np.argmax(session.step(np.asarray([token]))[-1]))
    return prefill, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    common.quiet()
    threads = common.fix_threads(args.threads)
    from qcompiler.compiler import compile as qcompile
    from qcompiler.decode import CachedSession
    from qcompiler.evaluate import evaluate
    from qcompiler.lm_artifact import read_layout
    from qcompiler.models import smollm2

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
    prompt = np.asarray(smollm2.encode(held_out)[: args.prompt_tokens], dtype=np.int64)

    capture_once()
    artifacts, compiled = {}, {}
    for name in names:
        folder = build / name.replace(" ", "-")
        if args.reuse and (folder / "manifest.json").is_file():
            manifest = json.loads((folder / "manifest.json").read_text())
            artifacts[name] = folder
            compiled[name] = {"pipeline": manifest["pipeline"], "compile_s": None, "reused": True,
                              "effective_bits": manifest.get("effective_bits_per_weight")}
            continue
        start = time.perf_counter()
        result = qcompile("smollm2-135m-kv", build / name.replace(" ", "-"), pipeline=PIPELINES[name],
                          calibration=None if name == "float32" else str(calib), calib_count=args.calib_count,
                          threads=args.threads, drift=False)
        artifacts[name] = result.output
        compiled[name] = {"pipeline": result.pipeline, "compile_s": round(time.perf_counter() - start, 1),
                          "effective_bits": result.manifest.get("effective_bits_per_weight")}
        print(f"compiled {name} in {compiled[name]['compile_s']} s", flush=True)

    sessions = {name: CachedSession(path / "model.onnx", read_layout(path), args.threads) for name, path in artifacts.items()}
    for session in sessions.values():  # warm-up
        time_round(session, prompt[:8], 4)
    samples = {name: {"prefill": [], "decode": []} for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            prefill, decode = time_round(sessions[name], prompt, args.new_tokens)
            samples[name]["prefill"].append(len(prompt) / prefill)
            samples[name]["decode"].append((args.new_tokens - 1) / decode)

    rows, results = [], {}
    for name in names:
        quality = evaluate(artifacts[name], "perplexity", held_out_file, count=args.windows, window=args.window, threads=args.threads)
        results[name] = {
            **compiled[name],
            "prefill_tokens_per_s": round(statistics.median(samples[name]["prefill"]), 1),
            "decode_tokens_per_s": round(statistics.median(samples[name]["decode"]), 1),
            "prefill_samples": [round(v, 1) for v in samples[name]["prefill"]],
            "decode_samples": [round(v, 1) for v in samples[name]["decode"]],
            "perplexity": quality["perplexity_compiled"],
            "perplexity_float_torch": quality["perplexity_float"],
        }
    base = results.get("float32", {}).get("decode_tokens_per_s")
    for name, res in results.items():
        res["decode_vs_float32"] = round(res["decode_tokens_per_s"] / base, 3) if base else None
        rows.append([name, res["effective_bits"], res["prefill_tokens_per_s"], res["decode_tokens_per_s"], res["decode_vs_float32"], res["perplexity"]])
    print(common.table(["pipeline", "bits/weight", "prefill tok/s", "decode tok/s", "decode vs float32", "held-out ppl"], rows))
    body = {
        "command": common.command_line(),
        "settings": {"rounds": args.rounds, "prompt_tokens": int(len(prompt)), "new_tokens": args.new_tokens,
                     "windows": args.windows, "window": args.window, "calib_count": args.calib_count, "batch": 1},
        "threads": threads,
        "results": results,
        "machine": common.machine(),
        "packages": common.packages(),
        "git": common.git_state(),
        "load_average": list(__import__("os").getloadavg()),
    }
    common.write_json(args.out, body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
