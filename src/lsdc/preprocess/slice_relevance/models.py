"""The base models of one series type, their soft vote, and their files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lsdc.preprocess.slice_relevance.tasks import (
    ENSEMBLE,
    MODEL_NAMES,
    tasks_for,
)


@dataclass
class ModelConfig:
    """Base-model hyper-parameters (small, CPU-friendly defaults).

    Every fit scales at most linearly with the number of training slices (about 75,000 per
    series type on the real data): the SVM is a linear SVM on a Nystroem approximation of the
    RBF kernel, the forest draws at most `rf_max_samples` slices per tree and the MLP makes at
    most `mlp_max_updates` minibatch updates. The caps only bind beyond phantom sizes.
    """

    rf_trees: int = 300
    rf_min_samples_leaf: int = 2
    rf_max_samples: int = 20000  # bootstrap slices per tree (cap); 0 = every slice
    svm_c: float = 0.1  # of the linear SVM on the kernel features
    svm_components: int = 500  # Nystroem features (RBF kernel, gamma 1 / num features)
    svm_calibration_folds: int = 3  # Platt scaling on study-grouped folds
    mlp_hidden: list[int] = field(default_factory=lambda: [128])
    mlp_alpha: float = 1e-3
    mlp_max_iter: int = 300  # epochs
    mlp_max_updates: int = 30000  # minibatch updates (cap on epochs x batches per epoch)
    mlp_batch_size: int = 200
    xgb_trees: int = 200
    xgb_depth: int = 4
    xgb_learning_rate: float = 0.1
    n_jobs: int = 1  # threads per model (RandomForest, XGBoost)


def _make_model(name: str, cfg: ModelConfig, seed: int, num_samples: int) -> Any:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.kernel_approximation import Nystroem
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if name == "random_forest":
        cap = cfg.rf_max_samples
        return RandomForestClassifier(
            n_estimators=cfg.rf_trees,
            min_samples_leaf=cfg.rf_min_samples_leaf,
            max_samples=cap if 0 < cap < num_samples else None,
            class_weight="balanced_subsample",
            n_jobs=cfg.n_jobs,
            random_state=seed,
        )
    if name == "svm":
        # An exact RBF SVC costs between n^2 and n^3 in the slices; a linear SVM on a Nystroem
        # approximation of the same kernel costs n x components. Platt scaling is fitted on
        # held-out studies (GroupKFold on the `groups` passed to `fit`), so neighbouring slices
        # of one series never calibrate each other.
        svc = CalibratedClassifierCV(
            LinearSVC(C=cfg.svm_c, class_weight="balanced", random_state=seed),
            method="sigmoid",
            cv=GroupKFold(n_splits=cfg.svm_calibration_folds),
            ensemble=True,
        )
        kernel = Nystroem(
            kernel="rbf",
            n_components=min(cfg.svm_components, num_samples),
            random_state=seed,
        )
        return Pipeline([("scale", StandardScaler()), ("kernel", kernel), ("svc", svc)])
    if name == "mlp":
        batch = min(cfg.mlp_batch_size, num_samples)
        batches_per_epoch = -(-num_samples // batch)
        epochs = max(1, min(cfg.mlp_max_iter, cfg.mlp_max_updates // batches_per_epoch))
        mlp = MLPClassifier(
            hidden_layer_sizes=tuple(cfg.mlp_hidden),
            alpha=cfg.mlp_alpha,
            batch_size=batch,
            max_iter=epochs,
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


def fit_member(
    name: str, cfg: ModelConfig, seed: int, x: np.ndarray, y: np.ndarray, groups: np.ndarray
) -> Any:
    """Fit one base model on labels `y` already encoded as 0..k-1 (every code present);
    `groups` (one study id per row) keep the SVM's calibration folds apart by study."""
    model = _make_model(name, cfg, seed, len(x))
    if name == "svm":
        import sklearn
        from sklearn.model_selection import GroupKFold

        studies = len(np.unique(groups))
        if studies < 2:
            raise ValueError(
                f"svm: calibration needs at least 2 studies, got {studies} (more studies with "
                "coordinates, or fewer folds)"
            )
        # scikit-learn asks every class for as many samples as calibration folds (matters only
        # on tiny training sets, where a task is labelled in a few series).
        fewest = int(np.bincount(y).min())
        if fewest < 2:
            raise ValueError(
                f"svm: a slice class has {fewest} training sample(s); need at least 2 labelled "
                "series per task (more studies with coordinates, or fewer folds)"
            )
        folds = min(cfg.svm_calibration_folds, studies, fewest)
        model.set_params(svc__cv=GroupKFold(n_splits=folds))
        # Routing hands `groups` to the GroupKFold of the calibration (and nowhere else).
        with sklearn.config_context(enable_metadata_routing=True):
            model.fit(x, y, groups=groups)
    elif name == "xgboost":
        model.fit(x, y, sample_weight=_balanced_weights(y))
    else:
        model.fit(x, y)
    return model


