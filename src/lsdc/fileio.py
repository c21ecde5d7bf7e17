"""Files on disk, trusted only once checked. Atomic writes: a temporary file in the target folder,
then a rename, so a killed run never leaves a half-written file under the final name. Output
paths checked against a command's inputs before any work, so an output never overwrites an
input. A folder's writer lock, so two processes never write one runs folder at once."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "__meta__"


class CorruptFileError(ValueError):
    """A file that exists but cannot be read back (truncated, overwritten, not what it says)."""


def _umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask can only
    be read by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write `path` whole or not at all (a temporary file renamed over it). `durable` also
    syncs the data to disk before the rename, so a power loss cannot leave a renamed but
    empty file; a caller that verifies its files before trusting them may skip that cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # `temporaries` parses this name: keep the two in step.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a file written any other way would get 0666 minus the umask,
        # so shared run folders and caches stay readable by the group when the user wants it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporaries(folder: str | Path) -> dict[str, list[Path]]:
    """Files of `folder` that `atomic_write_bytes` left when its process was killed between
    writing and renaming (a SIGKILL or a lost worker runs no cleanup), by the name they were
    meant to take: {"12.npz": [Path(".12.npz.k3j_x9a1.tmp")], ...}. Only a writer that owns
    a name may delete its temporaries: another process writing it now would lose its file."""
    found: dict[str, list[Path]] = {}
    for tmp in sorted(Path(folder).glob(".*.tmp")):
        # ".<name>.<random>.tmp", as `atomic_write_bytes` names it
        name = tmp.name[1:].rsplit(".", 2)[0]
        found.setdefault(name, []).append(tmp)
    return found


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and check a file can be written in it, before long work whose
    result would otherwise be lost at the end; PermissionError naming the folder if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lsdc-write-check.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PermissionError(f"{folder}: cannot write here ({exc.strerror or exc})") from exc
    return folder


def portable_text(text: str, places: Mapping[str | Path, str | Path]) -> str:
    """`text` with each folder of `places`, where it appears as an absolute path (as given or
    resolved), written as its value, a relative path: {"/abs/runs": "."} turns
    "/abs/runs/fold0/x" into "fold0/x" and {"/abs/data": "../data"} "/abs/data/a" into
    "../data/a". So a file that names those places (a log, an error record) can move with them,
    and a runs folder names no place outside itself."""
    subs: dict[str, str] = {}
    for place, rel in places.items():
        for form in (os.path.abspath(place), os.path.realpath(place)):
            if form != os.sep:
                subs.setdefault(form, Path(rel).as_posix())
    if not subs:
        return text
    # Longest first, so that a place inside another is written as itself; a match must end
    # the path or a component of it ("/abs/data2" is not under "/abs/data").
    forms = "|".join(re.escape(f) for f in sorted(subs, key=len, reverse=True))
    pattern = re.compile(rf"({forms})(?:(/)|(?![\w.-]))")

    def relative(m: re.Match[str]) -> str:
        rel = subs[m.group(1)]
        if m.group(2) is None:
            return rel
        return "" if rel == "." else f"{rel}/"

    return pattern.sub(relative, text)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npz(
    path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, durable: bool = True
) -> Path:
    """Atomically save arrays plus a JSON-able `meta` dict; loadable without pickle
    (`durable`: see `atomic_write_bytes`)."""
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    buf = io.BytesIO()
    payload = dict(arrays)
    payload[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8)
    np.savez(buf, **payload)
    return atomic_write_bytes(path, buf.getvalue(), durable=durable)


@contextlib.contextmanager
def reading(path: str | Path, what: str = "unreadable") -> Iterator[None]:
    """Turn any error while reading `path` into `CorruptFileError` naming it (zipfile, numpy,
    zlib, JSON and safetensors each raise their own kinds); a missing file stays
    FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CorruptFileError(f"{path}: {what} ({type(exc).__name__}: {exc})") from exc


