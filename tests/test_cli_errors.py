"""Expected errors print one line naming what and where; --debug shows the traceback."""

from __future__ import annotations

import pytest

from lsdc.cli import main


def _fail(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "╭" not in err
    return err.splitlines()[0]


def test_missing_cache_is_one_line_naming_the_file(tmp_path, capsys):
    run = str(tmp_path / "run")
    line = _fail(["train", "multitask", str(tmp_path / "nope"), "--out", run], capsys)
    assert line == (
        f"error: {tmp_path / 'nope' / 'manifest.json'}: not a cache folder (no manifest) "
        "(FileNotFoundError)"
    )


def test_mistyped_override_names_the_key(tmp_path, capsys):
    cache, run = str(tmp_path / "cache"), str(tmp_path / "run")
    line = _fail(["train", "multitask", cache, "--out", run, "sizee=3"], capsys)
    assert "sizee" in line and line.startswith("error: ")


def test_debug_anywhere_on_the_line_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.delenv("LSDC_DEBUG", raising=False)
    with pytest.raises(FileNotFoundError, match="manifest"):
        main(
            ["train", "multitask", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--debug"]
        )


def test_a_truncated_cache_file_is_named_when_training(toy_multitask_cache, tmp_path, capsys):
    cache = toy_multitask_cache(n_studies=4, size=32)
    broken = sorted(cache.glob("*.npz"))[1]
    broken.write_bytes(broken.read_bytes()[:100])
    line = _fail(["train", "multitask", str(cache), "--out", str(tmp_path / "run")], capsys)
    assert line.startswith(f"error: {broken}: unreadable") and "CorruptFileError" in line


def test_commands_without_models_never_import_torch(tmp_path):
    # The error filter runs at every command's end (SystemExit included); importing torch
    # there cost `lsdc index` 4 s and 0.9 GB of peak memory.
    import subprocess
    import sys

    code = (
        "import sys\nfrom lsdc.cli import main\n"
        "try:\n    main(['index', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_unavailable_pretrained_weights_are_still_one_line(toy_sequence_cache, tmp_path, capsys):
    # PretrainedWeightsUnavailable is recognised once its (torch) module is loaded.
    cache = toy_sequence_cache(n_studies=4, size=16)
    line = _fail(
        ["train", "sequence", str(cache), "--out", str(tmp_path / "r"), "engine.folds=2",
         "model.pretrained=true"],
        capsys,
    )  # fmt: skip
    assert line.startswith("error: ") and "PretrainedWeightsUnavailable" in line
