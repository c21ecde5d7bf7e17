"""The base models of one series type, their soft vote, and their files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lsdc.preprocess.slice_relevance.tasks import (
    ENSEMBLE,
    MODEL_NAMES,
    tasks_for,
)

# XGBoost's OpenMP runtime is not fork-safe: once a process has run XGBoost, a forked child
# (lsdc.parallel uses fork on Linux) that runs XGBoost again can hang for ever. Pools whose
# workers run XGBoost therefore check this flag (`fork_safe_workers`).
_XGBOOST_RAN_HERE = False


def _xgboost_runs_here() -> None:
    global _XGBOOST_RAN_HERE
    _XGBOOST_RAN_HERE = True


def fork_safe_workers(workers: int, what: str) -> int:
    """`workers`, or 1 (with a warning) when this process has already run XGBoost, so that a
    pool of forked workers running XGBoost cannot deadlock. Results are the same either way."""
    if workers > 1 and _XGBOOST_RAN_HERE:
        import warnings

        warnings.warn(
            f"{what}: this process already ran XGBoost, whose OpenMP runtime hangs in forked "
            "workers; running in 1 process (start a fresh process to use more)",
            RuntimeWarning,
            stacklevel=3,
        )
        return 1
    return workers


@dataclass
class ModelConfig:
    """Base-model hyper-parameters (small, CPU-friendly defaults)."""

    rf_trees: int = 300
    rf_min_samples_leaf: int = 2
    svm_c: float = 3.0
    mlp_hidden: list[int] = field(default_factory=lambda: [128])
    mlp_alpha: float = 1e-3
    mlp_max_iter: int = 300
    xgb_trees: int = 200
    xgb_depth: int = 4
    xgb_learning_rate: float = 0.1
    n_jobs: int = 1  # threads per model (RandomForest, XGBoost)


def _make_model(name: str, cfg: ModelConfig, seed: int) -> Any:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=cfg.rf_trees,
            min_samples_leaf=cfg.rf_min_samples_leaf,
            class_weight="balanced_subsample",
            n_jobs=cfg.n_jobs,
            random_state=seed,
        )
    if name == "svm":
        # Platt-scaled probabilities (SVC(probability=True) is deprecated in scikit-learn 1.9).
        svc = CalibratedClassifierCV(
            SVC(C=cfg.svm_c, class_weight="balanced", random_state=seed),
            method="sigmoid",
            cv=3,
            ensemble=False,
        )
        return Pipeline([("scale", StandardScaler()), ("svc", svc)])
    if name == "mlp":
        mlp = MLPClassifier(
            hidden_layer_sizes=tuple(cfg.mlp_hidden),
            alpha=cfg.mlp_alpha,
            max_iter=cfg.mlp_max_iter,
            early_stopping=False,
            random_state=seed,
        )
        return Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    if name == "xgboost":
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=cfg.xgb_trees,
            max_depth=cfg.xgb_depth,
            learning_rate=cfg.xgb_learning_rate,
            tree_method="hist",
            n_jobs=cfg.n_jobs,
            random_state=seed,
        )
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    counts = np.bincount(y)
    return (len(y) / (len(counts) * counts[y])).astype(np.float64)


def _fit(name: str, cfg: ModelConfig, seed: int, x: np.ndarray, y: np.ndarray) -> Any:
    """Fit one base model on labels `y` already encoded as 0..k-1 (every code present)."""
    model = _make_model(name, cfg, seed)
    if name == "svm":
        # Platt scaling is cross-validated inside the training set: every class needs a sample
        # in each of its folds (matters only on tiny training sets).
        fewest = int(np.bincount(y).min())
        if fewest < 2:
            raise ValueError(
                f"svm: a slice class has {fewest} training sample(s); need at least 2 labelled "
                "series per task (more studies with coordinates, or fewer folds)"
            )
        model.set_params(svc__cv=min(3, fewest))
    if name == "xgboost":
        _xgboost_runs_here()
        model.fit(x, y, sample_weight=_balanced_weights(y))
    else:
        model.fit(x, y)
    return model


def _proba(model: Any, x: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities; classes the model never saw get probability 0."""
    p = np.asarray(model.predict_proba(x), dtype=np.float64)
    out = np.zeros((len(x), num_classes))
    out[:, classes] = p
    return out


@dataclass
class SeriesTypeModels:
    """The fitted models of one series type: `classes` are the task codes seen in training
    (0 = background, k = tasks[k - 1])."""

    series_type: str
    tasks: tuple[str, ...]
    classes: np.ndarray
    models: dict[str, Any]
    weights: dict[str, float]

    def predict_proba(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per model and for the ensemble: (N, 1 + num tasks) probabilities."""
        k = 1 + len(self.tasks)
        if "xgboost" in self.models:
            _xgboost_runs_here()
        out = {n: _proba(m, x, self.classes, k) for n, m in self.models.items()}
        total = sum(self.weights[n] for n in out)
        out[ENSEMBLE] = sum(self.weights[n] * p for n, p in out.items()) / total
        return out


def fit_series_type(
    series_type: str,
    x: np.ndarray,
    y: np.ndarray,
    cfg: ModelConfig,
    seed: int,
    names: Sequence[str] = MODEL_NAMES,
) -> SeriesTypeModels:
    classes = np.unique(y)
    codes = np.searchsorted(classes, y)
    models = {n: _fit(n, cfg, seed, x, codes) for n in names}
    return SeriesTypeModels(
        series_type=series_type,
        tasks=tasks_for(series_type),
        classes=classes,
        models=models,
        weights={n: 1.0 for n in names},
    )
