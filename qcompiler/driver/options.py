"""Every option of a compile, declared once.

`CompileOptions` is what `qcompiler.compile` accepts (its keywords are the fields past `source` and
`output`) and what a `Session` runs with. Each field's metadata (`option(...)`, an `OptionInfo`)
says how the option is spelled elsewhere: its command-line flags (none: the API only), whether a
`--config` file may give it (its key is the long flag without dashes, `calib-count` or
`calib_count`), its help text, choices, metavar and value kind. From these are derived:

- the flags of `qcompiler compile` (`qcompiler.tools.cli.add_option_flags`),
- the keys and value types of a config file (`qcompiler.tools.buildstep.config_keys`),
- the keyword check and signature of `qcompiler.compile` (`check_keywords`, `api_signature`).

Options only the build step knows (config file, gates, dry run) are declared the same way in
`qcompiler.tools.buildstep.BuildOptions`. A new option is one field here (or there) and the code
that reads it.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from qcompiler.errors import UserError, shown
from qcompiler.pipeline.passbase import did_you_mean


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """How one option is spelled outside the API."""

    help: str = ""
    flags: tuple[str, ...] = ()  # command-line flags, long one last; a bare name: positional; (): the API only
    config: bool = True  # a config file may give it (when it has flags)
    kind: type = str  # its value on the command line and in config files: str, int, bool (a switch) or list (repeatable)
    positive: bool = False  # an int of at least 1
    path: bool = False  # in a config file: relative to the file
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    negated: bool = False  # a switch that sets the option false (`--no-drift` is drift=False)

    @property
    def positional(self) -> bool:
        return bool(self.flags) and not self.flags[0].startswith("-")

    @property
    def dest(self) -> str:
        """The name on the command line's namespace and, kebab-cased, the config key."""
        return self.flags[-1].lstrip("-").replace("-", "_")


