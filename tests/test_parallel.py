import os

import pytest

from lsdc.parallel import parallel_map


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError("bad item 3")
    return x * x


def test_serial_and_parallel_agree_and_failures_are_isolated():
    for workers in (1, 2):
        outs = list(parallel_map(_square_or_fail, range(7), workers=workers, progress=False))
        assert sorted(o.item for o in outs) == list(range(7))
        ok = {o.item: o.result for o in outs if o.ok}
        assert ok == {i: i * i for i in range(7) if i != 3}
        (bad,) = [o for o in outs if not o.ok]
        assert bad.item == 3 and bad.error == "ValueError: bad item 3"


_WARMED: list[str] = []


def _warm_up(tag: str) -> None:
    _WARMED.append(tag)


def _fail_warm_up() -> None:
    raise RuntimeError("warm-up failed")


def _warm_state(x: int) -> tuple[int, list[str]]:
    import os

    return os.getpid(), list(_WARMED)


def test_the_initializer_runs_once_in_each_worker_before_its_items():
    import functools
    import os

    for workers in (1, 2):
        _WARMED.clear()
        init = functools.partial(_warm_up, f"w{workers}")
        outs = list(
            parallel_map(_warm_state, range(6), workers=workers, progress=False, initializer=init)
        )
        assert all(o.ok for o in outs)
        # Every item saw its process warmed up exactly once (pool workers start fresh).
        assert {tuple(o.result[1]) for o in outs} == {(f"w{workers}",)}
        pids = {o.result[0] for o in outs}
        assert (pids == {os.getpid()}) == (workers == 1)
    _WARMED.clear()


def test_a_failing_initializer_leaves_the_errors_to_the_items():
    for workers in (1, 2):
        outs = list(
            parallel_map(
                _square_or_fail, range(5), workers=workers, progress=False,
                initializer=_fail_warm_up,
            )
        )  # fmt: skip
        assert {o.item: o.result for o in outs if o.ok} == {0: 0, 1: 1, 2: 4, 4: 16}


def test_empty_input():
    assert list(parallel_map(_square_or_fail, [], workers=2, progress=False)) == []


def _xgboost_predicts(seed: int) -> float:
    import numpy as np
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(200, 8)), rng.integers(0, 2, 200)
    model = xgb.XGBClassifier(n_estimators=5, n_jobs=2).fit(x, y)
    return float(model.predict_proba(x)[:, 1].mean())


_AFTER_OPENMP = """
import torch
from lsdc.parallel import parallel_map
from tests.test_parallel import _xgboost_predicts

torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)  # torch's OpenMP pool is up in this process
_xgboost_predicts(0)  # and XGBoost's
outs = list(parallel_map(_xgboost_predicts, [1, 2, 3], workers=2, progress=False))
assert all(o.ok for o in outs), [o.error for o in outs]
print("ok")
"""


def test_a_pool_after_torch_and_xgboost_ran_here_does_not_hang():
    # Forked from such a process, a worker hung for ever at its first OpenMP region (it did,
    # in `lsdc demo`'s predict after fit). Run in a fresh interpreter under a timeout, so a
    # regression fails instead of hanging the suite.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _AFTER_OPENMP], cwd=root, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- the dask executor


def test_without_dask_the_executor_names_the_optional_group(monkeypatch, tmp_path, capsys):
    import sys

    from lsdc.cli import main
    from lsdc.parallel import Executor, MissingOptionalDependency

    pytest.importorskip("distributed")  # built while installed, run after it is gone
    built = Executor("dask")
    # A None entry in sys.modules makes `import distributed` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.setitem(sys.modules, "dask", None)
    hint = "install the optional group: pip install 'lsdc[dask]'"
    with pytest.raises(MissingOptionalDependency, match=hint.replace("[", r"\[")):
        Executor("dask")
    with pytest.raises(MissingOptionalDependency, match="lsdc"):
        list(parallel_map(_square_or_fail, [1], executor=built, progress=False))
    # On the command line: one line, before any work.
    args = ["preprocess", str(tmp_path), "--pipeline", "sequence", "--cache", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--executor", "dask"])
    assert exit_info.value.code == 1
    assert hint in capsys.readouterr().err.splitlines()[0]
    assert not (tmp_path / "c").exists()


def test_executor_settings_are_checked():
    from lsdc.parallel import Executor

    with pytest.raises(ValueError, match="unknown executor 'spark'"):
        Executor("spark")
    with pytest.raises(ValueError, match="needs the dask executor"):
        Executor("local", scheduler="tcp://127.0.0.1:8786")


@pytest.mark.slow
def test_dask_on_an_existing_cluster_isolates_failures_and_leaves_no_process():
    distributed = pytest.importorskip("distributed")
    import psutil  # a dependency of distributed

    from lsdc.parallel import Executor

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40
    ) as cluster:
        executor = Executor("dask", scheduler=cluster.scheduler_address)
        outs = list(parallel_map(_square_or_fail, range(9), executor=executor, progress=False))
        assert sorted(o.item for o in outs) == list(range(9))
        assert {o.item: o.result for o in outs if o.ok} == {i: i * i for i in range(9) if i != 3}
        (bad,) = [o for o in outs if not o.ok]
        assert bad.item == 3 and bad.error == "ValueError: bad item 3"
    # A cluster parallel_map starts itself is closed with its workers.
    outs = list(parallel_map(_square_or_fail, [1, 2], workers=2, executor=Executor("dask"),
                             progress=False))  # fmt: skip
    assert sorted(o.result for o in outs) == [1, 4]
    # multiprocessing's resource tracker stays, as it does after any process pool: one per
    # interpreter, it ends with this process.
    left = [
        p.cmdline()
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not [c for c in left if "multiprocessing.resource_tracker" not in " ".join(c)], left


@pytest.mark.slow
def test_dask_workers_run_the_initializer_before_their_items():
    pytest.importorskip("distributed")
    import functools

    from lsdc.parallel import Executor

    init = functools.partial(_warm_up, "dask")
    outs = list(
        parallel_map(_warm_state, range(4), workers=2, executor=Executor("dask"),
                     progress=False, initializer=init)
    )  # fmt: skip
    assert all(o.ok for o in outs)
    assert {tuple(o.result[1]) for o in outs} == {("dask",)}


def _native_threads(_: int) -> tuple[str, int]:
    import numpy as np  # noqa: F401 - its BLAS is one of the pools counted
    from threadpoolctl import threadpool_info

    return os.environ.get("OMP_NUM_THREADS", ""), max(p["num_threads"] for p in threadpool_info())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a pool needs 2 cores here")
def test_pool_workers_share_the_cores_instead_of_each_taking_all(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    share = (os.cpu_count() or 1) // 2
    outs = list(parallel_map(_native_threads, [0, 1, 2, 3], workers=2, progress=False))
    assert all(o.ok for o in outs)
    assert {o.result for o in outs} == {(str(share), share)}
