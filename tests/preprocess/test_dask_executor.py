"""Preprocessing on a Dask cluster: the same cache as the local pool, and a worker killed in the
middle of saving a study costs that study only, leaves no file under its name and the rerun
finishes the cache."""

from __future__ import annotations

import json
import os
from functools import partial

import numpy as np
import pytest

from lsdc.fileio import temporaries
from lsdc.parallel import Executor
from lsdc.preprocess.cache import StudyCache

pytest.importorskip("distributed", reason="the optional group: pip install 'lsdc[dask]'")

MIDDLE = ["crop_size=48", "selection.without_prediction=middle", "selection.prefer_labelled=true"]
STUDIES = [1000, 1001, 1002, 1005]  # 1005 has no coordinates: the middle-slice path too


def _outputs(folder) -> dict[str, bytes]:
    # Every file the run leaves: the studies, the manifest, the axial ROI, errors and warnings.
    # np.savez stamps every zip member 1980-01-01 (zipfile's default for a member written
    # by name), so equal arrays and meta give equal bytes: no need to compare contents.
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_a_two_worker_cluster_builds_the_local_cache_byte_for_byte(tiny_dataset, tmp_path):
    from lsdc.preprocess.multitask import preprocess_dataset

    root, _ = tiny_dataset
    runs = {}
    for name, executor in (("local", Executor()), ("dask", Executor("dask"))):
        report = preprocess_dataset(
            root, tmp_path / name, overrides=MIDDLE, study_ids=STUDIES, workers=2,
            executor=executor, progress=False,
        )  # fmt: skip
        assert report.written == STUDIES and not report.failed
        runs[name] = _outputs(tmp_path / name)
    assert sorted(runs["dask"]) == sorted(runs["local"])
    assert {f"{s}.npz" for s in STUDIES} <= set(runs["dask"])
    assert runs["dask"] == runs["local"]


def _build(study_id: int) -> tuple[dict, dict]:
    return {"x": np.full((64, 64), study_id, np.float32)}, {"study_id": study_id}


def _dies_while_saving(study_id: int, doomed: int) -> tuple[dict, dict]:
    if study_id == doomed:
        import lsdc.fileio

        # The worker process ends between writing the study's temporary file and renaming it
        # into place: the worst moment to lose a worker (os._exit runs no cleanup, as SIGKILL).
        lsdc.fileio.os.replace = lambda *args: os._exit(1)
    return _build(study_id)


@pytest.mark.slow
def test_a_worker_killed_while_saving_fails_that_study_and_the_rerun_completes(tmp_path):
    cache = StudyCache(tmp_path, "toy", {"size": 64})
    ids = [1, 2, 3, 4, 5, 6]
    report = cache.run(
        ids, partial(_dies_while_saving, doomed=3), workers=2, executor=Executor("dask"),
        progress=False,
    )  # fmt: skip
    # Dask tries the study once more on another worker (lsdc's own cluster allows one retry),
    # which dies too: the study is reported failed, the batch goes on.
    assert "KilledWorker" in report.failed[3]
    assert "on 2 different workers" in report.failed[3]
    # A study queued on a worker that died shares the blame (Dask counts every task it held);
    # it is retried elsewhere and fails only if its second worker dies too.
    assert sorted([*report.written, *report.failed]) == ids
    assert all("KilledWorker" in why for why in report.failed.values())
    assert not cache.has(3)
    # Both dead workers had written their temporary file; nothing is under the study's name.
    assert len(temporaries(tmp_path)["3.npz"]) == 2
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert 3 in [e["study_id"] for e in errors]

    again = StudyCache(tmp_path, "toy", {"size": 64}).run(ids, _build, progress=False)
    assert not again.failed and 3 in again.written
    assert cache.study_ids() == ids and temporaries(tmp_path) == {}
    arrays, meta = cache.load(3)
    assert meta["study_id"] == 3 and float(arrays["x"].mean()) == 3.0
