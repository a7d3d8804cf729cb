"""SIGTERM and SIGINT end a stage as a failure (exit 128 + signal) with nothing half-written.

Outside training a signal raises `StageInterrupted` at once, so `atomic_dir`/`atomic_file`
remove their temporary output on the way out. While a training loop runs, the first signal is
deferred: the trainer saves a checkpoint at the next optimizer-step boundary and then raises
(`models.training.StopOnSignal`), so a rerun continues from that step. A second signal raises
at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StageInterrupted(BaseException):
    """A stage stopped by a signal. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` (Hydra's, a library's) turns it into an ordinary failure."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.stage: str | None = None  # the stage unit it stopped, set by whoever knows it
        super().__init__(f"interrupted by {signal.Signals(signum).name}{detail}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 143 for SIGTERM, 130 for SIGINT, as a shell reports it."""
        return 128 + self.signum


class _SignalState:
    """The signal received (if any) and whether a training loop is deferring it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring and self.received is None:
            self.received = signum
            return
        raise StageInterrupted(signum)


_state = _SignalState()


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT go to this module's handler (main thread only, as Python requires;
    elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _state.handle)


def received_signal() -> int | None:
    """The signal this process received, if any."""
    return _state.received


@contextlib.contextmanager
def naming_stage(name: str) -> Iterator[None]:
    """A `StageInterrupted` raised in the block names stage unit `name`."""
    try:
        yield
    except StageInterrupted as err:
        err.stage = err.stage or name
        raise


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise `StageInterrupted` (main thread only)."""
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    install_signal_handlers()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Within the block a first signal is only recorded: the training loop stops at a step
    boundary after checkpointing (see `received_signal`)."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring:
            _state.received = None
