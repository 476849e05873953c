"""The build-step interface of `qcompiler compile`: config files, quality gates, dry runs.

- `load_config(path)`: a TOML file whose keys are the compile command's long options (`calib-count`
  or `calib_count`), plus `source`. Relative paths are taken relative to the file. Options given
  on the command line win over the file. An unknown key is an error naming the nearest valid key.
- Quality gates: `--fail-under METRIC=VALUE` (higher is better) and `--fail-over METRIC=VALUE`
  (lower is better), repeatable. After the artifact and its report are written, the artifact is
  evaluated on its model's task and every gate checked; a missed gate exits 3. Metrics:

      sts-spearman       STS Spearman x100 of the artifact              (minilm-l6; higher)
      sts-drop           float minus artifact Spearman x100            (lower)
      sts-cosine         mean cosine of float vs artifact embeddings   (higher)
      perplexity         artifact perplexity                            (smollm2-135m; lower)
      perplexity-ratio   artifact / float perplexity                    (lower)
      dice               mean Dice of artifact vs float masks           (craft; higher)
      psnr               artifact PSNR in dB, sigma 25, held-out photos (ffdnet-*; higher)
      psnr-drop          float minus artifact PSNR in dB, sigma 25      (lower)
      ssim               artifact SSIM, sigma 25, held-out photos       (higher)
      brain-dice         lowest Dice of artifact vs float brain masks   (deepbet-brain; held-out volumes; higher)
      output-cosine      cosine of the artifact's output vs the float model's on the probe batch (the lowest
                         of any output, where there are several)
                         (real data: `qcompiler.analysis.probe`), after the last pass (any model; higher);
                         refused when only a synthetic probe is possible

- `describe_dry_run(...)`: the resolved pipeline and the paths a compile would write.
- `BuildOptions`: the options of `qcompiler compile` only the build step reads, declared as
  `qcompiler.driver.options.CompileOptions` declares the compile's; `config_keys` derives the keys
  a config file may hold from both.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from qcompiler.driver.options import command_line_fields, option
from qcompiler.errors import QualityGateError, UserError, first_line, shown
from qcompiler.pipeline.passbase import did_you_mean
from qcompiler.support.fileio import read_small_text

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclasses.dataclass
class BuildOptions:
    """The options of `qcompiler compile` that are not the compile's: the config file, the quality
    gates, the cache switch, the dry run (field metadata as in `CompileOptions`)."""

    config: str | None = option(None, "read options from a TOML file (keys: the long options; the command line wins)", flags=("--config",),
                                config=False, metavar="FILE")
    no_cache: bool = option(False, "neither read nor write the calibration cache", flags=("--no-cache",), kind=bool)
    fail_under: list[str] = option([], "exit 3 when the artifact scores below VALUE (repeatable)", flags=("--fail-under",), kind=list,
                                   metavar="METRIC=VALUE")
    fail_over: list[str] = option([], "exit 3 when a lower-is-better metric exceeds VALUE (repeatable)", flags=("--fail-over",), kind=list,
                                  metavar="METRIC=VALUE")
    eval_count: int | None = option(None, "use the first N pairs / windows / images for the gates", flags=("--eval-count",), kind=int,
                                    positive=True, metavar="N")
    dry_run: bool = option(False, "print the resolved pipeline and what would be written; compile nothing", flags=("--dry-run",), kind=bool)


def config_keys(*classes) -> tuple[dict[str, type], set[str]]:
    """The config-file keys of options classes `classes` ({dest: value kind}) and those holding paths."""
    known, paths = {}, set()
    for cls in classes:
        for _, info in command_line_fields(cls):
            if info.config:
                known[info.dest] = info.kind
                if info.path:
                    paths.add(info.dest)
    return known, paths


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    task: str | None  # None: measured during the compile (probe drift), needs no task data
    key: str  # the field of `qcompiler.tools.evaluate.evaluate`'s result
    higher_is_better: bool
    doc: str


METRICS = {
    m.name: m
    for m in (
        Metric("sts-spearman", "sts", "spearman_compiled", True, "STS Spearman x100 of the artifact"),
        Metric("sts-drop", "sts", "spearman_drop", False, "float minus artifact STS Spearman x100"),
        Metric("sts-cosine", "sts", "mean_cosine_float_vs_compiled", True, "mean cosine of float vs artifact embeddings"),
        Metric("perplexity", "perplexity", "perplexity_compiled", False, "artifact perplexity"),
        Metric("perplexity-ratio", "perplexity", "perplexity_ratio", False, "artifact perplexity / float perplexity"),
        Metric("dice", "segmentation", "dice_mean", True, "mean Dice of artifact vs float masks"),
        Metric("psnr", "denoise", "psnr_compiled", True, "artifact PSNR in dB on held-out photos at sigma 25"),
        Metric("psnr-drop", "denoise", "psnr_drop", False, "float minus artifact PSNR in dB at sigma 25"),
        Metric("ssim", "denoise", "ssim_compiled", True, "artifact SSIM on held-out photos at sigma 25"),
        Metric("brain-dice", "segmentation3d", "dice_vs_float_min", True, "lowest Dice of artifact vs float brain masks on held-out volumes"),
        Metric("output-cosine", None, "lowest_cosine", True, "cosine of artifact vs float output on the probe batch (the "
                                                             "lowest of any output, where there are several)"),
    )
}


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: Metric
    threshold: float

    @property
    def flag(self) -> str:
        return "--fail-under" if self.metric.higher_is_better else "--fail-over"

    def passes(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value >= self.threshold if self.metric.higher_is_better else value <= self.threshold

    def describe(self, value) -> str:
        relation = ">=" if self.metric.higher_is_better else "<="
        return f"{self.metric.name} {value} (needs {relation} {self.threshold:g})"


def parse_gates(fail_under: list[str] | None, fail_over: list[str] | None) -> list[Gate]:
    gates = []
    for flag, specs, higher in (("--fail-under", fail_under or [], True), ("--fail-over", fail_over or [], False)):
        for spec in specs:
            name, sep, value = str(spec).partition("=")
            name = name.strip()
            if not sep:
                raise UserError(f"{flag} takes METRIC=VALUE, got '{shown(spec)}'; e.g. {flag} {'sts-spearman=80' if higher else 'perplexity-ratio=1.05'}")
            metric = METRICS.get(name)
            if metric is None:
                raise UserError(f"unknown metric '{shown(name)}' in {flag}{did_you_mean(name, METRICS)}; metrics: {', '.join(METRICS)}")
            try:
                threshold = float(value)
            except ValueError:
                raise UserError(f"{flag} {name}=... needs a number, got '{shown(value)}'") from None
            if metric.higher_is_better != higher:
                other = "--fail-under" if metric.higher_is_better else "--fail-over"
                better = "higher" if metric.higher_is_better else "lower"
                raise UserError(f"metric '{name}' is better when {better}: gate it with {other} {name}={value}")
            gates.append(Gate(metric, threshold))
    return gates


def check_gates_apply(gates: list[Gate], task: str | None) -> None:
    """Before compiling: every gate's metric must be one the model's task produces."""
    for gate in gates:
        if gate.metric.task is not None and gate.metric.task != task:
            produced = [m.name for m in METRICS.values() if m.task in (task, None)]
            what = f"task '{task}'" if task else "a model that is not bundled (no task)"
            raise UserError(
                f"metric '{gate.metric.name}' is not produced by {what}; metrics available here: {', '.join(produced)}"
            )


# Tasks whose bundled models carry their own held-out evaluation set (`qcompiler.tools.evaluate`):
# gating them on the calibration photos would measure the artifact on what it was calibrated on.
HELD_OUT_TASKS = frozenset({"denoise", "segmentation3d"})


def gate_data(task: str | None, eval_data, calib):
    """What the gates evaluate on: `--eval-data`; else the model's own held-out set where it has one;
    else the calibration file."""
    if eval_data is not None:
        return eval_data
    return None if task in HELD_OUT_TASKS else calib


def evaluate_gates(gates: list[Gate], artifact: Path, records, task: str | None, data, count: int | None, threads: int | None) -> dict:
    """Measure each gate's metric on the artifact; returns {"evaluation": ..., "gates": [...], "passed": bool}."""
    evaluation: dict[str, Any] = {}
    if any(g.metric.task is not None for g in gates):
        from qcompiler.tools.evaluate import evaluate

        evaluation = evaluate(artifact, task, data, count=count, threads=threads)
    final_drift = (records[-1].drift if records else None) or {}  # the artifact's, never an earlier stage's
    results = []
    for gate in gates:
        source = evaluation if gate.metric.task is not None else final_drift
        value = source.get(gate.metric.key)
        value = None if value is None else round(float(value), 6)
        results.append({
            "metric": gate.metric.name, "threshold": gate.threshold,
            "direction": "at least" if gate.metric.higher_is_better else "at most",
            "value": value, "passed": gate.passes(value),
        })
    summary = {k: v for k, v in evaluation.items() if not isinstance(v, (dict, list)) and k not in ("artifact", "seconds")}
    return {"evaluation": summary, "gates": results, "passed": all(r["passed"] for r in results)}


