"""Progress for steps that take more than a couple of seconds.

On a terminal, a single status line on stderr is redrawn (`label: done/total, elapsed`, and with a
total the estimated time left); elsewhere (a build log) an INFO line of the same form
(`label: 12 of 30, 41 s, about 62 s left`) is logged every `LOG_SECONDS` while the step runs, so a log
shows where a long step is, and one INFO line reports the step when it ends, if it took more than
`QUIET_SECONDS`. Either way the lines go through `logging`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("qcompiler")

QUIET_SECONDS = 2.0
REDRAW_SECONDS = 0.5
LOG_SECONDS = 30.0  # off a terminal: one progress line at most this often


class Progress:
    def __init__(self, label: str, total: int | None, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() and log.isEnabledFor(logging.INFO)
        self.start = self.last = self.logged = time.perf_counter()

    def update(self, done: int | None = None) -> None:
        self.done = self.done + 1 if done is None else done
        now = time.perf_counter()
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        if self.live and now - self.last >= REDRAW_SECONDS:
            self.last = now
            self.stream.write(f"\r{self.label}: {count}, {now - self.start:.0f} s{self.remaining(now)} ")
            self.stream.flush()
        elif not self.live and now - self.logged >= LOG_SECONDS and not (self.total and self.done >= self.total):
            self.logged = now
            done = f"{self.done} of {self.total}" if self.total else f"{self.done}"
            log.info("%s: %s, %.0f s%s", self.label, done, now - self.start, self.remaining(now))

    def remaining(self, now: float) -> str:
        """`, about N s left` from the mean time per item so far ("" without a total or progress)."""
        if not self.total or not self.done or self.done >= self.total:
            return ""
        left = (now - self.start) / self.done * (self.total - self.done)
        return f", about {left:.0f} s left"

    def close(self) -> float:
        seconds = time.perf_counter() - self.start
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        return seconds


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Progress]:
    """`with progress("calibrate", total=16) as p: ... p.update()`; logs `label: N in X s` at the end."""
    bar = Progress(label, total)
    try:
        yield bar
    finally:
        seconds = bar.close()
        if seconds >= QUIET_SECONDS:
            count = f"{bar.done} " if bar.done else ""
            log.info("%s: %sdone in %.1f s", label, count, seconds)
