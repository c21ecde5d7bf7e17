"""What checking a cache entry against its inputs costs: `lsdc.io.study.input_fingerprint`
(stat of every file of the study and its table rows) beside hashing every byte of the study's
files (SHA-256) and beside reading the study (`load_study`, what building its entry starts with),
on the same studies in the same run, page cache warm. The figure that matters is the ratio to
reading: a check paid on every rerun for every cached study must be a small fraction of it.

    python bench/bench_fingerprint.py [--data DATA] [--studies 20] [--size 256] [--repeats 3]
        [--out bench/results/bench_fingerprint.json]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lsdc.fileio import atomic_write_json
from lsdc.io.study import input_fingerprint, load_study, study_folder


def _sha256_files(data: Path, study: int) -> str:
    h = hashlib.sha256()
    for p in sorted(study_folder(data, study).rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _median_seconds(fn: Callable[[int], object], studies: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in studies:
            fn(s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an RSNA-layout dataset (default: a new phantom)")
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_fingerprint.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lsdc-bench-fp-") as tmp:
        data = args.data
        if data is None:
            from lsdc.synth import generate_dataset

            data = generate_dataset(
                Path(tmp) / "data", train_studies=args.studies, test_studies=0,
                size=args.size, seed=5, progress=False,
            )  # fmt: skip
        desc = pd.read_csv(data / "train_series_descriptions.csv")
        studies = sorted(int(s) for s in desc.study_id.unique())[: args.studies]
        files = sum(1 for s in studies for p in study_folder(data, s).rglob("*") if p.is_file())
        by_study = {
            int(s): dict(zip(g.series_id, g.series_description, strict=True))
            for s, g in desc.groupby("study_id")
        }
        for s in studies:  # warm the page cache and the table reader
            _sha256_files(data, s)
            input_fingerprint(data, s)
        t_fp = _median_seconds(lambda s: input_fingerprint(data, s), studies, args.repeats)
        t_hash = _median_seconds(lambda s: _sha256_files(data, s), studies, args.repeats)
        t_read = _median_seconds(
            lambda s: load_study(data, s, descriptions=by_study.get(s)), studies, args.repeats
        )
    n = len(studies)
    result = {
        "studies": n,
        "files": files,
        "size": args.size,
        "ms_per_study": {
            "fingerprint_stat": round(1e3 * t_fp / n, 3),
            "sha256_bytes": round(1e3 * t_hash / n, 3),
            "load_study": round(1e3 * t_read / n, 3),
        },
        "fingerprint_over_load_study": round(t_fp / t_read, 4),
        "sha256_over_load_study": round(t_hash / t_read, 4),
    }
    atomic_write_json(args.out, result)
    print(result, file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
