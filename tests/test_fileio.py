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


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, mask):
    import os
    import stat

    from lsdc.fileio import atomic_write_text

    old = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / f"f{mask}.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_truncated_weights_file_is_named(tmp_path):
    import torch

    from lsdc.fileio import CorruptFileError
    from lsdc.training.engine import load_model_weights, save_model_weights

    model = torch.nn.Linear(4, 3)
    path = save_model_weights(model, tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptFileError, match=str(path)):
        load_model_weights(torch.nn.Linear(4, 3), path)
