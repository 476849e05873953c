"""The build-step interface: --config, quality gates (exit 3), --dry-run, the calibration cache."""

import json
import sys

import numpy as np
import pytest

from qcompiler.analysis import calibration
from qcompiler.tools import buildstep
from qcompiler.tools.cli import main


@pytest.fixture
def calib_npz(tmp_path, rng):
    path = tmp_path / "calib.npz"
    np.savez(path, X=rng.standard_normal((16, 4)).astype(np.float32))
    return path


def _w8a8_args(tiny_onnx, calib_npz, out):
    return ["-q", "compile", str(tiny_onnx), "-o", str(out), "--pipeline", "calibrate,quantize", "--calib", str(calib_npz)]


def test_config_file_gives_every_option_and_the_command_line_wins(tiny_onnx, calib_npz, tmp_path):
    config = tmp_path / "conf" / "build.toml"
    config.parent.mkdir()
    config.write_text(
        f'source = "{tiny_onnx}"\noutput = "art"\npipeline = "calibrate,quantize"\ncalib = "{calib_npz}"\n'
        'calib-count = 8\nreport = "art/report.json"\n'
    )
    assert main(["-q", "compile", "--config", str(config)]) == 0
    out = config.parent / "art"  # relative paths are relative to the config file
    report = json.loads((out / "report.json").read_text())
    assert "quantize" in report["manifest"]["pipeline"]
    assert main(["-q", "compile", "--config", str(config), "--pipeline", "default", "-o", str(tmp_path / "other")]) == 0
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    assert "quantize" not in manifest["pipeline"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('source = "x.onnx"\noutput = "o"\ncalib-cout = 3\n', "unknown key 'calib-cout' in config file .* \\(did you mean 'calib-count'\\?\\)"),
        ('output = "o"\ncalib-count = "many"\n', "key 'calib-count' in config file .* must be an integer"),
        ("output = \n", "is not valid TOML"),
    ],
)
def test_bad_config_file_exits_2_with_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "build.toml"
    config.write_text(text)
    assert main(["compile", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_output_cosine_gate_passes_and_fails_with_exit_3_after_writing_the_report(tiny_onnx, calib_npz, tmp_path, capsys):
    out = tmp_path / "art"
    report = out / "report.json"
    assert main(_w8a8_args(tiny_onnx, calib_npz, out) + ["--report", str(report), "--fail-under", "output-cosine=0.9"]) == 0
    assert json.loads(report.read_text())["quality"]["passed"] is True
    capsys.readouterr()
    assert main(_w8a8_args(tiny_onnx, calib_npz, out) + ["--report", str(report), "--fail-under", "output-cosine=1.5"]) == 3
    err = capsys.readouterr().err.strip()
    assert "quality gate failed: output-cosine" in err and "needs >= 1.5" in err
    quality = json.loads(report.read_text())["quality"]
    assert quality["passed"] is False and quality["gates"][0]["value"] <= 1.0
    assert (out / "model.onnx").is_file()  # the artifact stays for inspection


def test_gate_outcome_appears_on_the_html_report(tiny_onnx, calib_npz, tmp_path):
    out = tmp_path / "art"
    assert main(_w8a8_args(tiny_onnx, calib_npz, out) + ["--report", str(out / "r.html"), "--fail-under", "output-cosine=1.5"]) == 3
    page = (out / "r.html").read_text()
    assert "Quality gates: FAILED" in page and "output-cosine" in page
    assert json.loads((out / "r.json").read_text())["quality"]["passed"] is False


@pytest.mark.parametrize(
    "gate, message",
    [
        (["--fail-under", "perplexity=20"], "metric 'perplexity' is better when lower: gate it with --fail-over perplexity=20"),
        (["--fail-under", "sts-spearmen=80"], "unknown metric 'sts-spearmen' in --fail-under \\(did you mean 'sts-spearman'\\?\\)"),
        (["--fail-under", "sts-spearman=80"], "metric 'sts-spearman' is not produced by a model that is not bundled"),
        (["--fail-over", "psnr-drop=0.5"], "metric 'psnr-drop' is not produced by a model that is not bundled"),
        (["--fail-over", "perplexity-ratio"], "--fail-over takes METRIC=VALUE"),
    ],
)
def test_bad_gate_exits_2_before_compiling(tiny_onnx, tmp_path, capsys, gate, message):
    import re

    out = tmp_path / "out"
    assert main(["compile", str(tiny_onnx), "-o", str(out)] + gate) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err), err
    assert not out.exists()


def test_dry_run_prints_the_resolved_pipeline_and_writes_nothing(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_onnx), "-o", str(out), "--pipeline", "w8a8", "--dry-run", "--dump-ir", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "pipeline: canonicalize{" in text and "smooth{alpha=auto act-mode=static}" in text and "lower-ort{" in text
    assert f"would write {out}/" in text and "per-pass IR dumps" in text
    assert list(tmp_path.iterdir()) == [tiny_onnx]


def test_dry_run_makes_the_compiles_own_checks(tiny_onnx, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_onnx), "-o", str(out), "--float-type", "float64", "--dry-run"]) == 2
    assert "float64" in capsys.readouterr().err
    # but not of what this machine has installed: a build machine plans a compile it will not run
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "triton", None)
    assert main(["compile", str(tiny_onnx), "-o", str(out), "--workers", "2", "--target", "triton", "--dry-run"]) == 0
    assert "pipeline: canonicalize{" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [tiny_onnx]


def test_rebuild_reuses_calibration_statistics_and_says_so(tiny_onnx, calib_npz, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    args = ["compile", str(tiny_onnx), "--pipeline", "calibrate,quantize", "--calib", str(calib_npz), "--cache-dir", str(cache)]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    calls = []
    real = calibration.collect
    monkeypatch.setattr("qcompiler.analysis.calib_cache.collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "b")]) == 0
    assert calls == []  # both the calibrate pass and quantize's re-collection came from the cache
    assert "reused from the cache" in capsys.readouterr().err
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert main(args + ["-o", str(tmp_path / "c"), "--calib-count", "8"]) == 0
    assert calls  # other data: recalibrated


def test_corrupt_cache_entry_is_recomputed_with_a_warning(tiny_onnx, calib_npz, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["compile", str(tiny_onnx), "--pipeline", "calibrate,quantize", "--calib", str(calib_npz), "--cache-dir", str(cache)]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    for entry in (cache / "calibration").glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:-7] + b"garbage")
    capsys.readouterr()
    assert main(["-q"] + args + ["-o", str(tmp_path / "b")]) == 0  # -q: the warning shows all the same
    assert "unreadable (its array file does not match the recorded sha256); recalibrating" in capsys.readouterr().err
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_cached_statistics_equal_fresh_ones(tmp_path, rng):
    from qcompiler.analysis.calib_cache import _read, _write

    stats = {"x": calibration.stats_of([rng.standard_normal((40, 6)).astype(np.float32)], sample_rows=16, bins=64)}
    _write(tmp_path, "k", stats, {"batches": 1, "samples": 40})
    back, counts = _read(tmp_path, "k")
    assert back["x"].equals(stats["x"]) and counts == {"batches": 1, "samples": 40}


def test_gates_read_eval_data_else_the_held_out_set_of_a_denoiser_else_the_calibration_file():
    assert buildstep.gate_data("denoise", None, "photos/") is None  # the bundled held-out photos
    assert buildstep.gate_data("denoise", "mine/", "photos/") == "mine/"
    assert buildstep.gate_data("perplexity", None, "text.txt") == "text.txt"
