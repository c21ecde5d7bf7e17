"""Benchmark of multitask preprocessing on a phantom (issue 4).

Measures, in one run:
- slice relevance: study-wise cross-validated exact and +-1-slice accuracy per series type of
  every base model (RandomForest, SVM, MLP, XGBoost), their soft-voting ensemble and the
  middle-slice baseline; ratio ensemble / baseline; feature-extraction cost per slice;
- preprocessing throughput in studies per minute (`preprocess_dataset` with the trained
  relevance run, so studies without coordinates use predicted slices) against only reading the
  same DICOM studies (`load_study`, median of --read-repeats runs) with the same number of
  workers: ratio;
- with --scaling, the same preprocessing with 1 and 2 local workers and on a 2-worker Dask
  LocalCluster (needs `pip install 'lsdc[dask]'`), each in a fresh process into a fresh cache
  as `lsdc preprocess` would run (interpreter, imports, workers and cluster started and
  stopped): end-to-end studies/s, and the steady rate once every worker has finished its
  first study (from the times the studies' files were written: what thousands of studies
  converge to, start-up paid), as ratios to 1 local worker and to bare reading.

    python bench/bench_preprocess.py                        # 120 train studies at 128 px
    python bench/bench_preprocess.py --data PHANTOM_DIR     # an existing RSNA-format dataset
    python bench/bench_preprocess.py --scaling              # + local x1, local x2, dask x2

Writes JSON to bench/results/bench_preprocess.json (or --out). The phantom is generated into
--work (reused when its parameters match) unless --data is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="existing phantom / RSNA-format dataset")
    p.add_argument("--work", type=Path, default=Path("bench/results/preprocess_work"))
    p.add_argument("--train-studies", type=int, default=120)
    p.add_argument("--phantom-size", type=int, default=128, help="phantom sagittal matrix, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--read-repeats", type=int, default=3, help="read-only baseline repeats")
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also 1 and 2 local workers and a 2-worker Dask LocalCluster, fresh processes",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_preprocess.json"))
    p.add_argument("overrides", nargs="*", help="slice-relevance overrides, e.g. folds=3")
    return p.parse_args(argv)


def _phantom(args: argparse.Namespace) -> Path:
    from lsdc.synth import generate_dataset

    if args.data is not None:
        return args.data
    root = args.work / f"phantom-{args.train_studies}-{args.phantom_size}-{args.seed}"
    if not (root / "train_label_coordinates.csv").exists():
        if root.exists():
            shutil.rmtree(root)
        generate_dataset(
            root,
            train_studies=args.train_studies,
            test_studies=0,
            size=args.phantom_size,
            seed=args.seed,
            workers=args.workers,
        )
    return root


def _read_only(data: Path, ids: list[int], workers: int) -> None:
    """The baseline: read every series of every study, nothing else."""
    import functools

    from lsdc.parallel import parallel_map

    fn = functools.partial(_load_one, data=data)
    failed = [o for o in parallel_map(fn, ids, workers=workers, desc="read only") if not o.ok]
    if failed:
        raise RuntimeError(f"read baseline failed on {len(failed)} studies: {failed[0].error}")


def _timed_read(data: Path, ids: list[int], workers: int) -> float:
    t0 = time.perf_counter()
    _read_only(data, ids, workers)
    return time.perf_counter() - t0


def _load_one(study_id: int, data: Path) -> int:
    from lsdc.io.study import load_study
    from lsdc.preprocess.slice_relevance import dataset_descriptions

    study = load_study(
        data, study_id, descriptions=dataset_descriptions(str(data), "train").get(study_id)
    )
    return sum(s.num_slices for s in study.series)


# One preprocessing run in a fresh interpreter, as `lsdc preprocess` would be (no module, table
# or model already loaded by this process); argv[1] is a JSON object of its arguments.
_RUN_ONE = """
import json, sys
from lsdc.parallel import Executor
from lsdc.preprocess.multitask import preprocess_dataset
a = json.loads(sys.argv[1])
r = preprocess_dataset(a["data"], a["cache"], workers=a["workers"],
                       executor=Executor(a["executor"]), overrides=a["overrides"],
                       relevance_run=a["relevance"], study_ids=a["ids"], progress=False)
