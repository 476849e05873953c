import io
import logging

from qcompiler.support import progress as progress_mod


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_live_line_is_drawn_and_cleared(monkeypatch):
    monkeypatch.setattr(progress_mod, "REDRAW_SECONDS", 0.0)
    logging.getLogger("qcompiler").setLevel(logging.INFO)
    stream = _Tty()
    bar = progress_mod.Progress("calibrate", total=3, stream=stream)
    bar.update()
    bar.update()
    bar.close()
    text = stream.getvalue()
    assert "\rcalibrate: 1/3" in text and "\rcalibrate: 2/3" in text
    assert text.endswith("\r\033[K")


def test_long_step_logs_one_line(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "QUIET_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="qcompiler"):
        with progress_mod.progress("eval", total=2) as bar:
            bar.update()
            bar.update()
    assert any("eval: 2 done in" in r.getMessage() for r in caplog.records)


def test_nothing_is_drawn_off_a_terminal():
    stream = io.StringIO()
    bar = progress_mod.Progress("x", total=1, stream=stream)
    bar.update()
    bar.close()
    assert stream.getvalue() == ""


def test_build_log_gets_periodic_lines_with_time_left(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 0.0)
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="qcompiler"):
        bar = progress_mod.Progress("smooth layers", total=4, stream=io.StringIO())  # starts at t=0
        bar.update()  # t=1: 1 of 4 in 1 s -> 3 s left
        bar.update()  # t=2: 2 of 4 in 2 s -> 2 s left
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["smooth layers: 1 of 4, 1 s, about 3 s left", "smooth layers: 2 of 4, 2 s, about 2 s left"]
