"""Conformance of load -> canonicalize -> ORT emit against ONNX's own operator test suite.

    python benchmarks/conformance.py                    # full sweep, ~2,000 cases
    python benchmarks/conformance.py --filter gemm      # cases whose name contains 'gemm'
    python benchmarks/conformance.py --limit 100 --jobs 2 --json /tmp/c.json

Suites:
- `node`: ONNX's node test cases (`onnx.backend.test.case.node.collect_testcases`). Recent onnx
  wheels no longer ship them as data folders, so they are generated (with numpy's global random
  state seeded, so inputs are the same on every run) and written to a temporary folder in the
  data-folder layout (model.onnx, test_data_set_0/input_*.pb, output_*.pb).
- `pytorch-converted`, `pytorch-operator`: the data folders inside the installed onnx package.
  (`simple` can be added with --suites.)

For each case:
1. Baseline: the original model runs in ONNX Runtime (CPU) and is compared with the expected
   outputs the way ONNX's backend runner compares them (`onnx.backend.test.runner`:
   shape, dtype, then `assert_allclose` with the case's rtol/atol, 1e-3/1e-7 unless the case's
   data.json says otherwise; bfloat16 with rtol at least 2**-6). A case ORT cannot load, run or
   get right is "not run by ONNX Runtime" and left out of the pass rate.
2. Ours: `qcompiler.compile(model.onnx, out, target="ort", pipeline="canonicalize",
   drift=False)`, then the emitted out/model.onnx runs in ONNX Runtime on the same inputs
   (fed by name: graph input and output names must be preserved) and is compared the same way.

Statuses: `passed`, `failed` (with a `category`: user-error, load-error, pass-failure,
emit-failure, compile-error, io-changed, ort-load, ort-run, mismatch, timeout, crash) and
`ort-unsupported`. Every failure carries a one-line reason. Results come back in case order
(suite, then name), whatever `--jobs` is, and the JSON holds no timing per case, so two runs
give the same file but for `elapsed_s`.

torch is not imported: `qcompiler.compile` only imports it to capture nn.Modules.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_SUITES = ("node", "pytorch-converted", "pytorch-operator")
KNOWN_SUITES = DEFAULT_SUITES + ("simple",)
DEFAULT_RTOL = 1e-3  # onnx.backend.test.loader / case.node defaults
DEFAULT_ATOL = 1e-7
BFLOAT16_RTOL = 2**-6  # onnx.backend.test.runner: two bfloat16 ULPs
NODE_SEED = 0
CASE_TIMEOUT_S = 120
DEFAULT_JSON = Path(__file__).parent / "results" / "conformance.json"
SCHEMA = "qcompiler.conformance/1"
PASSED, FAILED, ORT_UNSUPPORTED = "passed", "failed", "ort-unsupported"


@dataclasses.dataclass(frozen=True)
class Case:
    suite: str
    name: str
    path: str  # the case's folder: model.onnx and test_data_set_*/
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"


# --------------------------------------------------------------------------------------------
# Discovery


def onnx_data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def discover(suites: tuple[str, ...] = DEFAULT_SUITES, workdir: str | os.PathLike | None = None,
             select: Callable[[str, str], bool] | None = None) -> list[Case]:
    """Every case of `suites` for which `select(suite, name)` holds (all when None), ordered by
    suite (as given) then name. `node` cases are written under `workdir` (required when `node`
    is among the suites)."""
    select = select or (lambda suite, name: True)
    cases: list[Case] = []
    for suite in suites:
        if suite not in KNOWN_SUITES:
            raise SystemExit(f"unknown suite '{suite}'; choose from {', '.join(KNOWN_SUITES)}")
        if suite == "node":
            if workdir is None:
                raise ValueError("node cases need a workdir to be written to")
            found = write_node_cases(Path(workdir) / "node", lambda name: select("node", name))
        else:
            found = [c for c in _data_folder_cases(suite) if select(suite, c.name)]
        cases.extend(sorted(found, key=lambda c: c.name))
    return cases


def _data_folder_cases(suite: str) -> list[Case]:
    root = onnx_data_dir() / suite
    cases = []
    for folder in sorted(root.iterdir()):
        if not (folder / "model.onnx").is_file():
            continue
        rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
        if (folder / "data.json").is_file():
            data = json.loads((folder / "data.json").read_text())
            rtol, atol = data.get("rtol", rtol), data.get("atol", atol)
        cases.append(Case(suite, folder.name, str(folder), rtol, atol))
    return cases


def node_testcases() -> list:
    """ONNX's generated node test cases, with numpy's global random state seeded first (the
    generators draw their inputs from it) and restored afterwards."""
    from onnx.backend.test.case import node

    state = np.random.get_state()
    np.random.seed(NODE_SEED)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(node.collect_testcases(None))
    finally:
        np.random.set_state(state)


def write_node_cases(root: Path, select: Callable[[str], bool] | None = None) -> list[Case]:
    """Write the node test cases (those whose name `select` accepts) in the data-folder layout
    (as `onnx.backend.test.cmd_tools` used to) and return them."""
    cases = []
    for test in node_testcases():
        if select is not None and not select(test.name):
            continue
        folder = root / test.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(test.model.SerializeToString())
        graph = test.model.graph
        for i, (inputs, outputs) in enumerate(test.data_sets):
            data = folder / f"test_data_set_{i}"
            data.mkdir(exist_ok=True)
            for j, value in enumerate(inputs):
                (data / f"input_{j}.pb").write_bytes(_to_proto(value, graph.input[j]).SerializeToString())
            for j, value in enumerate(outputs):
                (data / f"output_{j}.pb").write_bytes(_to_proto(value, graph.output[j]).SerializeToString())
        cases.append(Case("node", test.name, str(folder), test.rtol, test.atol))
    return cases


def _to_proto(value: Any, info: onnx.ValueInfoProto):
    kind = info.type.WhichOneof("value")
    if kind == "map_type":
        return numpy_helper.from_dict(value, info.name)
    if kind == "sequence_type":
        return numpy_helper.from_list(value, info.name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, info.name)
    if isinstance(value, onnx.TensorProto):
        return value
    return numpy_helper.from_array(np.asarray(value), info.name)


# --------------------------------------------------------------------------------------------
# Reading data sets and comparing outputs (as onnx.backend.test.runner does)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: graph inputs that are not initializers (IR < 4 lists both)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def load_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    raw = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(raw)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(raw)
        return numpy_helper.to_optional(proto)
    if kind == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(raw)
        return numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(raw)
    return numpy_helper.to_array(proto)


def data_sets(case: Case, model: onnx.ModelProto) -> list[tuple[dict[str, Any], list[Any]]]:
    """(feeds by input name, expected outputs in graph-output order) per test_data_set_*."""
    inputs = graph_inputs(model)
    outputs = list(model.graph.output)
    sets = []
    folders = sorted(Path(case.path).glob("test_data_set_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    for folder in folders:
        n_in = len(list(folder.glob("input_*.pb")))
        n_out = len(list(folder.glob("output_*.pb")))
        if n_in > len(inputs) or n_out > len(outputs):
            raise ValueError(f"{folder.name} holds {n_in} inputs / {n_out} outputs for a graph with {len(inputs)} / {len(outputs)}")
        feeds = {inputs[j].name: load_value(folder / f"input_{j}.pb", inputs[j].type) for j in range(n_in)}
        expected = [load_value(folder / f"output_{j}.pb", outputs[j].type) for j in range(n_out)]
        sets.append((feeds, expected))
    return sets


def assert_similar(expected: Any, actual: Any, rtol: float, atol: float, where: str = "output") -> None:
    """`onnx.backend.test.runner.Runner.assert_similar_outputs` for one value (tensors,
    sequences, optionals: None only equals None)."""
    if expected is None or actual is None:
        if expected is not None or actual is not None:
            raise AssertionError(f"{where}: expected {_kind(expected)}, got {_kind(actual)}")
        return
    if isinstance(expected, (list, tuple)) or isinstance(actual, (list, tuple)):
        if not isinstance(expected, (list, tuple)) or not isinstance(actual, (list, tuple)):
            raise AssertionError(f"{where}: expected {_kind(expected)}, got {_kind(actual)}")
        if len(expected) != len(actual):
            raise AssertionError(f"{where}: expected a sequence of {len(expected)}, got {len(actual)}")
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_similar(e, a, rtol, atol, f"{where}[{i}]")
        return
    if isinstance(expected, dict):
        raise AssertionError(f"{where}: map outputs are not compared")
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{where}: shape {actual.shape}, expected {expected.shape}")
    if expected.dtype == object:
        if not np.array_equal(actual, expected):
            raise AssertionError(f"{where}: strings differ")
        return
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{where}: dtype {actual.dtype}, expected {expected.dtype}")
    if actual.dtype.name == "bfloat16":
        rtol = max(rtol, BFLOAT16_RTOL)
    if actual.dtype.kind not in "biufcSUO?":  # ml_dtypes (bfloat16, float8, int4...): compare in float32
        actual, expected = actual.astype(np.float32), expected.astype(np.float32)
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        mismatched = next((line for line in lines if "Mismatched elements" in line), None)
        worst = next((line for line in lines if "Max absolute difference" in line), "")
        if mismatched is None:  # "nan location mismatch:", "+inf location mismatch:"...
            mismatched = next((line.rstrip(":") for line in lines if "mismatch" in line), "values differ")
        raise AssertionError(f"{where}: {mismatched} {worst}".strip()) from None


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return f"a sequence of {len(value)}"
    return f"a tensor {np.asarray(value).dtype}{list(np.shape(value))}"


def compare(expected: list[Any], actual: list[Any], case: Case) -> None:
    if len(expected) > len(actual):
        raise AssertionError(f"{len(actual)} outputs, expected {len(expected)}")
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert_similar(e, a, case.rtol, case.atol, f"output {i}")


# --------------------------------------------------------------------------------------------
# Running one case


class CaseTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no `except Exception` on the way swallows it
    (it fires between bytecodes: a long call into ORT or onnx's C++ finishes first)."""


