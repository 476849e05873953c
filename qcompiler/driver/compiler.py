"""`compile`: source -> IR -> pipeline (with instruments) -> backend artifact, written atomically.
The source, calibration, probe and run are a `qcompiler.driver.session.Session`'s; the options are
`qcompiler.driver.options.CompileOptions`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qcompiler.driver.capture import model_digest
from qcompiler.driver.options import CompileOptions, api_signature, check_keywords
from qcompiler.driver.outputs import check_outputs, nested_entry, protected_sources
from qcompiler.driver.session import Session
from qcompiler.errors import shown
from qcompiler.ir import float_types, spill
from qcompiler.ir import is_large, op_key, weight_count
from qcompiler.passes.lower_ort import LowerOrtPass
from qcompiler.pipeline import instruments
from qcompiler.pipeline.pass_manager import PassRecord
from qcompiler.support.fileio import AtomicDir, temp_prefix, write_atomic
from qcompiler.tools import report as reports

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CompileResult:
    output: Path
    files: list[Path]
    pipeline: str
    records: list[PassRecord]
    manifest: dict[str, Any]
    model: ir.Model
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # capture_s, pipeline_s
    probe: Any = None  # qcompiler.analysis.probe.Probe: what drift and the report were measured on


def debug_enabled(flag: bool | None = None) -> bool:
    """The one debug switch: the API argument, else the QCOMPILER_DEBUG environment variable."""
    if flag is not None:
        return flag
    return os.environ.get("QCOMPILER_DEBUG", "") not in ("", "0", "false")


def compile(source: Any, output: str | os.PathLike, **options: Any) -> CompileResult:
    """Compile `source` (bundled model name, .onnx path, `pkg.mod:fn`, nn.Module with
    `example_inputs`, or an `onnx_ir.Model`) into an artifact directory `output`.

    `calibration`: a data file (.npz, .txt, .tsv, images; the first `calib_count` samples) or an
    iterable of input dicts, for passes that calibrate. `threads`: ONNX Runtime threads for passes
    that run the model. The pipeline always starts with `canonicalize` and, for the ort target,
    ends with `lower-ort`: they are added when missing (the printed pipeline shows them).
    `print_ir`: None, "all" or "changed". `dump_ir`: a directory for per-pass IR dumps.
    `report`: a report path (may lie inside `output`): `.json`, or `.html` for a page with the
    `.json` beside it (`qcompiler.tools.report`). The IR is verified after every pass;
    `drift` measures each pass's output drift on the probe batch (`qcompiler.analysis.probe.choose`: given
    `probe_inputs`, else the first samples of `eval_data` (a data file or an iterable of input
    dicts), a bundled model's data, a held-apart slice of the calibration data, example inputs,
    and only then a synthetic input, which the report names as such); not for a model whose float32
    weights pass `qcompiler.ir.EXTERNAL_DATA_THRESHOLD` (it would hold every weight in memory). `cache_dir`: reuse calibration
    statistics computed for the same model, data and options (`qcompiler.analysis.calib_cache`).
    `require_data_probe`: refuse (UserError, before any pass runs) when only a synthetic probe is
    possible (what the `output-cosine` gate needs).
    Outputs are checked before any work (`qcompiler.driver.outputs`): an existing output folder that is
    not an artifact of ours (or a dump, or a report) is replaced only with `force`.
    `float_type`: "source" (default: the emitted model keeps the source's float32, float16 or
    bfloat16 at its inputs, outputs and float weights) or "float32". `dtype`: the float type a torch
    source is captured in ("float32", "float16" or "bfloat16"; `qcompiler.ir.float_types`).
    `workers`, `ray_address`: fan independent measurements out on Ray, a local instance of that
    many processes or a running cluster (`qcompiler.support.parallel`; the artifact is byte-identical to
    the in-process run); neither: everything runs in this process and Ray is not imported.
    `block_sequential`: passes that run the float model run it one block at a time (today:
    calibration and `quantize`'s range re-collection; `qcompiler.analysis.calib_sequential`), which large
    models (`qcompiler.ir.is_large`) always do; the artifact is the same."""
    check_keywords(options)
    return compile_with(CompileOptions(source=source, output=output, **options))


compile.__signature__ = api_signature(CompileResult)


def compile_with(options: CompileOptions) -> CompileResult:
    """`compile` with its options as one `CompileOptions`."""
    session = Session(options)  # what fails before any slow step: target, host, options, the pipeline
    backend, passes, spec = session.target, session.passes, session.spec
    source, output, calibration, eval_data = options.source, options.output, options.calibration, options.eval_data
    dump_ir, print_ir, report, drift, force = options.dump_ir, options.print_ir, options.report, options.drift, options.force
    float_type = session.float_type
    report_files = reports.report_paths(report) if report is not None else None  # a bad name fails before any slow step
    check_outputs(output, dump_ir=dump_ir, report=report_files, protected=protected_sources(source, calibration, eval_data), force=force)
    artifact = AtomicDir(output)
    staging = artifact.begin()  # an unwritable output fails before any slow step
    keep_in_artifact = tuple(filter(None, [nested_entry(output, dump_ir)])) if dump_ir is not None else ()
    keep_in_dump = tuple(filter(None, [nested_entry(dump_ir, output), nested_entry(dump_ir, staging)])) if dump_ir is not None else ()
    scratch = None
    try:
        model = session.load()
        source_info, source_type, capture_seconds = session.source, session.source_type, session.capture_seconds
        source_digest = model_digest(model)
        source_weights = weight_count(model)
        session.to_float32()
        scratch = spill.SpillFile(staging.parent, temp_prefix(Path(output).name, "spill")) if is_large(model) else None
        if scratch is not None and dump_ir is not None:  # an output inside the dump folder: its scratch folder is kept too
            keep_in_dump += tuple(filter(None, [nested_entry(dump_ir, scratch.folder)]))
        if drift and report is None and not options.require_data_probe and is_large(model):
            log.info("output drift not measured after each pass: this model's weights stay on disk, and each measurement runs it "
                     "block by block; --report (or an output-cosine gate) measures it")
            drift = False
        measured_on = session.load_data()
        if not measured_on.is_data and (drift or report is not None):
            log.warning("%s", measured_on.note)
        feeds = float_types.cast_float_feeds(measured_on.feeds, model)
        tools = _instruments(feeds if drift and report is None else None, dump_ir, print_ir, spec, keep_in_dump)
        recorder = None
        if report is not None:  # a Drift instrument that also records the layers, in the same runs
            recorder = reports.Recorder(feeds, drift=drift)
            tools.append(recorder)
        with spill.spilling(scratch):  # a large model's new constants wait on disk (qcompiler.ir.spill)
            start = time.perf_counter()
            records = session.run(model, passes, tools)
            pipeline_seconds = time.perf_counter() - start
            for warning in (predicted_slower(records), far_from_float(records)):
                if warning:
                    log.warning("%s", warning)
                    if recorder is not None:
                        recorder.warnings.append(warning)
            manifest = {
                "source": {"name": source_info.name, "kind": source_info.kind, "sha256": source_digest, "weights": source_weights},
                "pipeline": spec,
                "packages": package_versions(),
            }
            emitted_type = source_type if float_type == "source" and backend.keeps_source_float_type else ir.DataType.FLOAT
            float_types.restore_float_type(model, emitted_type)
            if source_type != ir.DataType.FLOAT:  # absent: float32 throughout
                manifest["float_type"] = float_types.type_name(emitted_type)
                manifest["source"]["float_type"] = float_types.type_name(source_type)
            layout = getattr(source_info.bundled, "layout", None)  # a causal LM with a KV cache
            if layout is not None:
                layout = cache_layout_of(layout, model)
                manifest["causal_lm"] = layout.to_json()
            files = backend.emit(model, staging, manifest, source_info.bundled, layout)
        manifest = json.loads((staging / "manifest.json").read_text())
        timings = {"capture_s": round(capture_seconds, 3), "pipeline_s": round(pipeline_seconds, 3)}
        if report is not None:
            body = reports.build(manifest, records, timings, recorder, model, files, probe=measured_on)
            files += reports.write(report, Path(output), staging, body)
        final = artifact.commit(keep=keep_in_artifact)
    except BaseException:
        artifact.abort()
        if scratch is not None:
            scratch.close()
        raise
    files = [final / f.relative_to(staging) for f in files]
    log.info("wrote %s (%s)", shown(final), ", ".join(f.name for f in files))
    return CompileResult(final, files, spec, records, manifest, model, timings, measured_on)


def cache_layout_of(layout, model: ir.Model):
    """The cache layout of the compiled graph: the captured one, with `kv_cache` int8 when the
    pipeline stored the cache as int8 (`kv-cache{dtype=int8}`), and `shared_buffer` when every
    layer's attention is ONNX Runtime's GroupQueryAttention (`lower-ort{attention=...}`), which
    can write each step's keys and values into the past buffer."""
    from qcompiler.dialect.kv_int8 import int8_cache_inputs

    if int8_cache_inputs(model):
        layout = dataclasses.replace(layout, kv_cache="int8")
    fused = sum(op_key(node) == ("com.microsoft", "GroupQueryAttention") for node in model.graph)
    if fused == layout.num_layers:  # every layer's: one left as exported would concatenate its past
        layout = dataclasses.replace(layout, shared_buffer=True)
    return layout


def add_to_report(report: str | os.PathLike, sections: dict[str, Any]) -> None:
    """Add top-level sections (e.g. the quality gates' outcome) to a written report (its JSON, and
    its page when the report is `.html`)."""
    json_path, html_path = reports.report_paths(report)
    body = json.loads(json_path.read_text())
    body.update(sections)
    write_atomic(json_path, reports.to_json(reports.clean(body)))
    if html_path is not None:
        from qcompiler.tools.report_html import render

        write_atomic(html_path, render(body))


LOW_OUTPUT_COSINE = 0.9  # below it the artifact's output is called far from float (a warning, not a gate)


def far_from_float(records: list[PassRecord]) -> str | None:
    """A warning when the artifact's output, measured on the probe batch after the last pass, has a cosine
    to float's below `LOW_OUTPUT_COSINE` (the lowest of its outputs); None otherwise or when not measured."""
    drift = records[-1].drift if records else None
    cosine = (drift or {}).get("lowest_cosine")
    if cosine is None or cosine >= LOW_OUTPUT_COSINE:  # NaN (an output not finite) compares False: warned about
        return None
    where = f" (output '{shown(drift['lowest_cosine_output'])}')" if "lowest_cosine_output" in drift else ""
    return (f"the artifact's output is far from float on the probe batch: cosine {cosine:.4f}{where}; "
            "`qcompiler doctor` names the layers and passes that cost it, --fail-under output-cosine=... stops a build on it")


def predicted_slower(records: list[PassRecord]) -> str | None:
    """The warning when `lower-ort` predicts the artifact slower than float, or no faster
    (`qcompiler.analysis.placement.predicted_slower`): more quantized activations feeding float kernels
    than integer kernels, or many float activations between cheap integer Convs; None otherwise."""
    kernels = next((r.stats.get(LowerOrtPass.Stats.KERNELS) for r in reversed(records) if r.name == LowerOrtPass.name), None)
    if not kernels or not kernels.get("predicted_slower_than_float"):
        return None
    wasted, activations = kernels["float_kernels_behind_qdq"], kernels.get("float_activations_behind_qdq", 0)
    if wasted and wasted >= kernels["integer_kernels"]:
        return (f"the artifact is predicted slower than float: {wasted} quantized activations feed layers ONNX Runtime runs in "
                f"float ({', '.join(map(shown, kernels['float_kernels_behind_qdq_names']))}), against {kernels['integer_kernels']} integer "
                "kernels; quantize{force=...} placed them, or a pass after quantize moved them")
    return (f"the artifact is predicted no faster than float: {activations} float activations "
            f"({', '.join(map(shown, kernels['float_activations_behind_qdq_names']))}) read the dequantized outputs of integer Convs that sum "
            f"few products, against {kernels['integer_kernels']} integer kernels; each costs a dequantize and a quantize about as "
            "long as its Conv saves (docs/measurement.md, \"Gated activations\"); time it against the float model before deploying")


def _instruments(feeds, dump_ir, print_ir, spec, keep_in_dump: tuple[str, ...] = ()) -> list:
    tools: list = [instruments.Verify()]
    if feeds is not None:
        tools.append(instruments.Drift(feeds))
    if print_ir is not None:
        tools.append(instruments.PrintIR(only_changed=print_ir == "changed"))
    if dump_ir is not None:
        tools.append(instruments.DumpIR(dump_ir, spec, keep=keep_in_dump))
    return tools


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("qcompiler", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