def load_npz(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of `save_npz`; never unpickles. A damaged file raises `CorruptFileError` naming
    it (a missing one, FileNotFoundError)."""
    with reading(path), np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != META_KEY}
        raw = z[META_KEY].tobytes() if META_KEY in z.files else b"{}"
        return arrays, json.loads(raw.decode("utf-8"))


def load_npz_meta(path: str | Path) -> dict[str, Any]:
    """Only the `meta` of a `save_npz` file (the arrays are not read)."""
    with reading(path), np.load(path, allow_pickle=False) as z:
        raw = z[META_KEY].tobytes() if META_KEY in z.files else b"{}"
        return json.loads(raw.decode("utf-8"))


def check_npz(path: str | Path) -> str | None:
    """Why a `save_npz` file is damaged, or None when it is whole: the zip directory must be
    present and every member must match its CRC-32 (this reads the whole file once)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"member {bad} fails its checksum"
            if f"{META_KEY}.npy" not in z.namelist():
                return "no metadata record"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """Tensors of a .safetensors file; a damaged file raises `CorruptFileError` naming it (a
    missing one, FileNotFoundError)."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    with reading(path, "unreadable weights"):
        return load_file(str(path))


# --------------------------------------------------------------------------- outputs vs inputs


class InputOverwriteError(ValueError):
    """An output path that would replace an input, or mix a command's outputs with its inputs."""


# A command's inputs as (what, path) pairs, e.g. ("data folder", DATA); None paths are skipped.
Inputs = Iterable[tuple[str, str | Path | None]]


def _shown(path: str | Path, resolved: Path) -> str:
    """`path` as the user gave it, with where it leads when a link or `..` makes a difference."""
    given = Path(path).absolute()
    return str(path) if given == resolved else f"{path} (resolves to {resolved})"


def check_output_file(
    path: str | Path, inputs: Inputs, *, beside: str | Path | None = None
) -> None:
    """Refuse, before any work, an output file that is an existing folder, or that would replace
    an input: an existing file that is one of `inputs` (files or folders) or lies inside one of
    them. Links are followed (`Path.resolve`), so a link to an input is refused too. A new file
    may be written inside an input folder (a submission beside the data): it replaces nothing.
    Raises `InputOverwriteError` naming the path and the input (and, for a file written
    `beside` another output, that output: the name the user gave)."""
    target = Path(path).resolve()
    shown = _shown(path, target) + (f" (written beside {beside})" if beside is not None else "")
    if target.is_dir():
        raise InputOverwriteError(f"{shown}: is a folder; give a file name")
    if not target.exists():
        return
    for what, source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if target == src or target.is_relative_to(src):
            where = f"the {what}" if target == src else f"a file of the {what} {source}"
            raise InputOverwriteError(
                f"{shown}: would overwrite an input, {where}; write it elsewhere"
            )


def check_output_folder(path: str | Path, inputs: Inputs) -> None:
    """Refuse, before any work, an output folder that is an existing file, or that is, lies
    inside or holds one of `inputs`, links followed: a runs folder or cache among the data mixes
    outputs with inputs (inside an images folder it would be read as a study or series), and
    one around the data lets its files land on an input. Raises `InputOverwriteError` naming
    the path and the input."""
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise InputOverwriteError(f"{_shown(path, target)}: is a file, not a folder")
    for what, source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if target == src:
            relation = "is"
        elif target.is_relative_to(src):
            relation = "lies inside"
        elif src.is_relative_to(target):
            relation = "holds"
        else:
            continue
        raise InputOverwriteError(
            f"{_shown(path, target)}: {relation} the {what} {source}; an output folder must "
            "lie outside its inputs"
        )


def sibling_csv(path: str | Path, tag: str) -> Path:
    """The CSV a command writes beside its main output: `<dir>/<stem>_<tag>.csv`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{tag}.csv")


# --------------------------------------------------------------------------- one writer


class LockHeldError(OSError):
    """Another process holds the lock of a folder (its message names the holder's pid)."""


def _holder(path: Path) -> str:
    """The pid written in a lock file, as text ("unknown" while its holder has not written it
    yet, or when unreadable)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def exclusive_lock(path: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created, with this process's pid written in it)
    until the block ends. When another process holds it, raise `LockHeldError(busy)` at once
    (`busy` may name the holder as `{pid}`), never wait.

    The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a
    lock file left behind blocks nothing, whatever pid it names. The file is never deleted: a
    process that opened it just before would then hold a lock on a file no one else sees. The
    descriptor is not inherited by the programs this process starts (Lightning's processes for
    more devices run `lsdc fit` again: they must not hold it)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(busy.format(pid=_holder(path))) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_unlocked(path: str | Path, busy: str) -> None:
    """Raise `LockHeldError(busy)` (`{pid}`: the holder) when a process holds the exclusive lock
    of `exclusive_lock` on `path`; a missing or unreadable file is not held. Takes a shared lock
    for a moment, so it needs no write access (a read-only runs folder)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockHeldError(busy.format(pid=_holder(Path(path)))) from None
    finally:
        os.close(fd)


def work_folder(stack: contextlib.ExitStack, work_dir: str | Path | None, prefix: str) -> Path:
    """`work_dir`, created, when given (kept, for reuse); else a temporary folder that is removed
    when `stack` closes."""
    if work_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    return work