def _session(model: bytes | str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# Element types ONNX Runtime's Python API cannot take from or give back as numpy arrays
# (bfloat16, float8, 4-bit and 2-bit types: numpy holds them as ml_dtypes arrays). They cross as
# OrtValues holding the bytes ONNX's TensorProto would hold (same packing for 4/2-bit types).
_RAW_TYPE_NAMES = ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
                   "UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2")
RAW_TYPES = {getattr(onnx.TensorProto, n): n.lower() for n in _RAW_TYPE_NAMES if hasattr(onnx.TensorProto, n)}
_RAW_BY_ORT_NAME = {f"tensor({name})": code for code, name in RAW_TYPES.items()}


def _ort_value(value: Any) -> Any:
    """A feed ONNX Runtime accepts: ml_dtypes arrays become OrtValues of their ONNX type."""
    if not isinstance(value, np.ndarray) or value.dtype.type.__module__ != "ml_dtypes":
        return value
    import ctypes

    import onnxruntime as ort

    proto = numpy_helper.from_array(value)
    if proto.data_type not in RAW_TYPES:
        return value
    ort_value = ort.OrtValue.ortvalue_from_shape_and_type(list(value.shape), proto.data_type)
    raw = proto.raw_data
    if len(raw) != ort_value.tensor_size_in_bytes():
        raise ValueError(f"{RAW_TYPES[proto.data_type]} input of {len(raw)} bytes for {ort_value.tensor_size_in_bytes()}")
    ctypes.memmove(ort_value.data_ptr(), raw, len(raw))
    return ort_value


