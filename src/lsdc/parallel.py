"""Per-item parallel map with a progress bar, where one failing item never ends the batch."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")
R = TypeVar("R")
_END = object()


@dataclass
class Outcome(Generic[T, R]):
    """The result of `fn(item)`, or the error it raised (as text, with its type)."""

    item: T
    result: R | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _progress(desc: str, total: int, enabled: bool) -> Progress:
    return Progress(
        TextColumn(desc),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _call(fn: Callable[[T], R], item: T) -> Outcome[T, R]:
    try:
        return Outcome(item, fn(item))
    except Exception as exc:  # noqa: BLE001 - one bad item is reported, never the end of a batch
        return Outcome(item, error=f"{type(exc).__name__}: {exc}")


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    desc: str = "working",
    progress: bool = True,
) -> Iterator[Outcome[T, R]]:
    """Apply `fn` to every item, yielding an `Outcome` per item as it completes.

    `workers` > 1 uses processes started by a fork server (`fn` and items must pickle, so
    `fn` is a module-level function or a `functools.partial` of one); at most 2x`workers` items
    are in flight so memory stays bounded on big datasets. Order of outcomes is completion order.
    """
    items = list(items)
    workers = max(1, min(int(workers), len(items) or 1, os.cpu_count() or 1))
    with _progress(desc, len(items), progress) as bar:
        task = bar.add_task(desc, total=len(items))
        if workers == 1:
            for item in items:
                out = _call(fn, item)
                bar.advance(task)
                yield out
            return
        # forkserver, not fork: a child forked from a process whose OpenMP runtime already ran
        # (torch, XGBoost) can hang for ever at its first parallel region. Workers fork from a
        # clean server process instead; `fn` and items travel by pickle either way.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending: set[Future[Outcome[T, R]]] = set()
            queue = iter(items)
            for item in queue:
                pending.add(pool.submit(_call, fn, item))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    bar.advance(task)
                    yield fut.result()
                    nxt = next(queue, _END)
                    if nxt is not _END:
                        pending.add(pool.submit(_call, fn, nxt))