def forest_proba(forest: Any, x: np.ndarray) -> np.ndarray:
    """`RandomForestClassifier.predict_proba(x)`, bit for bit, without joblib.

    The forest hands each tree to joblib, whose per-task cost (about 0.2 ms) exceeds the tree's
    own on one series of a few dozen slices: on 300 trees most of slice-relevance inference.
    The same trees are summed here in the same order into the same float64 array and divided
    by the same count, so the result has the same bits.
    """
    x32 = np.ascontiguousarray(x, dtype=np.float32)  # the forest's own input conversion
    k = int(forest.n_classes_)
    out = np.zeros((len(x32), k), dtype=np.float64)
    for tree in forest.estimators_:
        # What DecisionTreeClassifier.predict_proba returns for one output, without its
        # per-call fitted and input checks (done once above).
        out += tree.tree_.predict(x32)[:, :k]
    out /= len(forest.estimators_)
    return out


def _member_proba(model: Any, x: np.ndarray) -> np.ndarray:
    from sklearn.ensemble import RandomForestClassifier

    if isinstance(model, RandomForestClassifier) and model.n_outputs_ == 1:
        return forest_proba(model, x)
    return model.predict_proba(x)


def _proba(model: Any, x: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities; classes the model never saw get probability 0."""
    p = np.asarray(_member_proba(model, x), dtype=np.float64)
    out = np.zeros((len(x), num_classes))
    out[:, classes] = p
    return out


@dataclass
class SeriesTypeModels:
    """The fitted models of one series type: `classes` are the task codes seen in training
    (0 = background, k = tasks[k - 1]). `weights` names every member; `models` may hold only
    those of non-zero weight (`load_models(voting_only=True)`), enough for `ensemble_proba`."""

    series_type: str
    tasks: tuple[str, ...]
    classes: np.ndarray
    models: dict[str, Any]
    weights: dict[str, float]

    def predict_proba(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per model and for the ensemble: (N, 1 + num tasks) probabilities."""
        k = 1 + len(self.tasks)
        out = {n: _proba(m, x, self.classes, k) for n, m in self.models.items()}
        out[ENSEMBLE] = self._vote(out)
        return out

    def ensemble_proba(self, x: np.ndarray) -> np.ndarray:
        """The ensemble's (N, 1 + num tasks) probabilities, equal to `predict_proba(x)[ENSEMBLE]`
        but without running the members whose vote weight is 0."""
        k = 1 + len(self.tasks)
        voting = [n for n in self.models if self.weights[n] != 0]
        return self._vote({n: _proba(self.models[n], x, self.classes, k) for n in voting})

    def _vote(self, proba: Mapping[str, np.ndarray]) -> np.ndarray:
        return soft_vote(proba, self.weights)


def soft_vote(proba: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The weighted mean of the members' probabilities; `weights` names every member, `proba`
    may leave out those of weight 0 (they would add exactly 0.0, so no bit changes)."""
    total = sum(weights.values())
    return sum(weights[n] * p for n, p in proba.items() if weights[n] != 0) / total


def fit_series_type(
    series_type: str,
    x: np.ndarray,
    y: np.ndarray,
    cfg: ModelConfig,
    seed: int,
    names: Sequence[str] = MODEL_NAMES,
    *,
    groups: np.ndarray,
    weights: Mapping[str, float] | None = None,
) -> SeriesTypeModels:
    """Fit the base models `names` of one series type on slices `x` (N, F) with classes `y`
    (N,) and study ids `groups` (N,); the ensemble votes with `weights` (equal when None)."""
    classes = np.unique(y)
    codes = np.searchsorted(classes, y)
    models = {n: fit_member(n, cfg, seed, x, codes, np.asarray(groups)) for n in names}
    return SeriesTypeModels(
        series_type=series_type,
        tasks=tasks_for(series_type),
        classes=classes,
        models=models,
        weights=dict(weights) if weights is not None else {n: 1.0 for n in names},
    )