def _from_ort_value(ort_value: Any, data_type: int) -> np.ndarray:
    import ctypes

    proto = onnx.TensorProto()
    proto.data_type = data_type
    proto.dims.extend(ort_value.shape())
    proto.raw_data = ctypes.string_at(ort_value.data_ptr(), ort_value.tensor_size_in_bytes())
    return numpy_helper.to_array(proto)


def ort_run(session, names: list[str], feeds: dict[str, Any]) -> list[Any]:
    """`session.run`, with ml_dtypes tensors in and out (see `RAW_TYPES`)."""
    feeds = {k: _ort_value(v) for k, v in feeds.items()}
    declared = {o.name: _RAW_BY_ORT_NAME.get(o.type) for o in session.get_outputs()}
    if not any(declared.get(n) for n in names):
        return session.run(names, feeds)
    import onnxruntime as ort

    feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.asarray(v)) for k, v in feeds.items()}
    values = session.run_with_ort_values(names, feeds)
    return [_from_ort_value(v, declared[n]) if declared.get(n) else v.numpy() for n, v in zip(names, values)]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if len(line) > 300:
        line = line[:297] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _stage_of(exc: BaseException) -> str:
    """Where in qcompiler an exception came from, from the deepest qcompiler frame."""
    from qcompiler.errors import PassFailure, UserError

    if isinstance(exc, UserError):
        return "user-error"
    if isinstance(exc, PassFailure):
        return "pass-failure"
    stage = "compile-error"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        filename, function = frame.f_code.co_filename, frame.f_code.co_name
        if "codegen" in filename and function in ("emit", "_check", "save"):
            stage = "emit-failure"
        elif filename.endswith(os.path.join("qcompiler", "ir.py")) and function in ("load", "to_target_opset", "check_domains", "_read_proto"):
            stage = "load-error"
        elif filename.endswith(os.path.join("qcompiler", "ir.py")) and function == "save":
            stage = "emit-failure"
        elif filename.endswith("pass_manager.py") or filename.endswith("instruments.py"):
            stage = "pass-failure"
    return stage


