"""Fit time of the slice-relevance members against the number of training slices (issue 10).

The real data hold about 75,000 slices per series type, fitted once per CV fold and once more
for the final models, so every member's fit must grow roughly linearly with the slices. This
times, in one run and one process (`OMP_NUM_THREADS` as set by the caller):

- each member of today's ensemble (`fit_member`: RandomForest, SVM = Nystroem + linear SVM with
  study-grouped Platt scaling, MLP, XGBoost) at --sizes slices (default 10k, 40k, 150k);
- the baseline, the former SVM (RBF `SVC` with 3-fold Platt scaling, `CalibratedClassifierCV(
  ensemble=False)`), on the same data, but only up to --baseline-max slices (default 10,000):
  its cost grows between quadratically and cubically, so larger sizes would take hours. Sizes
  above the cap are reported as not measured, never extrapolated into the table.

Features are synthetic, with the real feature count and class balance of axial series (40
slices per series, 5 labelled levels, one series per study): rows are Gaussian noise plus a
class-dependent shift, so that the trees and the SVM have structure to fit. Timings depend on
the data only through its shape and that structure, not on the images.

    OMP_NUM_THREADS=1 python bench/bench_slice_relevance.py [--sizes 10000 40000 150000]
        [--baseline-max 10000] [--members random_forest svm mlp xgboost]
        [--rf-trees N] [--xgb-trees N]
        [--out bench/results/bench_slice_relevance.json]

Writes JSON with, per member and size, the fit seconds, the seconds per 1,000 slices, the
growth against the smallest size (linear = the size ratio), and the baseline / SVM ratio at
every size both were measured at.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lsdc.constants import AXIAL_T2
from lsdc.fileio import atomic_write_json
from lsdc.preprocess.slice_relevance import (
    MODEL_NAMES,
    FeatureConfig,
    ModelConfig,
    feature_names,
    fit_member,
    tasks_for,
)

SLICES_PER_SERIES = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 150_000])
    p.add_argument("--baseline-max", type=int, default=10_000, help="largest size for the RBF SVC")
    p.add_argument("--members", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument(
        "--rf-trees", type=int, help="forest size for the timing (default: the config's)"
    )
    p.add_argument(
        "--xgb-trees", type=int, help="XGBoost rounds for the timing (default: the config's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_slice_relevance.json"))
    return p.parse_args(argv)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, F) float32, classes (n,) in 0..5 and study ids (n,): axial-like series of
    SLICES_PER_SERIES slices, level k labelled on one slice per series, the rest background."""
    rng = np.random.default_rng(seed)
    f = len(feature_names(FeatureConfig()))
    k = len(tasks_for(AXIAL_T2))
    series = -(-n // SLICES_PER_SERIES)
    y = np.zeros((series, SLICES_PER_SERIES), dtype=np.int64)
    for s in range(series):
        y[s, rng.choice(SLICES_PER_SERIES, size=k, replace=False)] = np.arange(1, k + 1)
    y = y.ravel()[:n]
    groups = np.repeat(np.arange(series), SLICES_PER_SERIES)[:n]
    centres = rng.normal(scale=0.6, size=(k + 1, f))
    x = rng.normal(size=(n, f)) + centres[y]
    return x.astype(np.float32), y, groups


def baseline_svc(cfg: ModelConfig, seed: int) -> object:
    """The SVM member before issue 10: exact RBF kernel, Platt scaling on 3 unstratified-by-study
    folds, one final SVC on every slice."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    svc = CalibratedClassifierCV(
        SVC(C=3.0, class_weight="balanced", random_state=seed),
        method="sigmoid",
        cv=3,
        ensemble=False,
    )
    return Pipeline([("scale", StandardScaler()), ("svc", svc)])


def timed(fn, *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _summary(per_size: dict[int, float | None]) -> dict:
    measured = {n: s for n, s in per_size.items() if s is not None}
    first = min(measured) if measured else None
    return {
        str(n): {
            "seconds": s,
            "seconds_per_1k_slices": None if s is None else 1000 * s / n,
            "growth_vs_smallest": None if s is None or first is None else s / measured[first],
            "size_ratio_vs_smallest": None if first is None else n / first,
        }
        for n, s in per_size.items()
    }


def _result(
    args: argparse.Namespace,
    cfg: ModelConfig,
    sizes: list[int],
    seconds: dict[str, dict[int, float | None]],
) -> dict:
    ratios = {
        str(n): seconds["baseline"][n] / seconds["svm"][n]
        for n in sizes
        if n in seconds.get("svm", {}) and seconds["baseline"].get(n) is not None
    }
    return {
        "benchmark": "bench_slice_relevance",
        "sizes": sizes,
        "feature_count": len(feature_names(FeatureConfig())),
        "slices_per_series": SLICES_PER_SERIES,
        "baseline": "RBF SVC(C=3) + CalibratedClassifierCV(sigmoid, cv=3, ensemble=False)",
        "baseline_max": args.baseline_max,
        "model_config": vars(cfg),
        "seconds": {m: {str(n): s for n, s in v.items()} for m, v in seconds.items()},
        "members": {m: _summary(v) for m, v in seconds.items()},
        "ratio_baseline_svc_over_svm": ratios,
        "machine": {
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": os.getloadavg(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = ModelConfig()
    # Fewer trees make a run on a busy 2-core machine fit in minutes; a forest or boosting fit
    # costs in proportion to its trees, so the growth with the slices is unchanged.
    if args.rf_trees:
        cfg.rf_trees = args.rf_trees
    if args.xgb_trees:
        cfg.xgb_trees = args.xgb_trees
    sizes = sorted(args.sizes)
    seconds: dict[str, dict[int, float | None]] = {m: {} for m in (*args.members, "baseline")}
    for n in sizes:
        x, y, groups = synthetic(n, args.seed)
        for m in args.members:
            seconds[m][n] = timed(fit_member, m, cfg, args.seed, x, y, groups)
            print(f"{m:14s} {n:>7d} slices: {seconds[m][n]:8.1f} s", flush=True)
        if n <= args.baseline_max:
            seconds["baseline"][n] = timed(baseline_svc(cfg, args.seed).fit, x, y)
            print(f"{'baseline SVC':14s} {n:>7d} slices: {seconds['baseline'][n]:8.1f} s")
        else:
            seconds["baseline"][n] = None
        # Written after every size, so a run stopped during the largest keeps the others.
        result = _result(args, cfg, sizes, seconds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)

    ratios = result["ratio_baseline_svc_over_svm"]
    header = "| member | " + " | ".join(f"{n:,} slices" for n in sizes) + " |"
    print(header)
    print("|---" + "|---:" * len(sizes) + "|")
    for m, per_size in seconds.items():
        cells = [("not measured" if s is None else f"{s:.1f} s") for s in per_size.values()]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"baseline / SVM: {ratios}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