def raise_if_failed(gates: list[Gate], outcome: dict, artifact: Path) -> None:
    failed = [(g, r) for g, r in zip(gates, outcome["gates"]) if not r["passed"]]
    if failed:
        text = "; ".join(g.describe(r["value"]) for g, r in failed)
        raise QualityGateError(f"quality gate failed: {text}; the artifact is in '{artifact}', the numbers in its report")


# ------------------------------------------------------------------------------------------------
# Config files


def load_config(path: str | os.PathLike, known: dict[str, Any], path_keys: set[str]) -> dict[str, Any]:
    """The options in TOML file `path`, as {dest: value}. `known` maps each valid dest to its
    type (bool, int, str, list); keys may be written kebab-case or snake_case."""
    path = Path(path)
    text = read_small_text(path, "config file", MAX_CONFIG_BYTES)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file '{path}' is not valid TOML: {first_line(str(exc))}; fix the line it names") from None
    except RecursionError:
        raise UserError(f"config file '{path}' nests tables or arrays too deeply; the options are flat keys") from None
    options: dict[str, Any] = {}
    valid = sorted(k.replace("_", "-") for k in known)
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise UserError(f"unknown key '{shown(key)}' in config file '{path}'{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")
        options[dest] = _config_value(key, value, known[dest], path)
    for dest in path_keys & options.keys():
        if options[dest] is not None and not _is_bundled_or_factory(dest, options[dest]):
            options[dest] = str((path.parent / os.path.expanduser(options[dest])))
    return options


