"""How much severity a multitask cache's pixels give away at the true keypoints, with no deep model.

A linear probe: for every labelled target whose crop exists, the window around its TRUE keypoint
(half side as the multitask model's defaults: 0.06 of a sagittal crop, 0.14 of an axial one) is
cut from the native-resolution crop, resized to --px, flattened (3 slices) with a one-hot level;
per condition, standardise -> PCA(--components) -> logistic regression (class weights 1/2/4, the
metric's) trained on the other folds' studies. Targets without a window get the training
folds' class prior, which is also the baseline, on the same rows.

It answers "with this many studies a fold, is the signal there for a simple reader?", apart from
keypoint error and network training. On the demo (40 studies a fold) it reached 0.91x the prior
at best (8 px, C 0.01), when the multitask model reached 0.87x.

    python bench/bench_probe.py --cache RUNS/cache/multitask-train \
        --folds-csv RUNS/multitask/folds.csv
    python bench/bench_probe.py --cache CACHE --folds 2 --px 8 16 --C 0.01 1

Writes JSON to bench/results/bench_probe.json (or --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

import numpy as np

from lsdc.constants import TARGETS
from lsdc.metrics import score_arrays
from lsdc.preprocess.cache import StudyCache
from lsdc.preprocess.multitask import load_multitask_study

HALF = {"sagittal": 0.06, "axial": 0.14}


def _condition(target: str) -> str:
    return target.replace("left_", "").replace("right_", "").rsplit("_", 2)[0]


def windows(cache: StudyCache, ids: list[int], px: int) -> dict[tuple[int, int], np.ndarray]:
    """(study, target index) -> flattened (3, px, px) window at the true keypoint; right axial
    windows mirrored, so one probe reads both sides alike."""
    from skimage.transform import resize

    out = {}
    for sid in ids:
        for c in load_multitask_study(cache, sid):
            if not c.present or c.hires.size == 0:
                continue
            group = "axial" if c.series_type.startswith("Axial") else "sagittal"
            y0, y1, x0, x1 = c.window
            h, w = c.hires.shape[-2:]
            n = max(2, round(2 * HALF[group] * w))
            padded = np.pad(c.hires, ((0, 0), (n, n), (n, n)))
            for name, (kx, ky), ok in zip(
                c.keypoint_names, c.keypoint_native, c.keypoint_mask, strict=True
            ):
                if not ok:
                    continue
                cx, cy = (kx - x0) * w / (x1 - x0), (ky - y0) * h / (y1 - y0)
                top, left = round(cy - n / 2) + n, round(cx - n / 2) + n
                win = resize(padded[:, top : top + n, left : left + n], (3, px, px))
                if group == "axial" and name.startswith("right_"):
                    win = win[..., ::-1]
                out[(sid, TARGETS.index(name))] = win.ravel()
    return out


def probe(
    labels: np.ndarray, fold: np.ndarray, feats: dict, ids: list[int], components: int, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probe probabilities and the training folds' class prior, (n, 25, 3) each."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.full((len(ids), 25, 3), np.nan)
    prior = np.full((len(ids), 25, 3), np.nan)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        for j in range(25):
            y = labels[train, j]
            y = y[y >= 0]
            prior[test, j] = (np.bincount(y, minlength=3) + 1) / (len(y) + 3)
        for cond in sorted({_condition(t) for t in TARGETS}):
            rows = []
            for i, sid in enumerate(ids):
                for j, t in enumerate(TARGETS):
                    if _condition(t) == cond and (sid, j) in feats:
                        rows.append((i, j))
            x = np.stack([np.concatenate([feats[(ids[i], j)], np.eye(5)[j % 5]]) for i, j in rows])
            y = np.array([labels[i, j] for i, j in rows])
            at_train = np.array([train[i] for i, _ in rows]) & (y >= 0)
            at_test = np.array([test[i] for i, _ in rows])
            model = make_pipeline(
                StandardScaler(),
                PCA(min(components, int(at_train.sum()) - 1), random_state=0),
                LogisticRegression(C=c, class_weight={0: 1, 1: 2, 2: 4}, max_iter=2000),
            ).fit(x[at_train], y[at_train])
            p = np.zeros((int(at_test.sum()), 3))
            p[:, model.classes_] = model.predict_proba(x[at_test])
            for (i, j), pi in zip(np.array(rows)[at_test], p, strict=True):
                probs[i, j] = pi
    return np.where(np.isnan(probs), prior, probs), prior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="a multitask train cache")
    ap.add_argument("--folds-csv", help="study_id,fold (a run's folds.csv); else --folds")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--px", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--out", default="bench/results/bench_probe.json")
    args = ap.parse_args()

    cache = StudyCache.open(args.cache)
    if args.folds_csv:
        with open(args.folds_csv) as fh:
            folds = {int(r["study_id"]): int(r["fold"]) for r in csv.DictReader(fh)}
        ids = sorted(s for s in folds if cache.has(s))
    else:
        ids = cache.study_ids()
        folds = {s: k % args.folds for k, s in enumerate(np.random.default_rng(0).permutation(ids))}
    labels = cache.labels(ids)
    fold = np.array([folds[s] for s in ids])
    results = []
    for px in args.px:
        feats = windows(cache, ids, px)
        for c in args.C:
            probs, prior = probe(labels, fold, feats, ids, args.components, c)
            got, base = score_arrays(labels, probs), score_arrays(labels, prior)
            ratio = got["score"] / base["score"]
            results.append({"px": px, "C": c, "probe": got, "prior": base, "ratio": ratio})
            print(f"px {px:3d}  C {c:<5g}  probe {got['score']:.3f}  prior {base['score']:.3f}"
                  f"  ratio {ratio:.3f}")  # fmt: skip
    out = {
        "benchmark": "bench_probe",
        "cache": str(args.cache),
        "studies": len(ids),
        "folds": int(len(np.unique(fold))),
        "components": args.components,
        "results": results,
        "best_ratio": min(r["ratio"] for r in results),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
