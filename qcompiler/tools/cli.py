"""The `qcompiler` command line.

    qcompiler compile SOURCE -o DIR [--target ort|triton] [--pipeline SPEC] [--dump-ir DIR]
                                    [--print-ir all|changed] [--report FILE]
    qcompiler eval DIR --task sts|perplexity|segmentation|denoise|classify [--data FILE] [--sigma S] [--json]
    qcompiler generate DIR --prompt TEXT [--max-new-tokens N] [--temperature T --seed S] [--json]
    qcompiler passes                 every pass: name, one-line doc, options with defaults
    qcompiler opt FILE.onnxtxt -p SPEC [-o OUT.onnxtxt]   IR text in, the passes of SPEC, IR text out
    qcompiler show FILE              a model (.onnx) as IR text

Exit codes: 0 ok; 1 internal error; 2 bad input or usage; 3 failed quality gate; 130 Ctrl-C and
143 SIGTERM (both after removing what was half written).
"""

from __future__ import annotations

import argparse
import logging
import sys

from qcompiler.errors import QCompilerError, UserError, disk_full, first_line, one_line, shown

log = logging.getLogger("qcompiler")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        raise UserError(f"{message}; see `{self.prog} --help`")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{shown(text)}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def compile_option_classes() -> tuple[type, type]:
    """Where the flags of `compile` are declared: the compile's options and the build step's."""
    from qcompiler.driver.options import CompileOptions
    from qcompiler.tools.buildstep import BuildOptions

    return CompileOptions, BuildOptions


