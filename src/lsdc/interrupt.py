"""Ctrl-C for the commands: SIGINT raises `Interrupted`, which every `finally` sees (atomic
writes remove their temporary file) but no library turns into something else.

A KeyboardInterrupt would not reach the command's end as one: Lightning ends the process with
sys.exit(1) on one (and ignores SIGINT from then on), which left `lsdc fit` silent with status
1; typer turns one into a silent exit. `Interrupted` is a BaseException that is not a
KeyboardInterrupt, so Lightning tears the trainer down and raises it again, and `except
Exception` handlers (one failing study never ends a batch) do not swallow it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_STATUS = 130  # 128 + SIGINT, as a shell reports a process that SIGINT ended


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) under `sigint_raises`; its message says what was interrupted."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("interrupted")


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """Within the block, SIGINT raises `Interrupted` (outside the main thread, where no signal
    handler can be set, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ignore_sigint() -> None:
    """For a worker process: Ctrl-C at a terminal reaches every process of the foreground job;
    the worker finishes its item and the main process, interrupted, stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
