"""The ensemble: a weighted pool of several runs' probabilities, fitted on their out-of-fold
predictions to minimise the official metric.

Parameters, few on purpose (a few hundred OOF studies cannot support more):
- one weight per model and metric group (spinal, foraminal, subarticular): left and right share
  theirs, so a pool of left/right-equivariant models (flip TTA) stays equivariant;
- a `Calibration` (temperature and spinal-Severe scale) of the pooled probabilities. The runs'
  own calibrations are not used: the pool is fitted on their raw OOF probabilities.

The pool is one candidate; each model alone with its own calibration is another. The shrink
that keeps the pool's weights sane on few studies also keeps a useless model in it: dropping one
(a logit of -4) costs 16 x 2/n, more than the metric gains even at 200 studies, where the pool
with a sequence model at the constant scored 0.502 out of fold against 0.472 for the multitask
model alone. So `fit_ensemble` keeps whichever candidate scores best cross-fitted on the OOF
studies: the pool, or one model (weight 1 for it in every group); beside it, the bootstrap
standard error of the pool against the best model alone says whether the choice is noise.

`fit_ensemble` measures itself honestly: the OOF studies are split into `folds`; each fold is
predicted by the candidate chosen, and fitted, on the other folds alone (the choice by a
cross-fit inside them), and that score is the one reported (`EnsembleReport.score`), beside
every candidate cross-fitted on the same folds, each model's raw OOF score and the class
prior. The ensemble saved is the candidate chosen on all OOF studies, fitted on all of them.

A study that some models could not see is pooled from the others (their weights renormalised);
one that none could see gets the weighted prior (the metric-optimal constant) of the training
labels, stored in the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.constants import METRIC_GROUPS
from lsdc.inference.calibration import (
    Calibration,
    apply_calibration,
    fit_calibration,
    initial_simplex,
)
from lsdc.metrics import GROUP_TARGETS, score_arrays

ENSEMBLE_FORMAT = 1
# Both fits add SHRINK / n * |params|^2 (weight logits; log temperature and scale): on a few
# dozen studies an unshrunk fit chased noise (a 10-study phantom: cross-fitted 1.33 against
# 0.89 for equal weights), while on hundreds the pull is negligible.
SHRINK = 2.0
_LOGIT_BOUND = 4.0  # weights of e^-4 relative: a model that bad is as good as dropped


@dataclass
class Ensemble:
    models: list[str]  # names, in the order of `weights` columns
    runs: list[str]  # run folders (relative to the ensemble file's folder when saved)
    weights: np.ndarray  # (len(METRIC_GROUPS), M), rows sum to 1
    calibration: Calibration = field(default_factory=Calibration)
    prior: np.ndarray = field(default_factory=lambda: np.full((25, 3), 1 / 3))  # (25, 3)

    def combine(
        self, probs: Sequence[np.ndarray], available: np.ndarray | None = None
    ) -> np.ndarray:
        """Pool per-model probabilities (each (n, 25, 3), aligned rows) -> (n, 25, 3).

        `available` (n, M) bool marks which model saw each study (rows of a model that did not
        are ignored, whatever they hold); a study no model saw gets `prior`."""
        stack = np.stack([np.asarray(p, np.float64) for p in probs], axis=1)  # (n, M, 25, 3)
        n, m = stack.shape[:2]
        if m != len(self.models):
            raise ValueError(f"expected {len(self.models)} models' probabilities, got {m}")
        avail = np.ones((n, m), bool) if available is None else np.asarray(available, bool)
        out = np.empty((n, 25, 3))
        for gi, g in enumerate(METRIC_GROUPS):
            idx = GROUP_TARGETS[g]
            w = avail * self.weights[gi][None]  # (n, M)
            total = w.sum(axis=1, keepdims=True)
            # A study that only zero-weight models saw (one model kept alone, the others its
            # fallback) is pooled from those with equal weights rather than left empty.
            fallback = (total[:, 0] == 0) & avail.any(axis=1)
            w[fallback] = avail[fallback]
            total = w.sum(axis=1, keepdims=True)
            w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
            out[:, idx] = np.einsum("nm,nmtc->ntc", w, np.nan_to_num(stack[:, :, idx]))
        seen = avail.any(axis=1)
        out[seen] = apply_calibration(out[seen], self.calibration)
        out[~seen] = self.prior
        return out

    def to_dict(self, base: Path | None = None) -> dict[str, Any]:
        runs = [_relative(r, base) for r in self.runs]
        return {
            "format": ENSEMBLE_FORMAT,
            "models": self.models,
            "runs": runs,
            "weights": {
                g: dict(zip(self.models, map(float, self.weights[gi]), strict=True))
                for gi, g in enumerate(METRIC_GROUPS)
            },  # fmt: skip
            "calibration": {
                "temperature": self.calibration.temperature,
                "severe_scale": self.calibration.severe_scale,
            },
            "prior": np.asarray(self.prior).round(6).tolist(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Ensemble:
        if raw.get("format") != ENSEMBLE_FORMAT:
            raise ValueError(f"ensemble format {raw.get('format')!r}, expected {ENSEMBLE_FORMAT}")
        models = list(raw["models"])
        weights = np.array([[raw["weights"][g][m] for m in models] for g in METRIC_GROUPS])
        cal = raw["calibration"]
        return cls(
            models=models,
            runs=list(raw["runs"]),
            weights=weights,
            calibration=Calibration(float(cal["temperature"]), float(cal["severe_scale"])),
            prior=np.asarray(raw["prior"], np.float64),
        )

    def run_dirs(self, base: str | Path) -> list[Path]:
        """The run folders, resolved against `base` (the ensemble file's folder)."""
        return [Path(base) / r for r in self.runs]


def _relative(path: str | Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def save_ensemble(ens: Ensemble, path: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write the ensemble (run paths relative to the file, so a copied folder still works)."""
    from lsdc.fileio import atomic_write_json

    path = Path(path)
    payload = ens.to_dict(path.parent)
    if report is not None:
        payload["oof"] = report
    return atomic_write_json(path, payload)


def load_ensemble(path: str | Path) -> Ensemble:
    from lsdc.fileio import reading

    with reading(path, "ensemble file"):
        raw = json.loads(Path(path).read_text())
    try:
        return Ensemble.from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an ensemble file (missing {exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- fitting


def _weights_from(x: np.ndarray, m: int) -> np.ndarray:
    logits = np.concatenate([np.zeros((len(METRIC_GROUPS), 1)), x.reshape(-1, m - 1)], axis=1)
    logits = np.clip(logits, -_LOGIT_BOUND, _LOGIT_BOUND)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


def fit_weights(labels: np.ndarray, probs: Sequence[np.ndarray]) -> np.ndarray:
    """Per-group model weights (len(METRIC_GROUPS), M) minimising the (shrunk) metric of the
    linear pool, uncalibrated; equal weights when the fit gains nothing."""
    from scipy.optimize import minimize

    m = len(probs)
    equal = np.full((len(METRIC_GROUPS), m), 1.0 / m)
    if m == 1 or not (np.asarray(labels) >= 0).any():
        return equal
    ens = Ensemble([str(i) for i in range(m)], [""] * m, equal)

    penalty = SHRINK / len(labels)

    def loss(x: np.ndarray) -> float:
        ens.weights = _weights_from(x, m)
        return score_arrays(labels, ens.combine(probs))["score"] + penalty * float(x @ x)

    x0 = np.zeros(len(METRIC_GROUPS) * (m - 1))
    res = minimize(
        loss,
        x0,
        method="Nelder-Mead",
        options={"xatol": 1e-3, "fatol": 1e-5, "initial_simplex": initial_simplex(len(x0), 1.0)},
    )
    return _weights_from(res.x, m) if res.fun < loss(x0) else equal


def fit_pool(labels: np.ndarray, probs: Sequence[np.ndarray], names: Sequence[str]) -> Ensemble:
    """Weights, then the calibration of the weighted pool, fitted on (labels, probs)."""
    weights = fit_weights(labels, probs)
    ens = Ensemble(list(names), [""] * len(names), weights)
    ens.calibration = fit_calibration(labels, ens.combine(probs), shrink=SHRINK)
    return ens


POOL = "pool"


def fit_candidate(
    choice: str, labels: np.ndarray, probs: Sequence[np.ndarray], names: Sequence[str]
) -> Ensemble:
    """The candidate `choice` fitted on (labels, probs): `POOL`, or one model of `names` alone
    (weight 1 in every group; the others serve only studies it could not see) with its own
    calibration, shrunk as the pool's is."""
    if choice == POOL:
        return fit_pool(labels, probs, names)
    i = list(names).index(choice)
    weights = np.zeros((len(METRIC_GROUPS), len(names)))
    weights[:, i] = 1.0
    cal = fit_calibration(labels, probs[i], shrink=SHRINK)
    return Ensemble(list(names), [""] * len(names), weights, cal)


def cross_fit(
    choice: str | None,
    labels: np.ndarray,
    probs: Sequence[np.ndarray],
    names: Sequence[str],
    split: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """(n, 25, 3): each fold of `split` predicted by the candidate `choice` fitted on the other
    folds; `choice` None: the candidate is also chosen on the other folds alone (`choose`)."""
    out = np.empty((len(labels), 25, 3))
    folds = np.unique(split)
    for f in folds:
        tr, te = split != f, split == f
        train = [p[tr] for p in probs]
        fold_choice = choice or choose(labels[tr], train, names, len(folds), seed + 1 + int(f))
        ens = fit_candidate(fold_choice, labels[tr], train, names)
        out[te] = ens.combine([p[te] for p in probs])
    return out


def choose(
    labels: np.ndarray, probs: Sequence[np.ndarray], names: Sequence[str], folds: int, seed: int
) -> str:
    """The candidate (the pool or one model of `names` alone) with the best score cross-fitted
    on (labels, probs)."""
    split = _split(np.arange(len(labels)), max(2, min(folds, len(labels))), seed)
    return best_candidate(
        {
            c: score_arrays(labels, cross_fit(c, labels, probs, names, split))["score"]
            for c in (POOL, *names)
        }
    )


def best_candidate(scores: Mapping[str, float]) -> str:
    """The lowest score; on a tie a single model wins over the pool (it is the simpler).

    A one-standard-error rule (keep the best model alone unless the pool beats it by more than
    `paired_se`) was tried and not kept: on the learning curve's stored OOF predictions, the
    nested score of the choice (3 split seeds) was 0.760 against 0.740 for the plain minimum at
    40 studies, and equal at 100 and 200. The standard error is reported beside the choice."""
    return min(reversed(list(scores)), key=lambda c: scores[c])


def paired_se(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int = 200, seed: int = 0
) -> float:
    """The bootstrap standard error of score(a) - score(b) over studies (rows), both scored on
    the same resampled rows: the pairing removes what the studies share (how hard they are).
    A resample that leaves a metric group without a label scores NaN and is left out; NaN when
    fewer than two are left."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        rows = rng.integers(0, len(labels), len(labels))
        lab = labels[rows]
        diffs.append(score_arrays(lab, a[rows])["score"] - score_arrays(lab, b[rows])["score"])
    finite = np.asarray(diffs)[np.isfinite(diffs)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")


def _split(study_ids: np.ndarray, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(study_ids))
    out = np.empty(len(study_ids), np.int64)
    out[order] = np.arange(len(study_ids)) % folds
    return out


@dataclass
class EnsembleReport:
    studies: int
    folds: int
    score: dict[str, float]  # the ensemble (choice and fit on the other folds), cross-fitted
    chosen: str  # what the saved ensemble is: POOL or one model's name
    pool_se: float  # bootstrap standard error of the pool's score minus the best model alone's
    pool: dict[str, float]  # the fitted pool, cross-fitted on the same folds
    models: dict[str, dict[str, float]]  # each model's raw OOF score on the same rows
    models_calibrated: dict[str, dict[str, float]]  # each with its calibration, cross-fitted
    equal_weights: dict[str, float]  # equal weights, uncalibrated, no fitting at all
    class_prior: dict[str, float]

    def beats_each_model(self) -> bool:
        best = min(s["score"] for d in (self.models, self.models_calibrated) for s in d.values())
        return self.score["score"] < best

    def to_dict(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "folds": self.folds,
            "ensemble": self.score,
            "chosen": self.chosen,
            "pool_se": self.pool_se,
            "pool": self.pool,
            "models": self.models,
            "models_calibrated": self.models_calibrated,
            "equal_weights": self.equal_weights,
            "class_prior": self.class_prior,
            "beats_each_model": self.beats_each_model(),
        }


@dataclass
class OOF:
    """One run's out-of-fold predictions (its `oof.npz`)."""

    study_ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, run_dir: str | Path) -> OOF:
        from lsdc.fileio import load_npz

        path = Path(run_dir) / "oof.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no out-of-fold predictions (is the run finished?)")
        arrays, _ = load_npz(path)
        return cls(arrays["study_ids"], arrays["probs"], arrays["labels"])


def align(oofs: Sequence[OOF]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(study ids common to every OOF, their labels, each model's probs on those rows)."""
    common = sorted(set.intersection(*(set(o.study_ids.tolist()) for o in oofs)))
    if not common:
        raise ValueError("the runs' out-of-fold predictions share no study")
    ids = np.asarray(common, np.int64)
    rows = [{int(s): i for i, s in enumerate(o.study_ids)} for o in oofs]
    probs = [o.probs[[r[int(s)] for s in ids]] for o, r in zip(oofs, rows, strict=True)]
    labels = oofs[0].labels[[rows[0][int(s)] for s in ids]]
    return ids, labels, probs


def fit_ensemble(
    run_dirs: Mapping[str, str | Path], *, folds: int = 5, seed: int = 0
) -> tuple[Ensemble, EnsembleReport]:
    """Fit the pool of `run_dirs` ({name: run folder}) on their common OOF studies, with its
    own cross-validation (see the module docstring)."""
    from lsdc.training.engine import class_prior, weighted_class_prior

    names = list(run_dirs)
    if not names:
        raise ValueError("an ensemble needs at least one run")
    oofs = [OOF.load(run_dirs[n]) for n in names]
    ids, labels, probs = align(oofs)
    k = max(2, min(folds, len(ids)))
    split = _split(ids, k, seed)
    prior_rows = np.empty((len(ids), 25, 3))
    for f in range(k):
        prior_rows[split == f] = class_prior(labels[split != f])
    pool = cross_fit(POOL, labels, probs, names, split)
    if len(names) == 1:  # nothing to choose: the pool of one model is its calibration
        own, chosen, choice, pool_se = {names[0]: pool}, pool, POOL, 0.0
    else:
        own = {n: cross_fit(n, labels, probs, names, split) for n in names}
        chosen = cross_fit(None, labels, probs, names, split, seed)
        # The saved ensemble's choice: on the same folds as `pool` and `own`, so no refit.
        scores = {c: score_arrays(labels, p)["score"] for c, p in {POOL: pool, **own}.items()}
        choice = best_candidate(scores)
        best_alone = min(names, key=lambda n: scores[n])
        pool_se = paired_se(labels, pool, own[best_alone])
    equal = Ensemble(
        names, [""] * len(names), np.full((len(METRIC_GROUPS), len(names)), 1 / len(names))
    )
    report = EnsembleReport(
        studies=len(ids),
        folds=k,
        score=score_arrays(labels, chosen),
        chosen=choice,
        pool_se=pool_se,
        pool=score_arrays(labels, pool),
        models={n: score_arrays(labels, p) for n, p in zip(names, probs, strict=True)},
        models_calibrated={n: score_arrays(labels, own[n]) for n in names},
        equal_weights=score_arrays(labels, equal.combine(probs)),
        class_prior=score_arrays(labels, prior_rows),
    )
    final = fit_candidate(choice, labels, probs, names)
    final.runs = [str(run_dirs[n]) for n in names]
    # For studies no model can see: the metric-optimal constant (the weighted prior) of every
    # labelled study any run trained on; it scores better than the plain class prior.
    by_study = {int(s): lab for o in oofs for s, lab in zip(o.study_ids, o.labels, strict=True)}
    final.prior = weighted_class_prior(np.stack(list(by_study.values())))
    return final, report
