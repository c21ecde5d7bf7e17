"""A per-study preprocessing cache shared by both pipelines.

Layout of a cache folder:
  manifest.json   pipeline name, resolved configuration and its hash
  <study_id>.npz  one file per finished study (arrays + JSON meta), written atomically
  errors.jsonl    one line per study that failed in the latest run, with the reason
  warnings.jsonl  one line per cached study that was built degraded (a series unreadable or
                  missing, a coordinate dropped), with every reason; kept across reruns

Those records and each study's meta name the files of the data folder relative to it
("train_images/<study>/<series>: ..."), so a cache names no absolute path and moves with the
runs folder that holds it.

A rerun with the same configuration skips finished studies, so a killed run resumes where it
stopped; a different configuration in the same folder is refused rather than mixed. What it
skips is verified first (zip directory and checksums): a damaged file (a disk filled up, a copy
cut short) is named, deleted and built again, never counted as finished. Each study records the
fingerprint of its inputs (`lsdc.io.study.input_fingerprint`: its files and table rows); a study
whose inputs changed since (a repaired file, other data under the same ids) is built again, so
a cache folder can be reused on changed data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.constants import TARGETS
from lsdc.fileio import (
    atomic_write_json,
    atomic_write_text,
    check_npz,
    ensure_writable,
    load_npz,
    load_npz_meta,
    portable_text,
    reading,
    save_npz,
    temporaries,
)
from lsdc.parallel import LOCAL, Executor, parallel_map

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
WARNINGS = "warnings.jsonl"

StudyArrays = tuple[dict[str, np.ndarray], dict[str, Any]]
# The warning of a training study with images but no row in train.csv (labels all -1).
UNLABELLED = "not in train.csv: cached without severity labels (every target unlabelled)"


class CacheMismatchError(RuntimeError):
    """The cache folder holds results of another pipeline or configuration."""


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class CacheRunReport:
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    # Cached files found damaged, deleted and built again (study id -> what was wrong).
    repaired: dict[int, str] = field(default_factory=dict)
    # Cached studies whose inputs changed since they were built, built again.
    changed: list[int] = field(default_factory=list)
    # Studies built, but degraded (study id -> reasons: the builder's meta["warnings"]), this run.
    warnings: dict[int, list[str]] = field(default_factory=dict)
    # Studies of the dataset the pipeline did not try (study id -> why), set by the pipeline.
    left_out: dict[int, str] = field(default_factory=dict)

    def summary(self, cache: str | Path, max_names: int = 5) -> str:
        """What a preprocessing run did, with every kind of skip counted and the first few named."""
        cache = Path(cache)
        lines = [
            f"{len(self.written)} written ({len(self.repaired)} of them replacing damaged "
            f"files, {len(self.changed)} because their inputs changed), "
            f"{len(self.skipped)} already cached, "
            f"{len(self.failed)} failed (see {cache / ERRORS})"
        ]
        if self.warnings:
            lines.append(
                f"{len(self.warnings)} studies degraded, "
                f"{sum(map(len, self.warnings.values()))} warnings (see {cache / WARNINGS}):"
            )
            shown = [(sid, w) for sid, ws in sorted(self.warnings.items()) for w in ws]
            lines += [f"  study {sid}: {w}" for sid, w in shown[:max_names]]
            if len(shown) > max_names:
                lines.append(f"  ... {len(shown) - max_names} more")
        if self.left_out:
            lines.append(f"{len(self.left_out)} studies left out:")
            items = sorted(self.left_out.items())
            lines += [f"  study {sid}: {why}" for sid, why in items[:max_names]]
            if len(items) > max_names:
                lines.append(f"  ... {len(items) - max_names} more")
        return "\n".join(lines)


class StudyCache:
    """One folder of per-study `.npz` files bound to one pipeline and configuration."""

    def __init__(self, root: str | Path, pipeline: str, config: dict[str, Any]) -> None:
        self.root = Path(root)
        self.pipeline = pipeline
        self.config = config
        self.hash = config_hash(config)
        manifest = self.root / MANIFEST
        if manifest.exists():
            found = json.loads(manifest.read_text())
            if found.get("pipeline") != pipeline or found.get("config_hash") != self.hash:
                raise CacheMismatchError(
                    f"{manifest}: holds pipeline {found.get('pipeline')!r} with config hash "
                    f"{found.get('config_hash')}, not {pipeline!r} with {self.hash}; "
                    "use another cache folder or delete this one"
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                manifest, {"pipeline": pipeline, "config_hash": self.hash, "config": config}
            )

    @classmethod
    def open(cls, root: str | Path) -> StudyCache:
        """Open an existing cache for reading, taking pipeline and config from its manifest."""
        manifest = Path(root) / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: not a cache folder (no manifest)")
        found = json.loads(manifest.read_text())
        return cls(root, found["pipeline"], found["config"])

    def path(self, study_id: int) -> Path:
        return self.root / f"{int(study_id)}.npz"

    def has(self, study_id: int) -> bool:
        return self.path(study_id).exists()

    def study_ids(self) -> list[int]:
        return sorted(int(p.stem) for p in self.root.glob("*.npz") if p.stem.isdigit())

    def select(self, study_ids: Iterable[int] | None = None) -> list[int]:
        """`study_ids` as ints (default: every cached study, sorted); KeyError naming the
        cache when any is not cached."""
        available = set(self.study_ids())
        ids = sorted(available) if study_ids is None else [int(s) for s in study_ids]
        missing = [s for s in ids if s not in available]
        if missing:
            raise KeyError(
                f"{self.root}: {len(missing)} studies not in the cache, e.g. {missing[:5]}"
            )
        return ids

    def save(self, study_id: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        # No fsync (about 10 ms a study): `run` checks every member's CRC before it counts a
        # file as cached, so a file a power loss left torn is rebuilt, never trusted.
        meta = {**meta, "config_hash": self.hash}
        return save_npz(self.path(study_id), arrays, meta, durable=False)

    def load(self, study_id: int) -> StudyArrays:
        return load_npz(self.path(study_id))

    def labels(self, study_ids: Iterable[int]) -> np.ndarray:
        """(n, 25) int64 severity codes of `study_ids`, -1 where unlabelled (a test cache, or a
        file without a `labels` array).

        Reads the `labels` member of each file and nothing else: an npz is a zip whose members
        load one at a time, so this costs a few hundred bytes per study, not its images (at real
        scale, reading every study's arrays just for the labels would read the whole cache)."""
        ids = [int(s) for s in study_ids]
        out = np.full((len(ids), len(TARGETS)), -1, np.int64)
        for i, sid in enumerate(ids):
            path = self.path(sid)
            with reading(path, "unreadable; run preprocess again"), np.load(path) as z:
                if "labels" in z.files:
                    out[i] = z["labels"]
        return out

    def run(
        self,
        study_ids: Iterable[int],
        build: Callable[[int], StudyArrays],
        *,
        workers: int = 1,
        desc: str = "preprocess",
        progress: bool = True,
        executor: Executor = LOCAL,
        initializer: Callable[[], object] | None = None,
        inputs: Callable[[int], str] | None = None,
        source: str | Path | None = None,
    ) -> CacheRunReport:
        """Build and save every study not yet cached, or cached from other inputs; failures are
        recorded and skipped.

        `inputs(study_id)`: the fingerprint of the study's inputs, recorded with it and compared
        on later runs (picklable, like `build`); None caches on the study id alone. `source`:
        the data folder the studies are read from, named relative in what is recorded (see the
        module docstring).

        `build(study_id)` must be picklable when `workers` > 1 or on Dask (a module-level
        function or a `functools.partial` of one). Each study is written by the process that
        built it, so on a cluster every worker must see this folder at the same path.
        `initializer`: a warm-up run once per worker process (see `parallel_map`).
        """
        ensure_writable(self.root)  # else every study would fail, one by one, at its save
        report = CacheRunReport()
        # A worker lost mid-save left a temporary file: never read as a study, it only takes
        # space until the study is built again. (Two runs building the same studies of one
        # cache at once are not supported: this could remove the other's file.)
        leftovers = temporaries(self.root)
        todo = []
        for sid in map(int, study_ids):
            if self.has(sid):
                problem = check_npz(self.path(sid))
                if problem is None:
                    if inputs is None or load_npz_meta(self.path(sid)).get("inputs") == inputs(sid):
                        report.skipped.append(sid)
                        continue
                    print(
                        f"{self.path(sid)}: study {sid}'s files or table rows changed since it "
                        "was cached; building it again",
                        file=sys.stderr,
                    )
                    report.changed.append(sid)
                else:
                    print(
                        f"{self.path(sid)}: damaged ({problem}); building it again", file=sys.stderr
                    )
                    report.repaired[sid] = problem
                # Gone before the build: if it fails now, no stale entry is left to be used.
                self.path(sid).unlink()
            todo.append(sid)
            for tmp in leftovers.get(self.path(sid).name, []):
                tmp.unlink(missing_ok=True)
        # Absolute: a Dask worker may run elsewhere, in another working directory.
        places = {} if source is None else {Path(source).resolve(): "."}
        task = _BuildAndSave(self.root.resolve(), self.pipeline, self.config, build, inputs, places)
        outcomes = parallel_map(
            task, todo, workers=workers, desc=desc, progress=progress, executor=executor,
            initializer=initializer,
        )  # fmt: skip
        for out in outcomes:
            if out.ok:
                report.written.append(out.item)
                if out.result:
                    report.warnings[out.item] = list(out.result)
            else:
                report.failed[out.item] = portable_text(out.error or "unknown error", places)
        lines = [json.dumps({"study_id": k, "error": v}) for k, v in sorted(report.failed.items())]
        atomic_write_text(self.root / ERRORS, "".join(line + "\n" for line in lines))
        self._write_warnings(report)
        report.written.sort()
        return report

    def _write_warnings(self, report: CacheRunReport) -> None:
        # Studies skipped this run keep the warnings of the run that built them.
        kept: dict[int, list[str]] = {}
        path = self.root / WARNINGS
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    kept[int(entry["study_id"])] = list(entry["warnings"])
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line only loses an old note; this run rewrites the file
        done = set(report.skipped)
        merged = {k: v for k, v in kept.items() if k in done and self.has(k)}
        merged.update(report.warnings)
        lines = [json.dumps({"study_id": k, "warnings": v}) for k, v in sorted(merged.items())]
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    def warnings(self) -> dict[int, list[str]]:
        """Study id -> the reasons it was built degraded, as recorded in `warnings.jsonl`."""
        path = self.root / WARNINGS
        if not path.exists():
            return {}
        out = {}
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            out[int(entry["study_id"])] = list(entry["warnings"])
        return out


@functools.lru_cache(maxsize=1)
def _threadpools(modules_loaded: int) -> Any:
    """The native thread pools loaded in this process. A controller sees only the libraries
    loaded when it is made, so a new one is made once modules have been imported since (the
    first study loads the relevance models' libraries); making one costs about 4 ms, using one
    0.02 ms."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _portable_strings(tree: Any, places: dict[Path, str]) -> Any:
    """`tree` (JSON-like) with `portable_text` applied to every string in it."""
    if isinstance(tree, dict):
        return {k: _portable_strings(v, places) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_portable_strings(v, places) for v in tree]
    return portable_text(tree, places) if isinstance(tree, str) else tree


@dataclass
class _BuildAndSave:
    """Picklable worker: builds one study and writes it from the worker process, so big arrays
    never travel back through the pool."""

    root: Path
    pipeline: str
    config: dict[str, Any]
    build: Callable[[int], StudyArrays]
    inputs: Callable[[int], str] | None = None
    places: dict[Path, str] = field(default_factory=dict)  # for `portable_text`

    def __call__(self, study_id: int) -> list[str]:
        # Taken before the build reads anything: a file changed during the build then differs
        # from the record, and the next run builds the study again.
        fingerprint = self.inputs(study_id) if self.inputs is not None else None
        # One native thread (BLAS, OpenMP) per study, whatever the process: the relevance
        # members' products round differently with another thread count (stored probabilities
        # 1e-6 apart), and a cache must not depend on --workers. Studies are the unit of
        # parallelism.
        with _threadpools(len(sys.modules)).limit(limits=1):
            arrays, meta = self.build(study_id)
        if fingerprint is not None:
            meta = {**meta, "inputs": fingerprint}
        if self.places:  # the meta's messages (warnings, series errors) name data files
            meta = _portable_strings(meta, self.places)
        StudyCache(self.root, self.pipeline, self.config).save(study_id, arrays, meta)
        return [str(w) for w in meta.get("warnings", [])]