def run_case(case: Case, scratch: str | os.PathLike, timeout_s: int = CASE_TIMEOUT_S) -> dict[str, Any]:
    """Baseline, then ours; returns the case's record (suite, name, status, category, reason)."""
    record: dict[str, Any] = {"suite": case.suite, "name": case.name}
    start = time.perf_counter()
    handler = _arm_timeout(timeout_s)
    try:
        record.update(_run_case(case, Path(scratch)))
    except CaseTimeout:
        record.update(status=FAILED, category="timeout", reason=f"no result within {timeout_s} s")
    finally:
        _disarm_timeout(handler)
    if "reason" in record:  # no temporary paths in results: two runs give the same file
        reason = record["reason"].replace(str(Path(case.path) / "model.onnx"), "model.onnx").replace(case.path, "<case>")
        reason = re.sub(r"\S*\.artifact\.tmp-[\w-]+", "<artifact>", reason.replace(str(scratch), "<scratch>"))
        record["reason"] = reason
    record["seconds"] = round(time.perf_counter() - start, 3)  # reported, not written to the JSON
    return record


def _run_case(case: Case, scratch: Path) -> dict[str, Any]:
    model_path = Path(case.path) / "model.onnx"
    try:
        model = onnx.load(str(model_path))
        sets = data_sets(case, model)
    except Exception as exc:
        return {"status": ORT_UNSUPPORTED, "reason": f"test data unreadable: {one_line(exc)}"}
    if not sets:
        return {"status": ORT_UNSUPPORTED, "reason": "no test_data_set_* folder"}
    output_names = [v.name for v in model.graph.output]
    input_names = [v.name for v in graph_inputs(model)]

    # 1. Baseline: the original model in ONNX Runtime.
    try:
        session = _session(model_path.read_bytes())
    except Exception as exc:
        return {"status": ORT_UNSUPPORTED, "reason": f"ORT cannot load it: {one_line(exc)}"}
    try:
        for feeds, expected in sets:
            compare(expected, ort_run(session, output_names[: len(expected)], feeds), case)
    except AssertionError as exc:
        return {"status": ORT_UNSUPPORTED, "reason": f"ORT disagrees: {one_line(exc)}"}
    except Exception as exc:
        return {"status": ORT_UNSUPPORTED, "reason": f"ORT cannot run it: {one_line(exc)}"}
    del session

    # 2. Ours: load -> canonicalize -> ORT emit, then the artifact in ONNX Runtime.
    import qcompiler

    out = scratch / "artifact"
    try:
        qcompiler.compile(str(model_path), out, target="ort", pipeline="canonicalize", drift=False)
    except Exception as exc:
        return _failed(_stage_of(exc), one_line(exc))
    try:
        emitted = onnx.load(str(out / "model.onnx"))
        got_inputs = [v.name for v in graph_inputs(emitted)]
        got_outputs = [v.name for v in emitted.graph.output]
        if got_outputs != output_names:
            return _failed("io-changed", f"graph outputs {got_outputs}, expected {output_names}")
        if got_inputs != input_names:
            return _failed("io-changed", f"graph inputs {got_inputs}, expected {input_names}")
        try:
            session = _session(str(out / "model.onnx"))
        except Exception as exc:
            return _failed("ort-load", one_line(exc))
        for feeds, expected in sets:
            try:
                actual = ort_run(session, output_names[: len(expected)], feeds)
            except Exception as exc:
                return _failed("ort-run", one_line(exc))
            try:
                compare(expected, actual, case)
            except AssertionError as exc:
                return _failed("mismatch", str(exc))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"status": PASSED}


