"""Shared pieces of the benchmarks. The scoring on the phantom's held-out truth (models, class
prior and oracle on the same rows) lives in `lsdc.evaluation`, shared with the demo's report; it
is re-exported here for the benchmark scripts. `run_child` is how a benchmark measures one stage
in its own process: wall time and that process's peak resident memory."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lsdc.evaluation import heldout_scores, narrowing_table, oracle_probs, ratio

__all__ = ["ChildRun", "heldout_scores", "narrowing_table", "oracle_probs", "ratio", "run_child"]


@dataclass
class ChildRun:
    command: list[str]
    status: int
    seconds: float
    # ru_maxrss from wait4: the peak of the child process itself (of its largest descendant
    # when it waits for its own workers), never the sum over processes.
    peak_rss_mb: float


def run_child(
    command: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    log: str | Path | None = None,
) -> ChildRun:
    """Run `command` to completion -> its exit status, wall seconds and peak RSS. Output goes
    to `log` when given (appended), else to this process's terminal."""
    t0 = time.perf_counter()
    out = open(log, "a") if log is not None else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
        )
        # wait4, not Popen.wait: it returns the rusage of this child alone, so stages measured
        # one after another in the same parent each get their own peak.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if out is not None:
            out.close()
    return ChildRun(
        command=list(command),
        status=proc.returncode,
        seconds=round(time.perf_counter() - t0, 2),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
    )
