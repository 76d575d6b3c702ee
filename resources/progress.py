"""A progress line as a Hugging Face user expects it, for every long loop (training, generation).

`ProgressReporter(what, log)` is the callback contract of the training and generation loops:
`progress(done, total)` or `progress(done, total, loss=...)`. It writes
`<what>: step 120/1000 (12%) loss 1.234 | 8.1 step/s | ETA 1m51s` through `log` (a stage passes its
Dagster `context.log.info`, so the line reaches the console and the run's log in the UI), on the
first call, then at most every `every` seconds, and once at the end.
"""
from __future__ import annotations

import time
from typing import Callable


def duration(seconds: float) -> str:
    """1h02m, 1m51s, 49s: as short as a console line wants."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressReporter:
    """progress(done, total, loss=None): a throttled progress line with rate and ETA."""

    def __init__(
        self,
        what: str,
        log: Callable[[str], None],
        unit: str = "it",
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.log, self.unit, self.every, self.clock = what, log, unit, every, clock
        self.created = clock()
        self.first: tuple[float, int] | None = None
        self.last_emit: float | None = None
        self.loss: float | None = None
        self.finished = False

    def rate(self, done: int, now: float) -> float | None:
        """Items per second since the first call (a loop's setup, e.g. encoding the batches before the
        first step, is not its rate); on the first call, since the reporter was made."""
        t0, d0 = self.first if self.first is not None and done > self.first[1] else (self.created, 0)
        return (done - d0) / (now - t0) if now > t0 and done > d0 else None

    def line(self, done: int, total: int, now: float) -> str:
        prefix = "" if self.unit == "it" else f"{self.unit} "
        parts = [f"{self.what}: {prefix}{done}/{total} ({100 * done // max(total, 1)}%)"]
        if self.loss is not None:
            parts[0] += f" loss {self.loss:.4f}"
        rate = self.rate(done, now)
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}")
        if done >= total:
            parts.append(f"took {duration(now - self.created)}")
        elif rate is not None:
            parts.append(f"ETA {duration((total - done) / rate)}")
        return " | ".join(parts)

    def __call__(self, done: int, total: int, loss: float | None = None) -> None:
        now = self.clock()
        if loss is not None:
            self.loss = float(loss)
        end = done >= total
        due = self.last_emit is None or now - self.last_emit >= self.every
        if (due and not end) or (end and not self.finished):
            self.log(self.line(done, total, now))
            self.last_emit = now
            self.finished = end
        if self.first is None:
            self.first = (now, done)
