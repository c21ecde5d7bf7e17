import json
from functools import partial

import numpy as np
import pytest

from lsdc.preprocess.cache import CacheMismatchError, StudyCache


def _build(study_id: int, fail: frozenset[int] = frozenset()) -> tuple[dict, dict]:
    if study_id in fail:
        raise RuntimeError(f"study {study_id}: no sagittal series")
    return {"x": np.full((2, 3), study_id, np.float32)}, {"study_id": study_id}


def test_run_writes_skips_and_records_failures(tmp_path):
    cache = StudyCache(tmp_path, "demo", {"size": 8})
    report = cache.run([1, 2, 3], partial(_build, fail=frozenset({2})), progress=False)
    assert report.written == [1, 3] and report.skipped == [] and list(report.failed) == [2]
    assert "no sagittal series" in report.failed[2]
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"study_id": 2, "error": "RuntimeError: study 2: no sagittal series"}]
    arrays, meta = cache.load(3)
    np.testing.assert_array_equal(arrays["x"], np.full((2, 3), 3, np.float32))
    assert meta["study_id"] == 3 and meta["config_hash"] == cache.hash

    before = cache.path(1).stat().st_mtime_ns
    again = StudyCache(tmp_path, "demo", {"size": 8}).run(
        [1, 2, 3], _build, workers=2, progress=False
    )
    assert again.skipped == [1, 3] and again.written == [2] and not again.failed
    assert cache.path(1).stat().st_mtime_ns == before
    assert cache.study_ids() == [1, 2, 3]
    assert (tmp_path / "errors.jsonl").read_text() == ""


def test_a_killed_writers_temporary_file_goes_when_its_study_is_built(tmp_path):
    from lsdc.fileio import temporaries

    cache = StudyCache(tmp_path, "demo", {"size": 8})
    cache.run([1], _build, progress=False)
    # What atomic_write_bytes leaves when its process dies before the rename.
    (tmp_path / ".2.npz.k3j_x9a1.tmp").write_bytes(b"PK half a zip")
    (tmp_path / ".9.npz.0abc_123.tmp").write_bytes(b"not this run's study")
    assert sorted(temporaries(tmp_path)) == ["2.npz", "9.npz"]
    assert cache.study_ids() == [1]  # never taken for a study
    report = cache.run([1, 2], _build, progress=False)
    assert report.written == [2] and report.skipped == [1]
    assert list(temporaries(tmp_path)) == ["9.npz"]


def test_other_config_in_same_folder_is_refused(tmp_path):
    StudyCache(tmp_path, "demo", {"size": 8})
    with pytest.raises(CacheMismatchError, match="another cache folder"):
        StudyCache(tmp_path, "demo", {"size": 16})
    with pytest.raises(CacheMismatchError):
        StudyCache(tmp_path, "other", {"size": 8})
    assert StudyCache.open(tmp_path).config == {"size": 8}


def test_open_requires_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        StudyCache.open(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_cached_file_is_named_and_built_again(tmp_path, damage, capsys):
    from lsdc.fileio import CorruptFileError

    cache = StudyCache(tmp_path, "demo", {"size": 8})
    cache.run([1, 2], _build, progress=False)
    path = cache.path(2)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 0xFF  # inside the array bytes: only the checksum sees it
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    if damage != "flip":
        with pytest.raises(CorruptFileError, match=str(path)):
            cache.load(2)

    report = cache.run([1, 2], _build, progress=False)
    assert report.skipped == [1] and report.written == [2] and list(report.repaired) == [2]
    assert str(path) in capsys.readouterr().err
    np.testing.assert_array_equal(cache.load(2)[0]["x"], np.full((2, 3), 2, np.float32))


def test_unwritable_cache_folder_fails_once_before_any_study(tmp_path, monkeypatch):
    import tempfile

    cache = StudyCache(tmp_path, "demo", {"size": 8})

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # a read-only folder, even for root
    built = []
    with pytest.raises(PermissionError, match=f"{tmp_path}: cannot write here"):
        cache.run([1, 2], lambda s: built.append(s) or _build(s), progress=False)
    assert built == []


def test_study_files_skip_the_fsync_that_other_writes_keep(tmp_path, monkeypatch):
    # A study file is CRC-checked before a rerun trusts it (test above), so it may skip the
    # sync; files nothing verifies (manifests, weights, OOF) must keep it.
    import lsdc.fileio as fileio

    synced = []
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: synced.append(fd))
    cache = StudyCache(tmp_path, "demo", {"size": 8})
    synced.clear()
    cache.save(1, *_build(1))
    assert synced == [] and cache.load(1)[1]["study_id"] == 1
    fileio.save_npz(tmp_path / "oof.npz", {"x": np.zeros(2)}, {})
    assert len(synced) == 1
