import numpy as np
import pytest

from lsdc.fileio import atomic_write_bytes, load_npz, save_npz


def test_npz_round_trip_without_pickle(tmp_path):
    arrays = {"img": np.arange(12, dtype=np.float16).reshape(3, 4), "mask": np.array([1, 0], bool)}
    meta = {"study_id": 7, "series": [1, 2], "name": "x"}
    path = save_npz(tmp_path / "a.npz", arrays, meta)
    got, got_meta = load_npz(path)
    assert got_meta == meta
    assert set(got) == {"img", "mask"}
    np.testing.assert_array_equal(got["img"], arrays["img"])
    assert got["img"].dtype == np.float16


def test_reserved_name_rejected(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_npz(tmp_path / "a.npz", {"__meta__": np.zeros(1)}, {})


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lsdc.fileio.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
