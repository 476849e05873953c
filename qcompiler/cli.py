"""The `qcompiler` command line.

    qcompiler compile SOURCE -o DIR [--target ort|triton] [--pipeline SPEC] [--dump-ir DIR]
                                    [--print-ir all|changed] [--report FILE]
    qcompiler eval DIR --task sts|perplexity|segmentation [--data FILE] [--json]
    qcompiler passes                 every pass: name, one-line doc, options with defaults
    qcompiler show FILE              a model (.onnx) as IR text

Exit codes: 0 ok; 1 internal error; 2 bad input or usage; 3 failed quality gate.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qcompiler.errors import QCompilerError, UserError, first_line

log = logging.getLogger("qcompiler")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompiler", description="A graph-level quantization compiler.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", default=None,
                        help="full tracebacks on error (same as QCOMPILER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    comp = sub.add_parser("compile", help="compile a model into an artifact directory")
    comp.add_argument("source", help="bundled model name, path to .onnx, or package.module:function")
    comp.add_argument("-o", "--output", required=True, help="artifact directory (replaced atomically)")
    comp.add_argument("--target", default="ort", help="backend: ort (default; ONNX Runtime model) or triton (a Python package of Triton kernels and torch)")
    comp.add_argument("--pipeline", default="default", help="pipeline string, preset name or @file (default: default)")
    comp.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass, numbered, plus stats.json")
    comp.add_argument("--print-ir", choices=("all", "changed"), help="log the IR after every pass or after changing ones")
    comp.add_argument("--report", metavar="FILE", help="write a JSON report (may lie inside the output directory)")
    comp.add_argument("--calib", metavar="FILE", help="calibration data: .npz of inputs, .txt/.tsv text, images or a folder of them")
    comp.add_argument("--calib-count", type=int, default=128, metavar="N", help="calibration samples to use (default 128)")
    comp.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime threads for passes that run the model")
    comp.add_argument("--no-drift", action="store_true", help="skip measuring output drift after each pass")

    ev = sub.add_parser("eval", help="the float model and an artifact side by side on the model's task")
    ev.add_argument("artifact", help="an artifact directory written by `qcompiler compile`")
    ev.add_argument("--task", required=True, choices=("sts", "perplexity", "segmentation"))
    ev.add_argument("--data", help="task data (sts: TSV with sent1, sent2, score; perplexity: text)")
    ev.add_argument("--count", type=int, help="use only the first N pairs / windows / images")
    ev.add_argument("--window", type=int, default=256, help="perplexity window length in tokens (default 256)")
    ev.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ev.add_argument("--model", help="the bundled float model, when the artifact was compiled from an ONNX file of it")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    sub.add_parser("passes", help="list every pass and preset with its options")

    show = sub.add_parser("show", help="print a model as IR text")
    show.add_argument("path", help="path to an .onnx file")
    show.add_argument("--full", action="store_true", help="print every weight instead of shape + hash")
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = False
    try:
        args = build_parser().parse_args(argv)
        from qcompiler.compiler import debug_enabled

        debug = debug_enabled(args.debug)
        _configure_logging(args.verbose, args.quiet, debug)
        return _COMMANDS[args.command](args)
    except QCompilerError as exc:
        if debug:
            log.exception("error")
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # an internal error: one line, exit 1, traceback with --debug
        if debug:
            log.exception("internal error")
        _error(f"internal error: {type(exc).__name__}: {first_line(str(exc))}; rerun with --debug for the traceback")
        return 1


def _error(message: str) -> None:
    sys.stderr.write(f"qcompiler: error: {message}\n")


def _configure_logging(verbose: int, quiet: bool, debug: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if (verbose > 1 or debug) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("qcompiler")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.WARNING)
    import warnings

    if not verbose:
        warnings.filterwarnings("ignore")


def _cmd_compile(args) -> int:
    from qcompiler.compiler import compile

    result = compile(
        args.source,
        args.output,
        target=args.target,
        pipeline=args.pipeline,
        dump_ir=args.dump_ir,
        print_ir=args.print_ir,
        report=args.report,
        calibration=args.calib,
        calib_count=args.calib_count,
        threads=args.threads,
        drift=not args.no_drift,
    )
    _summary(result)
    return 0


def _summary(result) -> None:
    manifest = result.manifest
    log.info("pipeline: %s", result.pipeline)
    for record in result.records:
        drift = record.drift or {}
        log.info(
            "  %-14s %6.2f s  %-9s  drift max|d|=%.3g cos=%.6f",
            record.name, record.seconds, "modified" if record.modified else "unchanged",
            drift.get("max_abs", float("nan")), drift.get("cosine", float("nan")),
        )
    bits = manifest.get("effective_bits_per_weight")
    log.info(
        "artifact: %s  (%s, %d weights, %.2f effective bits per weight)",
        result.output, ", ".join(manifest["files"]), manifest.get("weights", 0), bits if bits is not None else float("nan"),
    )


def _cmd_eval(args) -> int:
    import json

    from qcompiler.evaluate import evaluate

    result = evaluate(args.artifact, args.task, args.data, count=args.count, window=args.window, threads=args.threads, model=args.model)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    rows = [(k, v) for k, v in result.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in rows))
    return 0


def _cmd_passes(args) -> int:
    from qcompiler.passbase import all_passes
    from qcompiler.pipeline import PRESETS, format_value

    lines = []
    for name, cls in all_passes().items():
        lines.append(f"{name}: {cls.summary()}")
        props = []
        if cls.required:
            props.append(f"requires {', '.join(sorted(cls.required))}")
        if cls.provided:
            props.append(f"provides {', '.join(sorted(cls.provided))}")
        if props:
            lines.append(f"    ({'; '.join(props)})")
        for opt in cls.options():
            lines.append(f"    {opt.key}={format_value(opt.default)}  {opt.doc}")
    lines.append("")
    lines.append("presets:")
    for name, preset in PRESETS.items():
        params = " ".join(f"{k}={v}" for k, v in preset.params.items())
        lines.append(f"  {name}{'{' + params + '}' if params else ''} = {preset.template}  ({preset.doc})")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_show(args) -> int:
    from qcompiler.ir import load, to_text

    model = load(args.path, convert=False)
    sys.stdout.write(to_text(model, elide_over=2**62 if args.full else 64))
    return 0


_COMMANDS = {"compile": _cmd_compile, "eval": _cmd_eval, "passes": _cmd_passes, "show": _cmd_show}


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
