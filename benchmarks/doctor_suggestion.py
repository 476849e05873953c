"""Does `qcompiler doctor`'s suggestion pay? Perplexity before and after applying it.

    python benchmarks/doctor_suggestion.py                       # smollm2-135m at mixed{avg-bits=3}
    python benchmarks/doctor_suggestion.py --budget 3.25 --windows 4
    python benchmarks/doctor_suggestion.py --probe-batches 2        # the doctor measures on 2 x 4 x 128 tokens

For smollm2-135m: captures the float model once, runs `doctor` on `mixed{avg-bits=B}` (calibration:
the same windows as `mixed_pareto.py`, never overlapping the evaluation text; the doctor measures on
the first calibration batch, 4 x 128 tokens, by the KL divergence of next-token distributions), compiles the pipeline as given and as suggested, and evaluates
both (and, when the doctor also adds learned rounding, its suggestion without that pass; and
`mixed{avg-bits=B+extra}`, the same extra bits spent evenly) by perplexity over the first
N 256-token windows of the first three quarters of the WikiText excerpt, 2 ONNX Runtime threads.
Prints a table and writes `benchmarks/results/doctor_suggestion.json`.

Target (issue: report and doctor): the suggestion recovers at least half of the perplexity gap to
float at no more than +0.25 effective bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mixed_pareto as mp  # noqa: E402  (same data splits, compile and evaluation helpers)
from common import add_mixed_options, command_line, git_state, machine, packages, table, with_mixed_options  # noqa: E402

MODEL = "smollm2-135m"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--max-extra-bits", type=float, default=0.25)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--probe-batches", type=int, default=1, help="calibration batches the doctor measures on (4 x 128 tokens each)")
    parser.add_argument("--out", type=Path, default=mp.RESULTS / "doctor_suggestion.json")
    add_mixed_options(parser)
    args = parser.parse_args(argv)
    mp.quiet()

    import qcompiler
    from qcompiler.tools.doctor import diagnose, format_diagnosis

    with tempfile.TemporaryDirectory(prefix="qc-doctor-") as tmp:
        work = Path(tmp)
        head, _ = mp.wikitext_split()
        eval_text = work / "eval-head.txt"
        eval_text.write_text(head, encoding="utf-8")
        mp.log("capture the float model")
        qcompiler.compile(MODEL, work / "float", pipeline="default", drift=False, threads=mp.THREADS)
        float_path = work / "float" / "model.onnx"
        batches, calib_desc = mp.calibration(MODEL)
        pipeline = with_mixed_options(f"mixed{{avg-bits={args.budget:g}}}", args.mixed_options)

        mp.log(f"doctor {pipeline}")
        start = time.perf_counter()
        diagnosis = diagnose(str(float_path), pipeline, calibration=batches, threads=mp.THREADS,
                             max_extra_bits=args.max_extra_bits, metric="kl", probe_batches=args.probe_batches)
        doctor_s = time.perf_counter() - start
        print(format_diagnosis(diagnosis))
        suggested = diagnosis["suggestion"]["pipeline"]

        variants = {"as given": pipeline, "doctor's suggestion": suggested,
                    "doctor's suggestion, bits only": diagnosis["suggestion"].get("pipeline_bits_only"),
                    "same extra bits, evenly": with_mixed_options(f"mixed{{avg-bits={args.budget + args.max_extra_bits:g}}}",
                                                                  args.mixed_options)}
        rows = {}
        for label, spec in variants.items():
            if spec is None:
                continue
            mp.log(f"compile + evaluate: {label}")
            row = mp.compile_ours(float_path, work / label.replace(" ", "-").replace("'", ""), spec, batches)
            if "error" not in row:
                row.update(mp.evaluate_ours(MODEL, Path(row["artifact"]), eval_text, args.windows))
            rows[label] = row

    base, sugg = rows["as given"], rows.get("doctor's suggestion", {})
    float_ppl = base["perplexity_float_torch"]
    recovered = extra = None
    if "perplexity" in sugg:
        recovered = (base["perplexity"] - sugg["perplexity"]) / (base["perplexity"] - float_ppl)
        extra = sugg["effective_bits"] - base["effective_bits"]
    gap = base["perplexity"] - float_ppl
    for r in rows.values():
        if "perplexity" in r:
            r["gap_recovered"] = (base["perplexity"] - r["perplexity"]) / gap
    lines = [(label, f"{r.get('effective_bits', float('nan')):.4f}", f"{r.get('perplexity', float('nan')):.3f}",
              f"{r.get('gap_recovered', float('nan')):.1%}", f"{r.get('compile_s', 0):.1f}") for label, r in rows.items()]
    lines.append(("float32", "32", f"{float_ppl:.3f}", "100%", "-"))
    print(table(["variant", "effective bits", f"perplexity ({args.windows} windows)", "gap recovered", "compile s"], lines))
    if recovered is not None:
        print(f"suggestion: {diagnosis['suggestion']['change']}; recovers {recovered:.1%} of the perplexity gap "
              f"at {extra:+.4f} effective bits (target: >= 50% at <= +{args.max_extra_bits:g})")
    result = {
        "model": MODEL, "pipeline": pipeline, "windows": args.windows, "calibration": calib_desc, "probe_batches": args.probe_batches,
        "doctor_seconds": round(doctor_s, 1), "diagnosis": diagnosis, "rows": rows,
        "gap_recovered": recovered, "extra_effective_bits": extra,
        "target_met": bool(recovered is not None and recovered >= 0.5 and extra <= args.max_extra_bits),
        "machine": machine(), "packages": packages(), "threads": mp.THREADS, "git": git_state(), "command": command_line(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
