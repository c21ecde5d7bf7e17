"""Where the severity signal is lost: one runs folder's multitask model beside a linear probe.

On the out-of-fold studies of a `lsdc fit` runs folder that have coordinates (the same rows for
every reader, each scored by the fold model that never saw it), per metric group:
- the class prior and the weighted prior (the best constant) of each fold's training studies;
- a linear probe at the TRUE keypoints: the `--patch` x `--patch` pixels around the point on the
  centre slice of the cached crop (right axial patches mirrored), standardised, then a logistic
  regression per condition with a one-hot level, sample weights 1/2/4 (the metric's), C chosen by
  an inner 3-fold CV on the training fold only;
- the multitask model's first pass, its second pass at its predicted keypoints, its second pass
  at the true keypoints (teacher), and its output (what `predict` uses).
The ratios to the weighted prior show which step loses what: probe -> teacher is the reader
(architecture, data efficiency), teacher -> predicted is localisation, first vs second pass the
value of the windows.

    python bench/bench_signal_loss.py --runs RUNS [--patch 20] [--out JSON]
    python bench/bench_signal_loss.py --cache CACHE --folds 2    # the probe alone (resolution)

Writes JSON to bench/results/bench_signal_loss.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_multitask import _predict_fold as model_passes  # noqa: E402

GROUPS = ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score")


def _condition(target: str) -> str:
    return target.replace("left_", "").replace("right_", "").rsplit("_", 2)[0]


def true_point_patches(
    cache, ids: list[int], px: int, predicted: dict[int, np.ndarray] | None = None
) -> dict[tuple[int, int], np.ndarray]:
    """(study, target index) -> the flattened px x px patch of the crop's centre slice around
    the true keypoint (edge-padded), or around the `predicted` one (study -> (25, 2) normalised
    crop x/y) where given, for the same targets; right axial patches mirrored so that one probe
    reads both sides alike."""
    from lsdc.constants import TARGETS
    from lsdc.preprocess.multitask import load_multitask_study

    out = {}
    half = px // 2
    for sid in ids:
        for c in load_multitask_study(cache, sid):
            if not c.present:
                continue
            centre = np.pad(c.image[c.image.shape[0] // 2], half + 1, mode="edge")
            size = np.array(c.image.shape[-1:-3:-1], dtype=float)  # (w, h)
            for name, (x, y), ok in zip(
                c.keypoint_names, c.keypoints, c.keypoint_mask, strict=True
            ):
                if not ok:
                    continue
                if predicted is not None:
                    x, y = predicted[sid][TARGETS.index(name)] * size - 0.5
                r, q = int(round(y)) + half + 1, int(round(x)) + half + 1
                patch = centre[r - half : r - half + px, q - half : q - half + px]
                if c.series_type.startswith("Axial") and name.startswith("right_"):
                    patch = patch[:, ::-1]
                out[(sid, TARGETS.index(name))] = patch.ravel()
    return out


def probe(labels: np.ndarray, fold: np.ndarray, feats: dict, ids: list[int]) -> np.ndarray:
    """Out-of-fold probe probabilities (n, 25, 3); NaN where a target has no patch."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lsdc.constants import TARGETS

    probs = np.full((len(ids), 25, 3), np.nan)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        for cond in sorted({_condition(t) for t in TARGETS}):
            rows = [
                (i, j)
                for i, sid in enumerate(ids)
                for j, t in enumerate(TARGETS)
                if _condition(t) == cond and (sid, j) in feats
            ]
            x = np.stack([np.concatenate([feats[(ids[i], j)], np.eye(5)[j % 5]]) for i, j in rows])
            y = np.array([labels[i, j] for i, j in rows])
            fit_rows = np.array([train[i] for i, _ in rows]) & (y >= 0)
            at_test = np.array([test[i] for i, _ in rows])
            model = make_pipeline(
                StandardScaler(),
                LogisticRegressionCV(
                    Cs=[1e-4, 1e-3, 1e-2, 1e-1],
                    cv=3,
                    max_iter=3000,
                    scoring="neg_log_loss",
                    use_legacy_attributes=False,
                ),
            ).fit(
                x[fit_rows],
                y[fit_rows],
                logisticregressioncv__sample_weight=np.array([1.0, 2.0, 4.0])[y[fit_rows]],
            )
            p = np.zeros((int(at_test.sum()), 3))
            p[:, model.classes_] = model.predict_proba(x[at_test])
            for (i, j), pi in zip(np.array(rows)[at_test], p, strict=True):
                probs[i, j] = pi
    return probs


