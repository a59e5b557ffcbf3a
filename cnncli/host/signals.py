"""SIGINT (Ctrl-C) and SIGTERM (what `timeout`, a cluster scheduler or `docker stop` send) as stop requests.

Inside `stop_signals()` both signals go to one handler, in the main thread:

- in a *deferring* section (the training loop: `StopSignals.deferring()`) the first signal only sets a flag,
  which the loop checks between steps: it finishes the running step, saves a resumable checkpoint and stops;
- a later signal there, or the first one outside such a section (data loading, the test evaluation), raises
  KeyboardInterrupt: stop now;
- in a *shielded* section (checkpoints and metrics being written: `StopSignals.shielded()`) signals are only
  recorded, so an abort never lands inside a write and the files of one epoch stay consistent;
- once the run is on its way out (an abort was raised, or the loop left with any exception), later signals are
  ignored while the stack unwinds: the engine's `finally` waits for its worker threads, run.json is written.

When `stop_signals()` ends, the previous handlers come back, except in the `cnn` console script
(`console_script()`): there a process leaving because of a signal keeps a handler that turns any further
signal into an immediate, silent exit with the same code, and the script ends with `exit_now`, skipping the
interpreter's shutdown (which joins the engine's worker threads and late in it restores the default handlers),
so nothing can raise there: no "Exception ignored in threading._shutdown", no traceback, no death by SIGINT.

Exit codes (the CLI's): 128 + the first signal's number: 130 for SIGINT, 143 for SIGTERM.
No output here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_ACTIVE: StopSignals | None = None
_CONSOLE = False  # set by the `cnn` console script: a process that leaves on a signal exits quietly
_LAST: int | None = None  # the first signal the last `stop_signals()` block received


def signal_name(signum: int | None) -> str:
    """'SIGINT', 'SIGTERM', …; 'SIGINT' for None (Ctrl-C is what users mostly press)."""
    try:
        return signal.Signals(signum if signum is not None else signal.SIGINT).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int | None) -> int:
    """The conventional exit status of a process stopped by `signum`: 128 + its number (130, 143)."""
    return 128 + (signum if signum is not None else signal.SIGINT)


class StopSignals:
    """The stop requests one `stop_signals()` block received; `is_set()` is the flag the training loop checks."""

    def __init__(self, active: bool = True) -> None:
        self.active = active  # False: not the main thread, no handler installed (nothing is ever received)
        self.signum: int | None = None  # the first signal received
        self.count = 0
        self.leaving = False
        self._deferring = 0
        self._shielded = 0

    def is_set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        global _LAST
        self.count += 1
        if self.signum is None:
            self.signum = _LAST = signum
        if self.leaving or self._shielded:
            return
        if self._deferring and self.count == 1:
            return
        self.leaving = True
        raise KeyboardInterrupt

    @contextmanager
    def deferring(self) -> Iterator[StopSignals]:
        """The first signal inside is a request (`is_set()`); the block leaving with an exception means the run
        is on its way out, and later signals are ignored."""
        self._deferring += 1
        try:
            yield self
        except BaseException:
            self.leaving = True
            raise
        finally:
            self._deferring -= 1

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Signals inside are only recorded (`is_set()` says so afterwards)."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1


def exit_now(code: int) -> None:
    """Flush stdout and stderr and end the process with `code` at once, skipping the interpreter's shutdown
    (which would join the engine's worker threads and, late in it, restore the default handlers)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - leaving anyway; a broken stream must not stop the exit
            pass
    os._exit(code)


def _quiet_exit(code: int) -> Any:
    def handler(signum: int, frame: Any) -> None:
        exit_now(code)

    return handler


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGINT and SIGTERM handled as described in the module docstring, for the block's duration.

    Nested blocks share the outer one's state. Outside the main thread nothing is installed (Python runs
    handlers in the main thread only) and the yielded state never receives a signal.
    """
    global _ACTIVE, _LAST
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    if threading.current_thread() is not threading.main_thread():
        yield StopSignals(active=False)
        return
    _LAST = None
    state = StopSignals()
    previous = {s: signal.signal(s, state._handle) for s in STOP_SIGNALS}
    _ACTIVE = state
    try:
        yield state
    finally:
        _ACTIVE = None
        if _CONSOLE and state.signum is not None:
            for s in STOP_SIGNALS:
                signal.signal(s, _quiet_exit(exit_code(state.signum)))
        else:
            for s, h in previous.items():
                signal.signal(s, h)


def console_script() -> None:
    """Called by the `cnn` console script: a command that leaves because of a signal exits quietly on further ones."""
    global _CONSOLE
    _CONSOLE = True


def last_signal() -> int | None:
    """The first signal received by the most recent `stop_signals()` block (None when there was none)."""
    return _LAST