def option(default: Any = None, help: str = "", **info: Any) -> Any:
    """A dataclass field with its `OptionInfo` as metadata."""
    meta = {"option": OptionInfo(help=help, **info)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def info_of(field: dataclasses.Field) -> OptionInfo:
    return field.metadata.get("option", OptionInfo())


def command_line_fields(cls) -> list[tuple[dataclasses.Field, OptionInfo]]:
    """The fields of options class `cls` that have command-line flags, with their `OptionInfo`."""
    return [(f, info_of(f)) for f in dataclasses.fields(cls) if info_of(f).flags]


def cli_default(field: dataclasses.Field) -> Any:
    """What the command line means when the option is not given (a negated switch: not given)."""
    info = info_of(field)
    if info.negated:
        return False
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def from_command_line(cls, values: dict[str, Any], **overrides: Any):
    """An instance of options class `cls` from command-line values keyed by `dest` (a negated
    switch inverted); fields without flags keep their defaults unless in `overrides`."""
    kwargs = {}
    for field, info in command_line_fields(cls):
        if info.dest in values:
            kwargs[field.name] = (not values[info.dest]) if info.negated else values[info.dest]
    kwargs.update(overrides)
    return cls(**kwargs)


def check_choices(options) -> None:
    """Options with choices hold one of them (one line naming them otherwise)."""
    for field in dataclasses.fields(options):
        info, value = info_of(field), getattr(options, field.name)
        if info.choices is not None and value is not None and value not in info.choices:
            key = (info.dest if info.flags else field.name).replace("_", "-")
            raise UserError(f"{key} must be {' or '.join(repr(c) for c in info.choices)}, got '{shown(value)}'")


@dataclasses.dataclass
class CompileOptions:
    """What a compile is asked to do (see `qcompiler.driver.compiler.compile` for each option's
    meaning in the API)."""

    source: Any = option(None, "bundled model name, path to .onnx, or package.module:function", flags=("source",), path=True)
    output: str | os.PathLike | None = option(None, "artifact directory (replaced atomically)", flags=("-o", "--output"), path=True)
    target: str = option("ort", "backend: ort (default; ONNX Runtime model) or triton (a Python package of Triton kernels and torch)",
                         flags=("--target",))
    pipeline: str = option("default", "pipeline string, preset name or @file (default: default)", flags=("--pipeline",))
    example_inputs: Any = option(None)  # an nn.Module source's example inputs
    dynamic_shapes: Any = option(None)  # and its dynamic shapes
    dump_ir: str | os.PathLike | None = option(None, "write the IR after every pass, numbered, plus stats.json", flags=("--dump-ir",),
                                               path=True, metavar="DIR")
    print_ir: str | None = option(None, "log the IR after every pass or after changing ones", flags=("--print-ir",),
                                  choices=("all", "changed"))
    report: str | os.PathLike | None = option(
        None, "write the quantization report: FILE.json, or FILE.html (an offline page) with FILE.json beside it; may lie inside the output directory",
        flags=("--report",), path=True, metavar="FILE")
    probe_inputs: Any = option(None)  # dict[str, np.ndarray]: the batch drift and the report measure on
    calibration: Any = option(None, "calibration data: .npz of inputs, .txt/.tsv text, images or a folder of them", flags=("--calib",),
                              path=True, metavar="FILE")
    calib_count: int = option(128, "calibration samples to use (default 128)", flags=("--calib-count",), kind=int, positive=True, metavar="N")
    threads: int | None = option(None, "ONNX Runtime threads for passes that run the model", flags=("--threads",), kind=int, positive=True,
                                 metavar="N")
    drift: bool = option(True, "skip measuring output drift after each pass", flags=("--no-drift",), kind=bool, negated=True)
    cache_dir: str | os.PathLike | None = option(
        None, "calibration statistics cache (default $QCOMPILER_CACHE or ~/.cache/qcompiler)", flags=("--cache-dir",), path=True, metavar="DIR")
    force: bool = option(False, "replace an existing output folder or report that qcompiler did not write", flags=("--force",), kind=bool)
    eval_data: Any = option(None, "task data for the quality gates (default: the --calib file)", flags=("--eval-data",), path=True, metavar="FILE")
    require_data_probe: bool = option(False)  # refuse a synthetic probe (the output-cosine gate)
    float_type: str | None = option(
        None, "float type of the emitted model's inputs, outputs and float weights: source (default: the source model's float32, float16 or bfloat16) or float32",
        flags=("--float-type",))
    dtype: str | None = option(None, "float type a torch source is captured in: float32 (default), float16 or bfloat16", flags=("--dtype",))
    workers: int | None = option(
        None, "fan independent measurements out on a local Ray instance of N processes (pip install \"qcompiler[ray]\"); the artifact is the same",
        flags=("--workers",), kind=int, positive=True, metavar="N")
    ray_address: str | None = option(
        None, "run the fanned-out measurements on the Ray cluster at ADDR (ray://head:10001, or auto for one started with ray start)",
        flags=("--ray-address",), metavar="ADDR")
    block_sequential: bool = option(
        False, "calibrate one block (transformer layer, conv stage) at a time: one block's weights in memory, the same artifact; large models always do",
        flags=("--block-sequential",), kind=bool)


POSITIONAL = ("source", "output")  # `compile(source, output, **options)`

DIAGNOSIS_OPTIONS = ("calibration", "calib_count", "threads", "cache_dir", "workers", "ray_address", "dtype", "example_inputs",
                     "dynamic_shapes", "probe_inputs")
"""The options `qcompiler.tools.doctor.diagnose` takes by name, as `compile` does; those with flags
are `qcompiler doctor`'s flags too."""


def api_keywords() -> list[str]:
    return [f.name for f in dataclasses.fields(CompileOptions) if f.name not in POSITIONAL]


def check_keywords(given: dict[str, Any], function: str = "compile", known: tuple[str, ...] | None = None) -> None:
    """A keyword `function` does not take (not one of `known`, default every option of
    `qcompiler.compile`): a TypeError naming the nearest one, as Python's own."""
    known = list(known) if known is not None else api_keywords()
    for name in given:
        if name not in known:
            raise TypeError(f"{function}() got an unexpected keyword argument '{name}'{did_you_mean(name, known)}")


def api_signature(returns: Any) -> inspect.Signature:
    """`compile(source, output, *, <every other field with its default>)`."""
    params = []
    for field in dataclasses.fields(CompileOptions):
        if field.name in POSITIONAL:
            params.append(inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=field.type))
        else:
            default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=field.type))
    return inspect.Signature(params, return_annotation=returns)
