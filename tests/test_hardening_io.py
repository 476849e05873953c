"""Files the compiler writes and reads on hostile or careless input: outputs that would delete
inputs, a cache that must not be fooled, leftovers of killed runs, unbounded reads and echoes."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from qcompiler.analysis import calib_cache
from qcompiler.analysis.calib_data import load_calibration
from qcompiler.ir import parse
from qcompiler.support import progress as progress_mod
from qcompiler.tools.cli import main


@pytest.fixture
def calib_npz(tmp_path, rng):
    path = tmp_path / "calib.npz"
    np.savez(path, X=rng.standard_normal((16, 4)).astype(np.float32))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _no_work(monkeypatch):
    """Make any capture fail loudly: a check that runs 'before compiling' must stop the run first."""
    import qcompiler.driver.session

    def fail(*args, **kwargs):
        raise AssertionError("the compile started")

    monkeypatch.setattr(qcompiler.driver.session, "resolve", fail)


# ------------------------------------------------------------------------------------------------
# Group 2: outputs never delete inputs, the working directory, the home folder or foreign folders


@pytest.mark.parametrize("which", ["source folder", "calib ancestor", "config folder", "cwd", "cwd parent", "home"])
def test_output_that_holds_an_input_is_refused_before_work(tiny_onnx, calib_npz, tmp_path, monkeypatch, capsys, which):
    _no_work(monkeypatch)
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    config = tmp_path / "conf" / "b.toml"
    config.parent.mkdir()
    config.write_text("no-drift = true\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    output = {
        "source folder": tmp_path, "calib ancestor": tmp_path.parent, "config folder": config.parent, "cwd": ".",
        "cwd parent": "..", "home": "~",
    }[which]
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["compile", str(tiny_onnx), "-o", os.path.expanduser(str(output)), "--calib", str(calib_npz),
            "--config", str(config), "--force"]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert "which writing it would delete" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert config.exists() and tiny_onnx.exists() and calib_npz.exists()


def test_config_output_of_home_is_refused(tiny_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "keep.txt").write_text("mine")
    config = tmp_path / "cfg" / "b.toml"
    config.parent.mkdir()
    config.write_text(f'source = "{tiny_onnx}"\noutput = "~"\nforce = true\n')
    assert main(["compile", "--config", str(config)]) == 2
    assert "is the home folder" in _one_error_line(capsys)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_foreign_folder_needs_force_and_an_artifact_does_not(tiny_onnx, tmp_path, monkeypatch, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_text("precious")
    assert main(["compile", str(tiny_onnx), "-o", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "does not hold an artifact of qcompiler" in err and "--force" in err
    assert (out / "cat.jpg").read_text() == "precious"
    config = tmp_path / "b.toml"
    config.write_text('force = true\n')
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(out), "--config", str(config)]) == 0  # the config key
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(out)]) == 0  # now ours: no --force needed


def test_foreign_dump_folder_and_report_need_force(tiny_onnx, tmp_path, capsys):
    dump = tmp_path / "notes"
    dump.mkdir()
    (dump / "todo.txt").write_text("x")
    assert main(["compile", str(tiny_onnx), "-o", str(tmp_path / "a"), "--dump-ir", str(dump)]) == 2
    assert "does not hold IR dumps of qcompiler" in _one_error_line(capsys)
    report = tmp_path / "data.json"
    report.write_text('{"mine": 1}')
    assert main(["compile", str(tiny_onnx), "-o", str(tmp_path / "a"), "--report", str(report)]) == 2
    assert "was not written by qcompiler" in _one_error_line(capsys)
    assert report.read_text() == '{"mine": 1}' and (dump / "todo.txt").exists() and not (tmp_path / "a").exists()
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "a"), "--report", str(report), "--force"]) == 0
    assert json.loads(report.read_text())["schema"].startswith("qcompiler.tools.report/")
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "a"), "--report", str(report)]) == 0  # ours now


@pytest.mark.parametrize("layout", ["output inside dumps", "dumps inside output"])
def test_nested_output_and_dumps_keep_each_other(tiny_onnx, tmp_path, layout):
    outer = tmp_path / "D"
    out, dump = (outer / "out", outer) if layout == "output inside dumps" else (outer, outer / "ir")
    for _ in range(2):  # the second run replaces both, each keeping the other
        assert main(["-q", "compile", str(tiny_onnx), "-o", str(out), "--dump-ir", str(dump)]) == 0
        assert (out / "manifest.json").exists() and (out / "model.onnx").exists()
        assert (dump / "stats.json").exists() and (dump / "001-canonicalize.onnxtxt").exists()
    names = [p.name for p in outer.iterdir()] + [p.name for p in tmp_path.iterdir()]
    assert not [n for n in names if ".tmp-" in n or ".old-" in n]


def test_same_folder_for_output_and_dumps_is_refused(tiny_onnx, tmp_path, capsys):
    assert main(["compile", str(tiny_onnx), "-o", str(tmp_path / "x"), "--dump-ir", str(tmp_path / "x")]) == 2
    assert "give --dump-ir another folder" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------------
# Group 3: the calibration cache


def _entry(cache):
    (meta,) = (cache / "calibration").glob("*.json")
    return meta, meta.with_suffix(".npz")


def _cached_build(tiny_onnx, calib_npz, cache, out, count="16"):
    return main(["-q", "compile", str(tiny_onnx), "-o", str(out), "--pipeline", "calibrate,quantize", "--calib",
                 str(calib_npz), "--calib-count", count, "--cache-dir", str(cache)])


def test_copied_or_edited_cache_entry_is_not_used(tiny_onnx, calib_npz, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(fresh), "--pipeline", "calibrate,quantize",
                 "--calib", str(calib_npz), "--no-cache"]) == 0
    cache_a, cache_b = tmp_path / "ca", tmp_path / "cb"
    assert _cached_build(tiny_onnx, calib_npz, cache_a, tmp_path / "a", count="8") == 0
    assert _cached_build(tiny_onnx, calib_npz, cache_b, tmp_path / "b") == 0
    (meta_a, data_a), (meta_b, data_b) = _entry(cache_a), _entry(cache_b)
    meta_b.write_bytes(meta_a.read_bytes())  # another build's entry under this build's key
    data_b.write_bytes(data_a.read_bytes())
    capsys.readouterr()
    assert _cached_build(tiny_onnx, calib_npz, cache_b, tmp_path / "c") == 0
    assert "it records another key (a copied entry)); recalibrating" in capsys.readouterr().err
    assert (tmp_path / "c" / "model.onnx").read_bytes() == (fresh / "model.onnx").read_bytes()
    meta = json.loads(meta_b.read_text())  # rewritten whole by the rebuild
    name = next(iter(meta["tensors"]))
    meta["tensors"][name]["max"] = meta["tensors"][name]["max"] * 4
    meta_b.write_text(json.dumps(meta, sort_keys=True))
    assert _cached_build(tiny_onnx, calib_npz, cache_b, tmp_path / "d") == 0
    assert "do not match their seal (an edited entry)); recalibrating" in capsys.readouterr().err
    assert (tmp_path / "d" / "model.onnx").read_bytes() == (fresh / "model.onnx").read_bytes()


def test_cache_reads_are_bounded_and_refuse_special_files(tiny_onnx, calib_npz, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    assert _cached_build(tiny_onnx, calib_npz, cache, tmp_path / "a") == 0
    meta, data = _entry(cache)
    data.unlink()
    os.mkfifo(data)  # a reader of this would wait forever
    capsys.readouterr()
    assert _cached_build(tiny_onnx, calib_npz, cache, tmp_path / "b") == 0
    assert "is not a regular file); recalibrating" in capsys.readouterr().err
    data.unlink()
    data.symlink_to("/dev/zero")  # endless
    assert _cached_build(tiny_onnx, calib_npz, cache, tmp_path / "c") == 0
    assert "unreadable" in capsys.readouterr().err
    monkeypatch.setattr(calib_cache, "MAX_ENTRY_BYTES", 64)  # a 'huge' entry: refused by its size, unread
    assert _cached_build(tiny_onnx, calib_npz, cache, tmp_path / "d") == 0
    assert "more than the 64 an entry may" in capsys.readouterr().err
    for name in "bcd":
        assert (tmp_path / name / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()


def test_unusable_cache_folder_is_a_warning(tiny_onnx, calib_npz, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert _cached_build(tiny_onnx, calib_npz, blocker, tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "cannot be used" in err and "continuing without the cache" in err
    assert (tmp_path / "a" / "model.onnx").exists()


# ------------------------------------------------------------------------------------------------
# Group 5: bad outputs fail first; leftovers of killed runs are cleaned; SIGTERM cleans up


@pytest.mark.parametrize("output", [".", "..", "", "dangling"])
def test_bad_output_is_one_line_before_work(tiny_onnx, tmp_path, monkeypatch, capsys, output):
    _no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["compile", str(tiny_onnx), "-o", output]) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "tiny.onnx"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_gone_processes_are_removed_and_nothing_else(tiny_onnx, tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".out.tmp-{dead}-abc12345", tmp_path / f".out.old-{dead}-zz_9"]
    kept = [tmp_path / f".out.tmp-{os.getppid()}-live0001", tmp_path / ".out.tmp-oldstyle", tmp_path / f".other.tmp-{dead}-abc",
            tmp_path / f"out.tmp-{dead}-abc"]
    for path in stale + kept:
        path.mkdir()
        (path / "f").write_text("x")
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "out")]) == 0
    assert not any(p.exists() for p in stale)
    assert all((p / "f").exists() for p in kept)


def _slow_factory(tmp_path):
    (tmp_path / "slow_source.py").write_text(
        "import pathlib, time\n"
        "def build():\n"
        f"    pathlib.Path({str(tmp_path / 'started')!r}).write_text('1')\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return [sys.executable, "-m", "qcompiler.tools.cli", "compile", "slow_source:build", "-o", str(tmp_path / "out"),
            "--dump-ir", str(tmp_path / "dump")], env


def _start_and_wait(argv, env, tmp_path):
    child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180  # importing torch on a busy machine
    while not (tmp_path / "started").exists():
        assert child.poll() is None, child.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return child


def _temporaries(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_sigterm_cleans_up_and_sigkill_leftovers_go_on_the_next_run(tmp_path, tiny_onnx):
    argv, env = _slow_factory(tmp_path)
    child = _start_and_wait(argv, env, tmp_path)
    assert _temporaries(tmp_path)  # the staging folder exists while the source is captured
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 143 and err.strip().endswith("qcompiler: error: terminated")
    assert _temporaries(tmp_path) == [] and not (tmp_path / "out").exists()

    (tmp_path / "started").unlink()
    child = _start_and_wait(argv, env, tmp_path)
    child.kill()
    child.communicate(timeout=30)
    assert _temporaries(tmp_path)  # SIGKILL: no chance to clean
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "out")]) == 0
    assert _temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Group 6: bounded reads, bounded work, bounded echo, progress in logs


def test_npz_reads_only_the_samples_used(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, X=np.zeros((40_000, 256), np.float32))  # 41 MB
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 256] X) => (float[N, 256] Y) { Y = Relu (X) }""")
    tracemalloc.start()
    try:
        batches = load_calibration(path, 8, model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(b["X"].shape[0] for b in batches) == 8
    assert peak < 4 << 20, peak


def test_bins_maximum_is_accepted_and_beyond_it_refused(tiny_onnx, calib_npz, tmp_path, capsys):
    args = ["-q", "compile", str(tiny_onnx), "--calib", str(calib_npz), "--calib-count", "16", "--no-cache", "--pipeline"]
    assert main(args + ["calibrate{method=entropy bins=8192},quantize", "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(args + ["calibrate{method=entropy bins=8196},quantize", "-o", str(tmp_path / "b")]) == 2
    assert "from 64 to 8192" in _one_error_line(capsys)


@pytest.mark.parametrize("argv", [
    ["compile", "{onnx}", "-o", "{out}", "--threads", "-3"],
    ["compile", "{onnx}", "-o", "{out}", "--threads", "many"],
    ["doctor", "{onnx}", "--pipeline", "w8a8", "--threads", "0"],
    ["eval", "{out}", "--task", "sts", "--threads", "-1"],
])
def test_threads_must_be_a_positive_integer(tiny_onnx, tmp_path, capsys, argv):
    argv = [a.format(onnx=tiny_onnx, out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    assert "must be a positive integer" in _one_error_line(capsys)


def test_api_threads_must_be_positive(tiny_onnx, tmp_path):
    import qcompiler

    with pytest.raises(qcompiler.UserError, match="threads must be a positive integer, got -3"):
        qcompiler.compile(str(tiny_onnx), tmp_path / "o", threads=-3)
    assert not (tmp_path / "o").exists()


def test_config_threads_must_be_positive(tiny_onnx, tmp_path, capsys):
    config = tmp_path / "b.toml"
    config.write_text("threads = -3\n")
    assert main(["compile", str(tiny_onnx), "-o", str(tmp_path / "o"), "--config", str(config)]) == 2
    assert "'threads' must be a positive integer" in _one_error_line(capsys)


@pytest.mark.parametrize("pipeline", ["x" * 1_000_000 + "{", "canon\nicalize\x00{", "@file", "bad name\u2028\x1b[31m"])
def test_errors_echo_bounded_escaped_text(tiny_onnx, tmp_path, capsys, pipeline):
    (tmp_path / "file").write_text("calibrate,\n" * 100_000 + "}")
    argv = ["compile", str(tiny_onnx), "-o", str(tmp_path / "o"), "--pipeline", pipeline.replace("@file", f"@{tmp_path / 'file'}")]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert len(err) < 400 and "\x00" not in err and "\x1b" not in err and "\u2028" not in err


@pytest.mark.parametrize("content, message", [
    (b'pipeline = "w8a8"\n# caf\xe9\n', "is not UTF-8 text"),
    (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests tables or arrays too deeply"),
])
def test_bad_toml_config_is_one_line(tmp_path, capsys, content, message):
    config = tmp_path / "b.toml"
    config.write_bytes(content)
    assert main(["compile", "--config", str(config)]) == 2
    assert message in _one_error_line(capsys)


def test_progress_lines_are_logged_off_a_terminal(monkeypatch, caplog):
    import io

    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="qcompiler"):
        bar = progress_mod.Progress("doctor: layers measured", total=3, stream=io.StringIO())
        bar.update()
        bar.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["doctor: layers measured: 1 of 3", "doctor: layers measured: 2 of 3"]
    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 3600.0)  # the rate is bounded
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qcompiler"):
        bar = progress_mod.Progress("x", total=1000, stream=io.StringIO())
        for _ in range(1000):
            bar.update()
    assert caplog.records == []


def test_doctor_apply_refuses_inputs_and_foreign_files_before_any_work(tmp_path, capsys, monkeypatch):
    import qcompiler.tools.doctor

    def no_diagnosis(*args, **kwargs):
        raise AssertionError("the diagnosis ran before the --apply path was checked")

    monkeypatch.setattr(qcompiler.tools.doctor, "diagnose", no_diagnosis)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for target, message in [(model, "is the source model"), (tmp_path, "is the"),
                            (notes, "was not written by qcompiler doctor")]:
        assert main(["doctor", str(model), "--pipeline", "w8a8", "--apply", str(target)]) == 2
        assert message in _one_error_line(capsys)
    assert model.read_bytes() == b"model bytes" and notes.read_text() == "mine\n"
    previous = tmp_path / "old.pipeline"
    previous.write_text("# suggested by qcompiler doctor for m: keep fc1\nw8a8\n")
    # a file doctor wrote may be replaced, and any file with --force: the check lets the diagnosis run
    assert main(["doctor", str(model), "--pipeline", "w8a8", "--apply", str(previous)]) == 1
    assert "the diagnosis ran" in _one_error_line(capsys)
    assert main(["doctor", str(model), "--pipeline", "w8a8", "--apply", str(notes), "--force"]) == 1
    assert "the diagnosis ran" in _one_error_line(capsys)


@pytest.mark.parametrize("where", ["model", "spill"])
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(tiny_onnx, calib_npz, tmp_path, monkeypatch, capsys, where):
    """The disk fills while the model is written (or, for a large model, while a pass keeps a
    constant on disk): one line naming the folder, exit 2, no output and no temporaries."""
    import errno

    from qcompiler.ir import spill

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.onnx"))

    if where == "model":
        monkeypatch.setattr("qcompiler.codegen.ort.emit.save", full)
    else:  # every new constant goes to the scratch file, whose writes fail
        import qcompiler.ir as qir

        monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)
        monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 0)
        monkeypatch.setattr(qir, "is_large", lambda model: True)
        monkeypatch.setattr("qcompiler.driver.compiler.is_large", lambda model: True)
        monkeypatch.setattr(spill.SpillFile, "add", full)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "out"), "--pipeline", "w8a8", "--calib", str(calib_npz), "--calib-count", "16", "--no-drift"]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert "disk holding" in err and "is full (No space left on device)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging or scratch folder