def _failed(category: str, reason: str) -> dict[str, Any]:
    return {"status": FAILED, "category": category, "reason": reason}


def _arm_timeout(seconds: int):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        return None

    def _raise(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    return previous


def _disarm_timeout(previous) -> None:
    if previous is not None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def quiet():
    """Keep the sweep's output to the table: the compiler's and converters' logs and numpy's
    warnings on deliberately odd inputs (inf, nan) are not results. Restored on exit."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


_WORKER: dict[str, Any] = {}


def _init_worker(scratch_root: str, timeout_s: int) -> None:
    _WORKER["quiet"] = quiet()  # kept: a collected context manager would restore the logs
    _WORKER["quiet"].__enter__()  # a worker process lives for the sweep only
    _WORKER["scratch"] = tempfile.mkdtemp(prefix="worker-", dir=scratch_root)
    _WORKER["timeout"] = timeout_s
    import qcompiler  # noqa: F401  (import once per worker, not per case)


def _worker(case: Case) -> dict[str, Any]:
    try:
        return run_case(case, _WORKER["scratch"], _WORKER["timeout"])
    except BaseException as exc:  # a harness bug must not end the sweep
        return {"suite": case.suite, "name": case.name, "status": FAILED, "category": "crash", "reason": one_line(exc)}


def sweep(cases: list[Case], scratch_root: str | os.PathLike, jobs: int = 1, timeout_s: int = CASE_TIMEOUT_S,
          progress: bool = False) -> list[dict[str, Any]]:
    """Run every case; results in the order of `cases`. With `jobs` > 1 cases run in worker
    processes; a case that kills its worker (a crash inside a runtime) is found by rerunning
    unfinished cases one at a time, and recorded as category `crash`."""
    start = time.perf_counter()
    done = 0

    def _tick():
        nonlocal done
        done += 1
        if progress and (done % 200 == 0 or done == len(cases)):
            print(f"  {done}/{len(cases)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    if jobs <= 1:
        results = []
        with quiet():
            scratch = tempfile.mkdtemp(prefix="inline-", dir=scratch_root)
            for case in cases:
                results.append(run_case(case, scratch, timeout_s))
                _tick()
        return results

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    by_index: dict[int, dict[str, Any]] = {}
    pending = list(range(len(cases)))
    isolate = False  # after a pool broke: run the first unfinished case alone
    while pending:
        batch = pending[:1] if isolate else pending
        with ProcessPoolExecutor(1 if isolate else jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(str(scratch_root), timeout_s)) as pool:
            futures = {pool.submit(_worker, cases[i]): i for i in batch}
            try:
                for future in as_completed(futures):
                    by_index[futures[future]] = future.result()
                    _tick()
            except BrokenProcessPool:
                if isolate:
                    case = cases[batch[0]]
                    by_index[batch[0]] = {"suite": case.suite, "name": case.name, "status": FAILED,
                                          "category": "crash", "reason": "the worker process died running this case"}
                    _tick()
        isolate = not isolate and any(i not in by_index for i in batch)
        pending = [i for i in pending if i not in by_index]
    return [by_index[i] for i in range(len(cases))]


def summarize(results: list[dict[str, Any]], suites: list[str]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for suite in suites + ["all"]:
        rows = [r for r in results if suite == "all" or r["suite"] == suite]
        runnable = [r for r in rows if r["status"] != ORT_UNSUPPORTED]
        passed = sum(r["status"] == PASSED for r in runnable)
        totals[suite] = {
            "total": len(rows),
            "ort_runnable": len(runnable),
            "passed": passed,
            "failed": len(runnable) - passed,
            "pass_rate": round(100.0 * passed / len(runnable), 2) if runnable else None,
        }
    return totals


def normalize_reason(reason: str) -> str:
    """A reason with case-specific names and numbers taken out, to group failures by cause."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", reason)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\(([A-Za-z_]\w*)\)", "(…)", text)  # names in parentheses: (If), (else_seq)
    text = re.sub(r"\[[^\[\]]*\]", "[…]", text)
    text = re.sub(r"(?<![A-Za-z])\d+(\.\d+)?(e-?\d+)?", "N", text)
    text = re.sub(r"(?<!\w)/[\w./-]+", "<path>", text)
    return text[:GROUP_PREFIX]