sys.exit(1 if r.failed or len(r.written) != len(a["ids"]) else 0)
"""
SCALING_RUNS = (("local", 1), ("local", 2), ("dask", 2))


def _fresh_run(kind: str, workers: int, ids: list[int], cache: Path, **kw: object) -> dict:
    """One preprocessing run of `ids` in a new process -> its seconds, end to end, and its
    steady studies/s: between the `workers`-th and the last study written (each worker's
    first study carries its start-up: imports, tables, relevance models)."""
    import subprocess

    spec = {"executor": kind, "workers": workers, "ids": ids, "cache": str(cache), **kw}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _RUN_ONE, json.dumps(spec)], check=True)
    seconds = time.perf_counter() - t0
    written = sorted(p.stat().st_mtime_ns for p in cache.glob("*.npz"))
    span = (written[-1] - written[workers - 1]) / 1e9 if len(written) > workers else 0.0
    return {
        "executor": kind,
        "workers": workers,
        "seconds": seconds,
        "studies_per_s": len(ids) / seconds,
        "steady_studies_per_s": (len(written) - workers) / span if span > 0 else None,
    }


def _scaling(data: Path, work: Path, ids: list[int], read_rate_1: float, **kw: object) -> dict:
    """Studies/s of each of `SCALING_RUNS`, end to end and steady, relative to one local
    worker and to bare reading with one worker."""
    rows = [
        _fresh_run(kind, w, ids, work / f"scaling_{kind}{w}", data=str(data), **kw)
        for kind, w in SCALING_RUNS
    ]
    for row in rows:
        for key in ("studies_per_s", "steady_studies_per_s"):
            base = rows[0][key]
            ok = row[key] is not None and base
            row[f"{key}_over_local_1"] = row[key] / base if ok else None
            row[f"{key}_over_read_1"] = row[key] / read_rate_1 if row[key] else None
    return {"studies": len(ids), "read_1_worker_studies_per_s": read_rate_1, "runs": rows}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.scaling:
        from lsdc.parallel import Executor

        Executor("dask")  # a missing lsdc[dask] is named now, not after the relevance training
    from lsdc.config import load_config
    from lsdc.io.tables import read_coordinates
    from lsdc.preprocess.cache import StudyCache
    from lsdc.preprocess.multitask import preprocess_dataset
    from lsdc.preprocess.slice_relevance import (
        BASELINE,
        ENSEMBLE,
        SliceRelevanceConfig,
        compute_features,
        format_table,
        train_slice_relevance,
    )

    t0 = time.perf_counter()
    data = _phantom(args)
    t_phantom = time.perf_counter() - t0
    run_tag = f"{data.name}-f{args.folds}"
    work = args.work / run_tag
    if work.exists():
        shutil.rmtree(work)  # a fresh run: every timing below starts cold in its own cache
    work.mkdir(parents=True)

    overrides = [f"folds={args.folds}", *args.overrides]
    cfg = load_config(SliceRelevanceConfig, None, overrides)
    labelled = sorted(int(s) for s in read_coordinates(data / "train_label_coordinates.csv")
                      ["study_id"].unique())  # fmt: skip

    # 1. Feature extraction (timed alone), then training + CV on the cached features.
    t0 = time.perf_counter()
    compute_features(data, work / "features", labelled, cfg.features, workers=args.workers)
    t_features = time.perf_counter() - t0
    cache = StudyCache.open(work / "features")
    n_slices = 0
    for sid in cache.study_ids():
        arrays, _ = cache.load(sid)
        n_slices += sum(len(v) for k, v in arrays.items() if k.endswith("__features"))
    t0 = time.perf_counter()
    report = train_slice_relevance(
        data, work / "relevance", workers=args.workers, overrides=overrides,
        feature_cache=work / "features",
    )  # fmt: skip
    t_train = time.perf_counter() - t0
    table = report.table
    print(format_table(table))

    # 2. Throughput: reading only vs full multitask preprocessing, same studies and workers.
    all_ids = sorted(int(p.name) for p in (data / "train_images").iterdir() if p.name.isdigit())
    # Reading is short and noisy on a shared machine: median of a few repeats (warm cache, as
    # for the preprocessing run that follows).
    read_times = [_timed_read(data, all_ids, args.workers) for _ in range(args.read_repeats)]
    t_read = float(np.median(read_times))
    t0 = time.perf_counter()
    pre = preprocess_dataset(
        data, work / "multitask_cache", workers=args.workers,
        overrides=[f"crop_size={args.crop_size}"], relevance_run=work / "relevance",
    )  # fmt: skip
    t_pre = time.perf_counter() - t0
    if pre.failed:
        raise RuntimeError(f"preprocessing failed on {len(pre.failed)} studies: {pre.failed}")

    scaling = None
    if args.scaling:
        # Reading is the in-process baseline above, with one worker (measured again if
        # --workers is not 1).
        t_read_1 = t_read
        if args.workers != 1:
            t_read_1 = float(np.median([_timed_read(data, all_ids, 1) for _ in range(2)]))
        scaling = _scaling(
            data, work, all_ids, len(all_ids) / t_read_1,
            relevance=str(work / "relevance"), overrides=[f"crop_size={args.crop_size}"],
        )  # fmt: skip

    acc = {
        f"{r.series_type}|{r.method}": {"exact": r.exact, "within1": r.within1, "n": int(r.n)}
        for r in table.itertuples(index=False)
    }
    ens, base = acc[f"all|{ENSEMBLE}"], acc[f"all|{BASELINE}"]
    read_rate = 60 * len(all_ids) / t_read
    pre_rate = 60 * len(all_ids) / t_pre
    result = {
        "benchmark": "bench_preprocess",
        "data": str(data),
        "train_studies": len(all_ids),
        "labelled_studies": len(labelled),
        "phantom_size": args.phantom_size,
        "crop_size": args.crop_size,
        "folds": args.folds,
        "workers": args.workers,
        "overrides": overrides,
        "slice_relevance": {
            "accuracy": acc,
            "ensemble_over_baseline_exact": ens["exact"] / base["exact"] if base["exact"] else None,
            "ensemble_over_baseline_within1": (
                ens["within1"] / base["within1"] if base["within1"] else None
            ),
            "ensemble_beats_baseline": ens["exact"] > base["exact"],
            "table_markdown": format_table(table),
        },
        "features": {
            "slices": n_slices,
            "seconds": t_features,
            "ms_per_slice_wall": 1000 * t_features / max(n_slices, 1),
            "ms_per_slice_cpu": 1000 * t_features * args.workers / max(n_slices, 1),
        },
        "throughput": {
            "read_only_studies_per_min": read_rate,
            "multitask_studies_per_min": pre_rate,
            "ratio_multitask_over_read": pre_rate / read_rate,
            "read_seconds": t_read,
            "read_seconds_repeats": read_times,
            "multitask_seconds": t_pre,
        },
        "scaling": scaling,
        "seconds": {"phantom": t_phantom, "train_and_cv": t_train},
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lsdc.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("features", "throughput", "scaling")}, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
