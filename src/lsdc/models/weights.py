"""Model weights on disk: a safetensors file and, beside it, the SHA-256 it had when it was
saved (`model.safetensors.sha256`, in `sha256sum`'s format, so `sha256sum -c` checks it too).

A safetensors file only checks its header: bytes overwritten inside a tensor load silently and
change the predictions. `load_weights` therefore trusts nothing on disk: the file must match its
recorded hash, hold exactly the tensors (names and shapes) of the model it is loaded into, and
every parameter and buffer must be finite. Each failure is one `CorruptFileError` line naming the
file. Weights saved before hashes were recorded have no record: they load, with a warning.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from lsdc.fileio import CorruptFileError, atomic_write_bytes, atomic_write_text, read_safetensors

HASH_SUFFIX = ".sha256"


def hash_record(path: str | Path) -> Path:
    """Where the SHA-256 of the weights file `path` is recorded."""
    path = Path(path)
    return path.with_name(path.name + HASH_SUFFIX)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s state dict to `path` (safetensors, atomically), then its SHA-256."""
    from safetensors.torch import save

    path = Path(path)
    record = hash_record(path)
    # Weights newer than their record must not meet the old one if this process dies between
    # the two writes: without a record they load with a warning, never as "damaged".
    record.unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state)
    atomic_write_bytes(path, data)
    atomic_write_text(record, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


def verify_weights(path: str | Path) -> None:
    """Check `path` against its recorded SHA-256; `CorruptFileError` naming it if they differ.
    A file without a record (saved before lsdc recorded hashes) passes with a warning."""
    path = Path(path)
    record = hash_record(path)
    if not record.exists():
        warnings.warn(
            f"{path}: no SHA-256 recorded beside it ({record.name} is missing: saved by an lsdc "
            "older than the records, or not by lsdc), so damage to it cannot be detected",
            stacklevel=2,
        )
        return
    fields = record.read_text(errors="replace").split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CorruptFileError(f"{record}: not a SHA-256 record of {path.name}")
    digest = hashlib.sha256()
    with path.open("rb") as fh:  # hashlib.file_digest needs Python 3.11
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise CorruptFileError(
            f"{path}: SHA-256 differs from the one recorded at save time (the file was changed "
            "or damaged); fit again or restore it"
        )


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor], shown: int = 3) -> str | None:
    """What keeps `state` from loading into `model` (missing or unexpected tensor names, other
    shapes), a few examples of each; None when it fits."""
    own = model.state_dict()
    # Tensors the model's own load hook drops (a part it no longer builds) are not unexpected.
    dropped = set(getattr(model, "unbuilt_keys", lambda s: [])(state))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in dropped]
    shapes = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{len(names)} {what} (e.g. {', '.join(names[:shown])})"
        for names, what in (
            (missing, "tensors missing"),
            (unexpected, "unexpected tensors"),
            (shapes, "of another shape"),
        )
        if names
    ]
    return "; ".join(parts) or None


def _first_non_finite(model: nn.Module) -> str | None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def load_weights(model: nn.Module, path: str | Path, what: str | None = None) -> nn.Module:
    """`model` with the weights of `path` (see the module docstring for the checks); `what`
    names the model in an architecture mismatch (default: its class)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    state = read_safetensors(path)  # first: a file cut short is named as unreadable
    verify_weights(path)
    wrong = _mismatch(model, state)
    if wrong is not None:
        raise CorruptFileError(
            f"{path}: not weights of {what or type(model).__name__} (another model or "
            f"configuration): {wrong}"
        )
    model.load_state_dict(state)
    bad = _first_non_finite(model)
    if bad is not None:
        raise CorruptFileError(
            f"{path}: tensor {bad} holds NaN or infinite values (training diverged or the file "
            "was altered); fit again"
        )
    return model