MAX_CONFIG_BYTES = 1 << 20


def _config_value(key: str, value: Any, kind: Any, path: Path) -> Any:
    if kind is list:
        if isinstance(value, dict):  # [fail-under] sts-spearman = 80
            return [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, (str, int, float)):
            return [str(value)]
        if isinstance(value, list):
            return [str(v) for v in value]
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, str):
            return value
    names = {list: "a list or table", bool: "true or false", int: "an integer", str: "a string"}
    raise UserError(f"key '{key}' in config file '{path}' must be {names.get(kind, 'a string')}, got {shown(repr(value))}")


def _is_bundled_or_factory(dest: str, value: str) -> bool:
    if dest != "source":
        return False
    from qcompiler import models

    return value in models.names() or (":" in value and not value.endswith(".onnx"))


# ------------------------------------------------------------------------------------------------
# Dry run


def describe_dry_run(args, spec: str, cache_dir: Path | None, gates: list[Gate]) -> str:
    from codegen.ort.emit import EXTERNAL_WEIGHTS_FROM

    output = Path(args.output)
    lines = [f"source:   {args.source}", f"target:   {args.target}", f"pipeline: {spec}"]
    if args.calib:
        lines.append(f"calibration: {args.calib} (first {args.calib_count} samples)")
    lines.append(f"would write {output}/ (model.onnx, with model.onnx.data from {EXTERNAL_WEIGHTS_FROM >> 20} MiB of weights, "
                 "and manifest.json), replacing it atomically if it exists")
    if args.report:
        lines.append(f"would write the report {args.report}")
    if args.dump_ir:
        lines.append(f"would write per-pass IR dumps to {args.dump_ir}/")
    lines.append(f"calibration cache: {cache_dir if cache_dir is not None else 'off'}")
    for gate in gates:
        relation = ">=" if gate.metric.higher_is_better else "<="
        lines.append(f"quality gate: {gate.metric.name} {relation} {gate.threshold:g} (exit 3 when missed)")
    return "\n".join(lines) + "\n"