def reader_table(labels: np.ndarray, readers: dict, title: str, width: int) -> dict:
    """Each reader's (n, 25, 3) probabilities scored per metric group and divided by the
    "weighted prior" reader's score on the same rows; printed, and returned as a table."""
    from lsdc.metrics import score_arrays

    scores = {name: score_arrays(labels, p) for name, p in readers.items()}
    base = scores["weighted prior"]
    table = {
        name: {g: {"score": s[g], "x_weighted_prior": s[g] / base[g]} for g in GROUPS}
        for name, s in scores.items()
    }
    print(f"{title:{width}s}" + "".join(f"{g[:12]:>14s}" for g in GROUPS) + "   (x weighted prior)")
    for name, row in table.items():
        print(f"{name:{width}s}" + "".join(f"{row[g]['x_weighted_prior']:14.3f}" for g in GROUPS))
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", type=Path, help="a `lsdc fit` runs folder")
    src.add_argument(
        "--cache", type=Path, help="a multitask train cache alone: the probe only (--folds)"
    )
    p.add_argument("--folds", type=int, default=2, help="with --cache: folds by study")
    p.add_argument("--patch", type=int, default=20, help="probe patch side, crop pixels")
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_signal_loss.json"))
    args = p.parse_args(argv)

    from lsdc.preprocess.cache import StudyCache
    from lsdc.training.engine import class_prior, weighted_class_prior
    from lsdc.training.folds import FOLDS_FILE, load_folds

    if args.runs is not None:
        run, cache_dir = args.runs / "multitask", args.runs / "cache" / "multitask-train"
        folds = load_folds(run / FOLDS_FILE)
    else:
        run, cache_dir = None, args.cache
        every = StudyCache.open(cache_dir).study_ids()
        order = np.random.default_rng(0).permutation(len(every))
        folds = {int(every[i]): k % args.folds for k, i in enumerate(order)}
    cache = StudyCache.open(cache_dir)
    all_ids = sorted(s for s in folds if cache.has(s))
    feats = true_point_patches(cache, all_ids, args.patch)
    with_coords = {s for s, _ in feats}
    ids = [s for s in all_ids if s in with_coords]
    labels = cache.labels(ids)
    fold = np.array([folds[s] for s in ids])

    passes = ("first pass", "second pass at predicted points", "second pass at true points",
              "model output") if run is not None else ()  # fmt: skip
    readers = {k: np.zeros((len(ids), 25, 3)) for k in ("class prior", "weighted prior", *passes)}
    all_labels = cache.labels(all_ids)
    all_fold = np.array([folds[s] for s in all_ids])
    for f in np.unique(fold):
        at = fold == f
        train_labels = all_labels[all_fold != f]
        readers["class prior"][at] = class_prior(train_labels)
        readers["weighted prior"][at] = weighted_class_prior(train_labels)
        if run is None:
            continue
        fold_ids = [s for s, a in zip(ids, at, strict=True) if a]
        pred = model_passes(run, cache_dir, int(f), fold_ids, teacher=False)
        true = model_passes(run, cache_dir, int(f), fold_ids, teacher=True)
        readers["first pass"][at] = pred["logits_first"]
        readers["second pass at predicted points"][at] = pred["logits_second"]
        readers["second pass at true points"][at] = true["logits_second"]
        readers["model output"][at] = pred["logits"]
    probe_probs = probe(labels, fold, feats, ids)
    readers["linear probe at true points"] = np.where(
        np.isnan(probe_probs), readers["class prior"], probe_probs
    )
    if run is not None:
        # The same probe where the model put the points (its out-of-fold keypoints).
        from lsdc.fileio import load_npz

        oof, _ = load_npz(run / "oof.npz")
        predicted = dict(zip(oof["study_ids"].tolist(), oof["out_keypoints"], strict=True))
        at_pred = true_point_patches(cache, ids, args.patch, predicted)
        probe_pred = probe(labels, fold, at_pred, ids)
        readers["linear probe at predicted points"] = np.where(
            np.isnan(probe_pred), readers["class prior"], probe_pred
        )

    print(f"{len(ids)} out-of-fold studies with coordinates, {len(np.unique(fold))} folds")
    table = reader_table(labels, readers, "reader", 34)
    result = {
        "benchmark": "bench_signal_loss",
        "command": "python bench/bench_signal_loss.py " + " ".join(argv or sys.argv[1:]),
        "runs": str(args.runs or args.cache),
        "studies": len(ids),
        "patch_px": args.patch,
        "readers": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
