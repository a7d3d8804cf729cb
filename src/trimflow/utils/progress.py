"""Progress of long loops: a bar on a terminal, plain periodic log lines anywhere else.

A bar redraws one line with carriage returns, which a log file, CI or a cluster job keeps as
one endless line (or not at all); there each loop logs where it is every `PLAIN_EVERY_N_SECONDS`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

PLAIN_EVERY_N_SECONDS = 30.0
T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stdout and stderr both go to a terminal (bars draw on either)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """`42s`, `2m10s` or `1h05m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Pace:
    """Rate and time left of a loop of `total` steps, and whether a plain line is due."""

    def __init__(
        self,
        total: float,
        every_n_seconds: float = PLAIN_EVERY_N_SECONDS,
        done: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.every_n_seconds = every_n_seconds
        self.clock = clock
        self.first = done
        self.start = self.last_line = clock()

    def due(self) -> bool:
        """Whether `every_n_seconds` have passed since the last line (or the start)."""
        return self.clock() - self.last_line >= self.every_n_seconds

    def elapsed(self) -> str:
        """The time since the start."""
        return duration(self.clock() - self.start)

    def status(self, done: int, unit: str = "it") -> str:
        """`3.1 it/s, 2m10s left` after `done` steps; the next line is due from now."""
        self.last_line = self.clock()
        seconds = self.last_line - self.start
        rate = (done - self.first) / seconds if seconds > 0 else 0.0
        if rate <= 0:
            return f"0 {unit}/s"
        speed = f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"
        if math.isinf(self.total):
            return speed
        return f"{speed}, {duration((self.total - done) / rate)} left"


@contextlib.contextmanager
def counting(
    total: int | None, desc: str, log: logging.Logger, unit: str
) -> Iterator[Callable[[int], None]]:
    """`advance(n)` for a loop that does `n` of its `total` units at a time (None: unknown): a
    tqdm bar on a terminal, else a line on `log` every `PLAIN_EVERY_N_SECONDS` and one at the
    end (when the block completes)."""
    if on_terminal():
        with tqdm(total=total, desc=desc, unit=unit) as bar:
            yield bar.update
        return
    pace = Pace(math.inf if total is None else total)
    of_total = "" if total is None else f"/{total}"
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if pace.due() and done != total:
            log.info("%s: %d%s %ss, %s", desc, done, of_total, unit, pace.status(done, unit))

    yield advance
    log.info("%s: %d %ss in %s", desc, done, unit, pace.elapsed())


def progress(items: Collection[T], desc: str, log: logging.Logger, unit: str) -> Iterator[T]:
    """`items` one by one with their progress, as `counting` shows it."""
    with counting(len(items), desc, log, unit) as advance:
        for item in items:
            yield item
            advance(1)
