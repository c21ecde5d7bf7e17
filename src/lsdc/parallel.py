"""Per-item parallel map with a progress bar, where one failing item never ends the batch.

Items run in this process, in a local process pool, or on a Dask cluster (`Executor`): a new
`LocalCluster` on this machine or an existing one at a scheduler address. Dask is optional
(`pip install 'lsdc[dask]'`) and imported only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lsdc.interrupt import ignore_sigint

T = TypeVar("T")
R = TypeVar("R")
_END = object()
EXECUTORS = ("local", "dask")
# On a cluster lsdc starts itself, a study whose worker died is tried once more on another
# worker: one retry covers a worker lost to something else (the OOM killer choosing it for a
# neighbour's memory), while a study that kills every worker it touches (a decoder crash)
# costs two worker restarts, not Dask's default four. An existing cluster keeps its own
# `distributed.scheduler.allowed-failures`.
LOCAL_CLUSTER_ALLOWED_FAILURES = 1


class MissingOptionalDependency(ImportError):
    """An optional feature was asked for but its packages are not installed."""


def _missing_dask() -> MissingOptionalDependency:
    return MissingOptionalDependency(
        "the dask executor needs dask and distributed, which are not installed: "
        "install the optional group: pip install 'lsdc[dask]'"
    )


@dataclass(frozen=True)
class Executor:
    """Where `parallel_map` runs its items.

    `local`: this process (1 worker) or a fork-server process pool. `dask`: a
    `distributed.Client` on a new `LocalCluster` of `workers` single-threaded processes, or,
    with `scheduler` (e.g. ``tcp://host:8786``), on that existing cluster, whose workers must
    have lsdc installed and see the same data and cache paths.
    """

    kind: str = "local"
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}: {' | '.join(EXECUTORS)}")
        if self.scheduler is not None and self.kind != "dask":
            raise ValueError("a scheduler address needs the dask executor (--executor dask)")
        # Checked here, so a missing package is named before any work starts.
        if self.kind == "dask" and importlib.util.find_spec("distributed") is None:
            raise _missing_dask()


LOCAL = Executor()


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


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _call(fn: Callable[[T], R], item: T) -> Outcome[T, R]:
    try:
        return Outcome(item, fn(item))
    except Exception as exc:  # noqa: BLE001 - one bad item is reported, never the end of a batch
        return Outcome(item, error=_error_text(exc))


def _warm(initializer: Callable[[], object] | None) -> None:
    """Run a warm-up; its error is left for the items, which meet it and report it one by one
    (an initializer that raised would break a whole local pool)."""
    if initializer is None:
        return
    with contextlib.suppress(Exception):  # each item meets the same error and reports it
        initializer()


# The native thread pools of a pool worker (OpenMP: XGBoost, scikit-learn, torch; BLAS).
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _pool_worker_start(threads: int, initializer: Callable[[], object] | None) -> None:
    """Each pool worker's start: Ctrl-C left to the main process (which stops the pool), its
    native thread pools sized to its share of the cores, then the warm-up. Left at their
    default, N workers each ran one thread per core: 2 workers on 2 cores preprocessed 120
    studies in 26.0 s, against 12.2 s with one thread each. An explicit setting of the user's
    (OMP_NUM_THREADS in the environment) is kept."""
    ignore_sigint()
    for var in _THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    _warm(initializer)
    from threadpoolctl import threadpool_limits

    # For the libraries already loaded (the forkserver's imports), which read the variables
    # only when they load; those loaded later read them.
    own = os.environ["OMP_NUM_THREADS"]
    threadpool_limits(int(own) if own.isdigit() else threads)


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    desc: str = "working",
    progress: bool = True,
    executor: Executor = LOCAL,
    initializer: Callable[[], object] | None = None,
) -> Iterator[Outcome[T, R]]:
    """Apply `fn` to every item, yielding an `Outcome` per item as it completes.

    `workers` > 1, or the dask executor, runs items in other processes (`fn` and items must
    pickle, so `fn` is a module-level function or a `functools.partial` of one); at most
    2x`workers` items are in flight (2x the cluster's threads on an existing Dask cluster) so
    memory stays bounded on big datasets. Order of outcomes is completion order. On Dask, an
    item whose worker died more often than the scheduler allows is reported failed
    (`KilledWorker`), like an item that raised.

    `initializer()` (picklable, like `fn`) runs once in each process before it runs items (in
    this one with a single local worker; on Dask, on the workers the cluster has when the map
    starts): a warm-up, such as handing every worker models loaded once here, so each does
    not load its own. Items must not depend on it: a worker without it (one Dask restarted)
    must still give the same results, only later; its error is ignored, for the items to meet.
    """
    items = list(items)
    workers = max(1, min(int(workers), len(items) or 1, os.cpu_count() or 1))
    with _progress(desc, len(items), progress) as bar:
        task = bar.add_task(desc, total=len(items))
        if not items:
            return
        if executor.kind == "dask":
            outcomes = _dask_map(fn, items, workers, executor.scheduler, initializer)
        elif workers == 1:
            _warm(initializer)
            outcomes = (_call(fn, item) for item in items)
        else:
            outcomes = _pool_map(fn, items, workers, initializer)
        for out in outcomes:
            bar.advance(task)
            yield out


def loader_context(num_workers: int) -> str | None:
    """The start method of a torch DataLoader's worker processes: "forkserver" when it has
    any. Forked from a training process (Lightning's, with its OpenMP and gloo threads), a
    loader worker can block for ever on a lock another thread held at the fork: the rehearsal
    of the gpu preset hung there, one rank waiting on its worker. The server forks from a clean
    process; the datasets travel by pickle (their shared-memory epoch with them)."""
    return "forkserver" if num_workers > 0 else None


def _pool_map(
    fn: Callable[[T], R],
    items: list[T],
    workers: int,
    initializer: Callable[[], object] | None = None,
) -> Iterator[Outcome[T, R]]:
    # forkserver, not fork: a child forked from a process whose OpenMP runtime already ran
    # (torch, XGBoost) can hang for ever at its first parallel region. Workers fork from a
    # clean server process instead; `fn`, items and the initializer travel by pickle.
    context = multiprocessing.get_context("forkserver")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_pool_worker_start,
        initargs=(threads, initializer),
    ) as pool:
        pending: set[Future[Outcome[T, R]]] = set()
        queue = iter(items)
        try:
            for item in queue:
                pending.add(pool.submit(_call, fn, item))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
                    nxt = next(queue, _END)
                    if nxt is not _END:
                        pending.add(pool.submit(_call, fn, nxt))
        except BaseException:
            # Interrupted, or the caller stopped reading: the pool's end waits for the items
            # running now (each written whole or not at all), not for those still queued.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _dask_map(
    fn: Callable[[T], R],
    items: list[T],
    workers: int,
    scheduler: str | None,
    initializer: Callable[[], object] | None = None,
) -> Iterator[Outcome[T, R]]:
    try:
        import dask
        import distributed
    except ImportError as exc:
        raise _missing_dask() from exc

    with contextlib.ExitStack() as stack:
        if scheduler is None:
            # Read by the scheduler when it starts, so it applies to this cluster only.
            with dask.config.set(
                {"distributed.scheduler.allowed-failures": LOCAL_CLUSTER_ALLOWED_FAILURES}
            ):
                # Single-threaded worker processes, as in the local pool: the per-study code
                # holds the GIL most of the time. No dashboard: it needs bokeh and a port on a
                # shared machine; whoever wants one starts `dask scheduler` and passes its
                # address.
                target: Any = stack.enter_context(
                    distributed.LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        silence_logs=logging.ERROR,
                    )
                )
        else:
            target = scheduler
        client = stack.enter_context(distributed.Client(target))
        if initializer is not None:
            # The workers there now; one that joins or restarts later does without it.
            client.run(_warm, initializer)
        yield from _dask_window(client, fn, items, distributed)


def _dask_window(
    client: Any, fn: Callable[[T], R], items: list[T], distributed: Any
) -> Iterator[Outcome[T, R]]:
    """Keep at most 2x the cluster's threads in flight, re-counted as results come back
    (workers may join, leave or be restarted while the batch runs)."""

    def window() -> int:
        return 2 * max(1, sum(client.nthreads().values()))

    item_of: dict[Any, T] = {}

    def submit(item: T) -> Any:
        # pure=False: two equal items (or a rerun) are separate tasks, never a cached result.
        fut = client.submit(_call, fn, item, pure=False)
        item_of[fut.key] = item
        return fut

    queue = iter(items)
    running = distributed.as_completed()
    for item in queue:
        running.add(submit(item))
        if running.count() >= window():
            break
    for fut in running:
        item = item_of.pop(fut.key)
        try:
            out = fut.result()
        except Exception as exc:  # noqa: BLE001 - a dead worker (KilledWorker) fails one item
            out = Outcome(item, error=_error_text(exc))
        fut.release()  # the result is in hand; the cluster need not keep it
        yield out
        while running.count() < window():
            nxt = next(queue, _END)
            if nxt is _END:
                break
            running.add(submit(nxt))  # type: ignore[arg-type]