def add_option_flags(parser: argparse.ArgumentParser, options: type, names: tuple[str, ...] | None = None, defaults: bool = False) -> None:
    """The flags of options class `options` (those of its fields in `names`, default all that have
    flags), from each field's `OptionInfo`. Not given, an option is None (so that a config file
    can fill it) unless `defaults`: then its default."""
    from qcompiler.driver.options import cli_default, command_line_fields

    for field, info in command_line_fields(options):
        if names is not None and field.name not in names:
            continue
        kwargs: dict = {"help": info.help}
        if info.positional:
            kwargs["nargs"] = "?"
        elif info.kind is bool:
            kwargs["action"] = "store_true"
        elif info.kind is list:
            kwargs["action"] = "append"
        elif info.kind is int:
            kwargs["type"] = positive_int if info.positive else int
        if info.choices is not None:
            kwargs["choices"] = info.choices
        if info.metavar is not None:
            kwargs["metavar"] = info.metavar
        if not info.positional:
            kwargs["default"] = cli_default(field) if defaults else None
        parser.add_argument(*info.flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompiler", description="A graph-level quantization compiler.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", default=None,
                        help="full tracebacks on error (same as QCOMPILER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from qcompiler.driver.options import DIAGNOSIS_OPTIONS

    compile_options, build_options = compile_option_classes()
    comp = sub.add_parser("compile", help="compile a model into an artifact directory")
    add_option_flags(comp, compile_options)
    add_option_flags(comp, build_options)

    ev = sub.add_parser("eval", help="the float model and an artifact side by side on the model's task")
    ev.add_argument("artifact", help="an artifact directory written by `qcompiler compile`")
    ev.add_argument("--task", required=True, choices=("sts", "perplexity", "segmentation", "denoise", "classify", "segmentation3d"))
    ev.add_argument("--data", help="task data (sts: TSV with sent1, sent2, score; perplexity: text; denoise: an image or a folder of them; segmentation3d: a NIfTI or .npy volume)")
    ev.add_argument("--sigma", type=float, help="denoise: the noise level added, 0..255 scale (default 25)")
    ev.add_argument("--count", type=positive_int, help="use only the first N pairs / windows / images")
    ev.add_argument("--window", type=int, default=256, help="perplexity window length in tokens (default 256)")
    ev.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    ev.add_argument("--model", help="the bundled float model, when the artifact was compiled from an ONNX file of it")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    gen = sub.add_parser("generate", help="continue a prompt with a compiled causal LM (KV cache), streaming the text")
    gen.add_argument("artifact", help="an artifact directory of a causal LM with a KV cache (e.g. compiled from smollm2-135m-kv)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate at most (default 64, or what the model's positions leave)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy; above 0: sample from softmax(logits / T)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampling generator (default 0)")
    gen.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads")
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, tokens/s) instead of streaming")

    doc = sub.add_parser("doctor", help="rank the layers and passes that cost accuracy and suggest a pipeline change")
    doc.add_argument("source", help="bundled model name, path to .onnx, or package.module:function")
    doc.add_argument("--pipeline", required=True, help="the pipeline to diagnose (string, preset or @file)")
    add_option_flags(doc, compile_options, DIAGNOSIS_OPTIONS, defaults=True)
    doc.add_argument("--max-extra-bits", type=float, default=0.25, help="average stored bits the suggestion may add (default 0.25)")
    doc.add_argument("--top", type=int, default=15, help="layers to list (default 15)")
    doc.add_argument("--metric", default="auto", choices=("auto", "mse", "kl"),
                     help="output error: relative MSE, or KL of the softmax (auto: kl for a bundled causal LM)")
    doc.add_argument("--probe-batches", type=int, default=1, metavar="N",
                     help="calibration batches the layers are measured on, joined (default 1; each run costs in proportion)")
    doc.add_argument("--bits-only", action="store_true",
                     help="suggest bit-width changes only, not an added pass such as learned rounding (which costs compile time)")
    doc.add_argument("--apply", metavar="FILE", help="write the suggested pipeline to FILE (use it with --pipeline @FILE)")
    doc.add_argument("--force", action="store_true", help="let --apply overwrite a file that doctor did not write")
    add_option_flags(doc, build_options, ("no_cache",), defaults=True)
    doc.add_argument("--json", action="store_true", help="print the diagnosis as JSON")

    sub.add_parser("passes", help="list every pass and preset with its options")

    opt = sub.add_parser("opt", help="IR text in, IR text out: run exactly the passes of a pipeline spec")
    opt.add_argument("path", help="an .onnxtxt file of IR text, or - for standard input")
    opt.add_argument("-p", "--pipeline", default="", metavar="SPEC", help="the passes to run (none: parse, verify, print)")
    opt.add_argument("-o", "--output", metavar="FILE", help="write the IR text here instead of standard output")
    opt.add_argument("--calib-batches", type=int, default=4, metavar="N",
                     help="synthetic calibration batches for passes that need data (default 4, seeds 0..N-1)")
    opt.add_argument("--elide", action="store_true",
                     help="print tensors over 64 elements, and float16/bfloat16 ones, as dtype, shape and hash "
                          "(the output then no longer parses back to the same weights)")
    opt.add_argument("--elide-over", type=int, metavar="N", help="as --elide, for tensors over N elements")

    show = sub.add_parser("show", help="print a model as IR text")
    show.add_argument("path", help="path to an .onnx file")
    show.add_argument("--full", action="store_true", help="print every weight instead of shape + hash (over 64 elements, or float16/bfloat16)")
    for command in sub.choices.values():  # after the command too, where an error's "rerun with --debug" leads
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="full tracebacks on error (same as QCOMPILER_DEBUG=1)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that outputs are cleaned up as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    debug = False
    try:
        args = build_parser().parse_args(argv)
        from qcompiler.driver.compiler import debug_enabled

        debug = debug_enabled(args.debug)
        _configure_logging(args.verbose, args.quiet, debug)
        return _COMMANDS[args.command](args)
    except QCompilerError as exc:
        if debug:
            log.exception("error")
        _error(str(exc))
        return exc.exit_code
    except Terminated:
        _error("terminated")
        return 143
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            return _internal_error(exc, debug)
        if debug:
            log.exception("disk full")
        _error(str(full))
        return full.exit_code


def _internal_error(exc: BaseException, debug: bool) -> int:
    """An internal error: one line, exit 1, the traceback with --debug."""
    if debug:
        log.exception("internal error")
    _error(f"internal error: {type(exc).__name__}: {first_line(str(exc))}; rerun with --debug for the traceback")
    return 1


def _error(message: str) -> None:
    sys.stderr.write(f"qcompiler: error: {one_line(message)}\n")


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


def resolve_compile_options(args) -> argparse.Namespace:
    """Command line over config file over defaults (the options' own, `compile_option_classes`);
    checks the values a config file may get wrong and that source and output are given."""
    from qcompiler.driver.options import check_choices, cli_default, command_line_fields, from_command_line
    from qcompiler.tools import buildstep

    classes = compile_option_classes()
    config = {}
    if args.config:
        config = buildstep.load_config(args.config, *buildstep.config_keys(*classes))
    merged = {}
    for options in classes:
        for field, info in command_line_fields(options):
            given = getattr(args, info.dest, None)
            merged[info.dest] = given if given is not None else config.get(info.dest, cli_default(field))
    for options in classes:
        check_choices(from_command_line(options, merged))
    for options in classes:
        for _, info in command_line_fields(options):
            if info.positive and merged[info.dest] is not None and merged[info.dest] < 1:
                raise UserError(f"'{info.dest.replace('_', '-')}' must be a positive integer, got {merged[info.dest]}")
    if not merged["source"]:
        raise UserError("compile needs a SOURCE (a bundled model name, an .onnx path or package.module:function), or 'source' in --config")
    if not merged["output"]:
        raise UserError("compile needs -o DIR (or 'output' in --config)")
    return argparse.Namespace(**merged)