GROUP_PREFIX = 110


def report(results: list[dict[str, Any]], totals: dict[str, dict[str, Any]], out=sys.stdout) -> None:
    header = f"{'suite':<20}{'total':>7}{'ORT-runnable':>14}{'passed':>8}{'failed':>8}{'pass rate':>11}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for suite, t in totals.items():
        rate = "-" if t["pass_rate"] is None else f"{t['pass_rate']:.2f} %"
        print(f"{suite:<20}{t['total']:>7}{t['ort_runnable']:>14}{t['passed']:>8}{t['failed']:>8}{rate:>11}", file=out)
    failures = [r for r in results if r["status"] == FAILED]
    if failures:
        print(f"\nfailures of our pipeline ({len(failures)}), grouped by reason:", file=out)
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in failures:
            groups[(r["category"], normalize_reason(r["reason"]))].append(r)
        for (category, _), rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"\n  [{category}] x{len(rows)}: {rows[0]['reason']}", file=out)
            names = [f"{r['suite']}/{r['name']}" if r["suite"] != "node" else r["name"] for r in rows]
            for i in range(0, len(names), 4):
                print("      " + "  ".join(names[i:i + 4]), file=out)
    timed = sorted((r for r in results if "seconds" in r), key=lambda r: -r["seconds"])[:5]
    if timed:
        print("\nslowest cases: " + ", ".join(f"{r['name']} {r['seconds']:.1f} s" for r in timed), file=out)
    unsupported = Counter(normalize_reason(r["reason"]) for r in results if r["status"] == ORT_UNSUPPORTED)
    if unsupported:
        print(f"\nnot run by ONNX Runtime ({sum(unsupported.values())}), most common reasons:", file=out)
        for reason, count in unsupported.most_common(12):
            print(f"  x{count}: {reason}", file=out)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("qcompiler", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "ml_dtypes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="run only the first N cases (after --filter)")
    parser.add_argument("--filter", default=None, help="run only cases whose name contains SUBSTRING")
    parser.add_argument("--suites", default=",".join(DEFAULT_SUITES), help=f"comma-separated, from {', '.join(KNOWN_SUITES)}")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPU count)")
    parser.add_argument("--timeout", type=int, default=CASE_TIMEOUT_S, help="seconds per case (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qc-conformance-") as workdir:
        with quiet():
            cases = discover(tuple(suites), workdir, (lambda suite, name: args.filter in name) if args.filter else None)
        if args.limit is not None:
            cases = cases[: args.limit]
        if not args.quiet:
            print(f"{len(cases)} cases ({', '.join(suites)}), {args.jobs} job(s)", file=sys.stderr, flush=True)
        results = sweep(cases, workdir, jobs=args.jobs, timeout_s=args.timeout, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    totals = summarize(results, suites)
    report(results, totals)
    print(f"\n{len(results)} cases in {elapsed:.0f} s with {args.jobs} job(s)")
    body = {
        "schema": SCHEMA,
        "pipeline": "canonicalize",
        "target": "ort",
        "suites": suites,
        "filter": args.filter,
        "limit": args.limit,
        "tolerances": {"rtol": DEFAULT_RTOL, "atol": DEFAULT_ATOL, "bfloat16_rtol": BFLOAT16_RTOL},
        "node_seed": NODE_SEED,
        "packages": package_versions(),
        "totals": totals,
        "elapsed_s": round(elapsed, 1),
        "cases": [{k: v for k, v in r.items() if k != "seconds"} for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
