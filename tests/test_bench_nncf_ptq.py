"""`benchmarks/nncf_ptq.py` and its callers: the calibration batches cross to the peers interpreter
intact and in order, and a failed NNCF run is an error that names the script, never a missing row."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"qc_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_batches_round_trip_in_order(tmp_path):
    nncf_ptq = _load("nncf_ptq")
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(2, 1, 4, 4)).astype(np.float32), "noise_level": np.full(2, i, np.float32)}
               for i in range(12)]  # 12 batches: "10/..." must come after "9/..."
    path = tmp_path / "batches.npz"
    np.savez(path, **{f"{i}/{name}": a for i, b in enumerate(batches) for name, a in b.items()})
    loaded = nncf_ptq.load_batches(str(path))
    assert len(loaded) == 12
    for ours, theirs in zip(batches, loaded):
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])


def test_a_failed_nncf_run_names_the_script(tmp_path):
    imaging = _load("imaging")
    batches = [{"image": np.zeros((1, 1, 4, 4), np.float32)}]
    # an interpreter that runs the script and fails the way a missing NNCF does
    with pytest.raises(RuntimeError, match="nncf_ptq.py failed"):
        imaging.compile_nncf(tmp_path / "missing.onnx", tmp_path, batches, sys.executable)