def _cmd_compile(args) -> int:
    from pathlib import Path

    from qcompiler.analysis.calib_cache import default_dir
    from qcompiler.driver.compiler import compile_with
    from qcompiler.driver.options import CompileOptions, from_command_line
    from qcompiler.tools import buildstep

    opts = resolve_compile_options(args)
    gates = buildstep.parse_gates(opts.fail_under, opts.fail_over)
    task = _task_of(opts.source) if gates else None
    buildstep.check_gates_apply(gates, task)
    if opts.no_drift and any(g.metric.name == "output-cosine" for g in gates):
        raise UserError("the output-cosine gate reads the drift measured after each pass; drop --no-drift")
    cache_dir = None if opts.no_cache else Path(opts.cache_dir) if opts.cache_dir else default_dir()
    _check_outputs(opts, args.config)
    options = from_command_line(CompileOptions, vars(opts), cache_dir=cache_dir,
                                require_data_probe=any(g.metric.name == "output-cosine" for g in gates))
    if opts.dry_run:  # the session's checks of every option and its completed pipeline; nothing slow, nothing installed asked for
        from qcompiler.driver.session import Session

        sys.stdout.write(buildstep.describe_dry_run(opts, Session(options, host_checks=False).spec, cache_dir, gates))
        return 0
    result = compile_with(options)
    _summary(result)
    if gates:
        outcome = buildstep.evaluate_gates(
            gates, result.output, result.records, task, buildstep.gate_data(task, opts.eval_data, opts.calib),
            opts.eval_count, opts.threads
        )
        for row in outcome["gates"]:
            log.info("gate %-16s %-8s %g: %s  %s", row["metric"], row["direction"], row["threshold"], row["value"],
                     "pass" if row["passed"] else "FAIL")
        if opts.report:
            from qcompiler.driver.compiler import add_to_report

            add_to_report(Path(opts.report), {"quality": outcome})
        buildstep.raise_if_failed(gates, outcome, result.output)
    return 0


def _check_outputs(opts, config: str | None) -> None:
    """Before anything slow: the outputs may not delete the inputs, the config or what is not ours."""
    from qcompiler.driver.outputs import check_outputs, protected_sources
    from qcompiler.tools.report import report_paths

    protected = protected_sources(opts.source, opts.calib) + [("config file", config), ("evaluation data", opts.eval_data)]
    report = report_paths(opts.report) if opts.report else None
    check_outputs(opts.output, dump_ir=opts.dump_ir, report=report, protected=protected, force=opts.force)


def _task_of(source: str) -> str | None:
    from qcompiler import models

    return models.get(source).task if source in models.names() else None


def _summary(result) -> None:
    manifest = result.manifest
    log.info("pipeline: %s", result.pipeline)
    if result.probe is not None and any(r.drift for r in result.records):
        log.info("drift measured on: %s%s", result.probe.source, f" ({result.probe.note})" if result.probe.note else "")
    for record in result.records:
        drift = record.drift or {}
        measured = f"drift max|d|={drift['max_abs']:.3g} cos={drift['cosine']:.6f}" if "max_abs" in drift and "cosine" in drift else ""
        line = f"  {record.name:<14} {record.seconds:6.2f} s  {'modified' if record.modified else 'unchanged':<9}  {measured}"
        log.info("%s", line.rstrip())  # no drift columns when it was not measured (--no-drift, weights too large)
    bits = manifest.get("effective_bits_per_weight")
    with_tables = manifest.get("effective_bits_per_weight_with_tables")
    log.info(
        "artifact: %s  (%s, %d weights, %.2f effective bits per weight%s)",
        result.output, ", ".join(manifest["files"]), manifest.get("weights", 0), bits if bits is not None else float("nan"),
        f"; {with_tables:.2f} with the embedding tables" if with_tables is not None else "",
    )


def _cmd_eval(args) -> int:
    import json

    from qcompiler.tools.evaluate import evaluate

    result = evaluate(args.artifact, args.task, args.data, count=args.count, window=args.window, threads=args.threads, model=args.model,
                      sigma=args.sigma)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    rows = [(k, v) for k, v in result.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in rows))
    return 0


