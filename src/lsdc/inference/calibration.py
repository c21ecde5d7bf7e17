"""Post-hoc calibration of predicted probabilities, fitted on out-of-fold predictions only.

Two parameters, few enough to fit on a hundred studies without chasing noise:
- `temperature` T: every row p becomes p^(1/T), renormalised (T > 1 softens over-confident
  models, T < 1 sharpens timid ones);
- `severe_scale` a: the Severe probability of the five spinal targets is multiplied by a, then
  the rows renormalised. The any-severe-spinal term of the metric reads the *maximum* Severe
  probability over levels, so a model calibrated per target is still miscalibrated for that
  term; this scale is the one degree of freedom that moves it.

`fit_calibration` minimises the official metric on (labels, OOF probabilities); `cross_fitted`
applies to each fold parameters fitted on the other folds, so that the calibrated OOF score is
not measured on the rows it was fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lsdc.constants import TARGETS
from lsdc.metrics import score_arrays

CALIBRATION_FILE = "calibration.json"
_SPINAL = [j for j, t in enumerate(TARGETS) if t.startswith("spinal_canal_stenosis")]
_BOUND = 2.0  # |log T|, |log a| <= 2: beyond that the fit is chasing a handful of rows


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    severe_scale: float = 1.0

    def save(self, path: str | Path) -> None:
        from lsdc.fileio import atomic_write_json

        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        import json

        raw = json.loads(Path(path).read_text())
        try:
            cal = cls(float(raw["temperature"]), float(raw["severe_scale"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a calibration file ({exc})") from exc
        if not (cal.temperature > 0 and cal.severe_scale > 0):
            raise ValueError(f"{path}: calibration parameters must be positive, got {raw}")
        return cal


def apply_calibration(probs: np.ndarray, cal: Calibration) -> np.ndarray:
    """(n, 25, 3) probabilities -> calibrated (n, 25, 3), rows summing to 1."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, None)
    p = p ** (1.0 / cal.temperature)
    p[:, _SPINAL, 2] *= cal.severe_scale
    return p / p.sum(axis=-1, keepdims=True)


def initial_simplex(dims: int, step: float = 0.3) -> np.ndarray:
    """A Nelder-Mead start around 0 (in log space) with steps big enough to feel the metric:
    scipy's default step at 0 is 2.5e-4, where the loss is flat to its tolerance, so the
    search could stop where it started."""
    return np.vstack([np.zeros(dims), step * np.eye(dims)])


def fit_calibration(labels: np.ndarray, probs: np.ndarray, *, shrink: float = 0.0) -> Calibration:
    """The parameters minimising the metric on (labels (n, 25), probs (n, 25, 3)); the identity
    when nothing is labelled or the fit does not improve the score. `shrink` adds
    shrink / n * |log params|^2, pulling a fit on few studies toward the identity."""
    from scipy.optimize import minimize

    labels = np.asarray(labels)
    if not (labels >= 0).any():
        return Calibration()

    penalty = shrink / len(labels)

    def loss(x: np.ndarray) -> float:
        x = np.clip(x, -_BOUND, _BOUND)
        cal = Calibration(float(np.exp(x[0])), float(np.exp(x[1])))
        return score_arrays(labels, apply_calibration(probs, cal))["score"] + penalty * (x @ x)

    res = minimize(
        loss,
        np.zeros(2),
        method="Nelder-Mead",
        options={"xatol": 1e-3, "fatol": 1e-5, "initial_simplex": initial_simplex(2)},
    )
    x = np.clip(res.x, -_BOUND, _BOUND)
    if not res.fun < loss(np.zeros(2)):
        return Calibration()
    return Calibration(float(np.exp(x[0])), float(np.exp(x[1])))


def cross_fitted(labels: np.ndarray, probs: np.ndarray, folds: Sequence[int]) -> np.ndarray:
    """OOF probabilities with each fold calibrated by parameters fitted on the other folds (one
    fold: returned unchanged, there is nothing to fit on)."""
    folds = np.asarray(folds)
    out = np.array(probs, np.float64, copy=True)
    ks = np.unique(folds)
    if len(ks) < 2:
        return out
    for k in ks:
        cal = fit_calibration(labels[folds != k], probs[folds != k])
        out[folds == k] = apply_calibration(probs[folds == k], cal)
    return out