def _cmd_generate(args) -> int:
    import json

    from qcompiler.tools.decode import generate

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(args.artifact, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      seed=args.seed, threads=args.threads, on_text=None if args.json else stream)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    sys.stdout.write("\n")
    decode = result["decode_tokens_per_s"]
    sys.stderr.write(
        f"prefill: {result['prompt_tokens']} tokens, {result['prefill_tokens_per_s']} tokens/s; "
        f"decode: {result['new_tokens']} new tokens ({result['stopped']}), {decode if decode is not None else '-'} tokens/s\n"
    )
    return 0


def _cmd_doctor(args) -> int:
    import json
    from pathlib import Path

    from qcompiler.analysis.calib_cache import default_dir
    from qcompiler.support.fileio import write_atomic
    from qcompiler.driver.options import DIAGNOSIS_OPTIONS, CompileOptions, command_line_fields
    from qcompiler.tools.doctor import diagnose, format_diagnosis

    from qcompiler.driver.outputs import SUGGESTION_MARKER, check_suggestion_file, protected_sources

    if args.apply:  # before the diagnosis, which may take minutes
        check_suggestion_file(args.apply, protected_sources(args.source, args.calib), args.force)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_dir()
    options = {field.name: getattr(args, info.dest) for field, info in command_line_fields(CompileOptions) if field.name in DIAGNOSIS_OPTIONS}
    result = diagnose(args.source, args.pipeline, max_extra_bits=args.max_extra_bits, metric=args.metric, probe_batches=args.probe_batches,
                      bits_only=args.bits_only, **{**options, "cache_dir": cache_dir})
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_diagnosis(result, args.top))
    if args.apply:
        suggested = result["suggestion"].get("pipeline")
        if not suggested:
            raise UserError(f"doctor has no change to apply ({result['suggestion']['change']}); nothing written to {shown(args.apply)}")
        header = f"{SUGGESTION_MARKER} for {result['source']}: {result['suggestion']['change']}\n"
        write_atomic(Path(args.apply), header + suggested + "\n")
        log.info("wrote the suggested pipeline to %s; compile with --pipeline @%s", shown(args.apply), shown(args.apply))
    return 0


def _cmd_passes(args) -> int:
    from qcompiler.ir.meta import Prop
    from qcompiler.pipeline.spec import PRESETS, all_passes, format_value

    lines = []
    for name, cls in all_passes().items():
        lines.append(f"{name}: {cls.summary()}")
        props = []
        if cls.required:
            props.append(f"requires {', '.join(sorted(cls.required))}")
        if cls.required_one_of:
            props.append(f"requires one of {', '.join(sorted(cls.required_one_of))}")
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
        for key, choices in preset.fragments.items():
            lines.append(f"    ${key.replace('-', '_')}: " + ", ".join(f"{key}={value} -> '{text}'" for value, text in choices.items()))
        for placeholder, (key, choices) in preset.derived.items():
            lines.append(f"    ${placeholder}: " + ", ".join(f"{key}={value} -> '{text}'" for value, text in choices.items())
                         + ", otherwise ''")
        for placeholder, rule in preset.thresholds.items():
            lines.append(f"    ${placeholder}: {rule}")
    lines.append("")
    lines.append("properties (what passes require and provide):")
    lines.extend(f"  {prop}: {prop.meaning}" for prop in Prop)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_show(args) -> int:
    from qcompiler.ir import ELIDE_ELEMENTS, load, to_text

    model = load(args.path, convert=False)
    sys.stdout.write(to_text(model, elide_over=None if args.full else ELIDE_ELEMENTS))
    return 0


def _cmd_opt(args) -> int:
    from pathlib import Path

    from qcompiler.ir import ELIDE_ELEMENTS
    from qcompiler.support.fileio import write_atomic
    from qcompiler.tools.opt import optimize_text

    if args.path == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.path)
        if not path.is_file():
            raise UserError(f"opt: no such file '{path}'; give an .onnxtxt file of IR text (or - for standard input)")
        text = path.read_text()
    if args.elide_over is not None and args.elide_over < 0:
        raise UserError(f"opt: --elide-over needs N of 0 or more, got {args.elide_over}")
    elide_over = args.elide_over if args.elide_over is not None else ELIDE_ELEMENTS if args.elide else None
    result = optimize_text(text, args.pipeline, args.calib_batches, elide_over)
    if args.output:
        write_atomic(args.output, result)
    else:
        sys.stdout.write(result)
    return 0


_COMMANDS = {"compile": _cmd_compile, "doctor": _cmd_doctor, "eval": _cmd_eval, "generate": _cmd_generate, "opt": _cmd_opt,
             "passes": _cmd_passes, "show": _cmd_show}


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
