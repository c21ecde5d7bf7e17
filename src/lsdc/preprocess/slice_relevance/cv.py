"""Labelled series, study-wise cross-validation, accuracy tables and the final fits."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lsdc.constants import AXIAL_T2, SERIES_TYPES
from lsdc.parallel import parallel_map
from lsdc.preprocess.crops import canonical_axial_fraction
from lsdc.preprocess.slice_relevance.config import SliceRelevanceConfig
from lsdc.preprocess.slice_relevance.features import SeriesFeatures
from lsdc.preprocess.slice_relevance.models import (
    ModelConfig,
    SeriesTypeModels,
    fit_series_type,
    soft_vote,
)
from lsdc.preprocess.slice_relevance.tasks import (
    BASELINE,
    ENSEMBLE,
    MODEL_NAMES,
    middle_slice,
    task_of,
    tasks_for,
)
from lsdc.preprocess.slice_relevance.vote import VoteSeries, fit_vote_weights, vote_hits

# The ensemble's out-of-fold slice per (study, series, task) of the CV: what a model that never
# saw the study predicts, so training crops are selected the way test crops are.
OOF_SLICES_FILE = "oof_slices.csv"
OOF_SLICE_COLUMNS = (
    "study_id", "series_id", "series_type", "task", "fold", "slice_index", "num_slices",
    "probability",
)  # fmt: skip


@dataclass
class LabelledSeries:
    """One labelled series: its features and, per task, the labelled sorted slice indices."""

    study_id: int
    series_id: int
    series_type: str
    features: np.ndarray  # (S, F)
    targets: dict[str, list[int]]  # task -> labelled sorted slice indices (one per label row)

    def slice_classes(self) -> np.ndarray:
        """(S,) class per slice: 0 background, k for tasks[k - 1]; the first task wins a tie."""
        y = np.zeros(len(self.features), dtype=np.int64)
        for k, task in reversed(list(enumerate(tasks_for(self.series_type), start=1))):
            for i in self.targets.get(task, []):
                y[i] = k
        return y


def labelled_series(
    features: Sequence[SeriesFeatures],
    coords: pd.DataFrame,
    study_id: int,
    skipped: list[str] | None = None,
) -> tuple[list[LabelledSeries], list[dict[str, float]]]:
    """Join one study's features with its coordinate rows.

    Returns the labelled series and, for the axial ROI statistics, the axial points as
    fractions of their slice's native image size, in the canonical axial frame. Rows whose
    instance is not in the series (the reader may have dropped a bad file) or is carried by
    several slices (ambiguous) are skipped, and named in `skipped` when a list is given; points
    outside their image still label their slice but stay out of the ROI statistics.
    """
    by_series = {f.series_id: f for f in features}
    out: dict[int, LabelledSeries] = {}
    axial_points: list[dict[str, float]] = []
    for row in coords.itertuples(index=False):
        where = (
            f"study {study_id} series {row.series_id} instance {row.instance_number} "
            f"{row.condition} {row.level}"
        )
        f = by_series.get(int(row.series_id))
        if f is None or f.series_type != row.series_type:
            if skipped is not None:
                skipped.append(f"{where}: no readable {row.series_type} series with this id")
            continue
        hits = np.flatnonzero(f.instance_numbers == int(row.instance_number))
        if hits.size != 1:
            if skipped is not None:
                what = "no readable file" if hits.size == 0 else "several files (duplicated)"
                skipped.append(f"{where}: {what} with this instance number")
            continue
        idx = int(hits[0])
        ls = out.setdefault(
            f.series_id,
            LabelledSeries(int(study_id), f.series_id, f.series_type, f.features, {}),
        )
        ls.targets.setdefault(task_of(f.series_type, row.condition, row.level), []).append(idx)
        if f.series_type == AXIAL_T2:
            rows, cols = (int(v) for v in f.native_shapes[idx])
            if -0.5 <= row.x <= cols - 0.5 and -0.5 <= row.y <= rows - 0.5:
                x, y = canonical_axial_fraction(
                    float(row.x), float(row.y), (rows, cols), f.orientation
                )
                axial_points.append({"x": x, "y": y})
            elif skipped is not None:
                skipped.append(f"{where}: point outside the {rows}x{cols} image (ROI statistics)")
    return list(out.values()), axial_points


# --------------------------------------------------------------------------- evaluation


def _predicted_slices(proba: np.ndarray, tasks: Sequence[str]) -> dict[str, int]:
    """Task -> argmax over the series' slices of that task's probability."""
    return {t: int(np.argmax(proba[:, k])) for k, t in enumerate(tasks, start=1)}


def _accuracy_rows(
    series: Sequence[LabelledSeries], predictions: Mapping[str, Sequence[dict[str, int]]]
) -> list[dict[str, Any]]:
    """One row per (label row, method): predicted vs labelled slice."""
    rows = []
    for i, ls in enumerate(series):
        s = len(ls.features)
        methods = {BASELINE: {t: middle_slice(s) for t in tasks_for(ls.series_type)}}
        methods.update({m: predictions[m][i] for m in predictions})
        for task, truths in ls.targets.items():
            for truth in truths:
                for method, pred in methods.items():
                    rows.append(
                        {
                            "study_id": ls.study_id,
                            "series_id": ls.series_id,
                            "series_type": ls.series_type,
                            "task": task,
                            "method": method,
                            "truth": truth,
                            "pred": pred[task],
                            "num_slices": s,
                        }
                    )
    return rows


def accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Exact and +-1-slice accuracy per series type (and overall) and method."""
    df = rows.assign(
        exact=(rows["pred"] == rows["truth"]).astype(float),
        within1=((rows["pred"] - rows["truth"]).abs() <= 1).astype(float),
    )
    per_type = df.groupby(["series_type", "method"])[["exact", "within1"]].mean()
    per_type["n"] = df.groupby(["series_type", "method"]).size()
    overall = df.groupby("method")[["exact", "within1"]].mean()
    overall["n"] = df.groupby("method").size()
    overall.index = pd.MultiIndex.from_product([["all"], overall.index])
    out = pd.concat([per_type, overall]).reset_index()
    out.columns = ["series_type", "method", "exact", "within1", "n"]
    order = {m: i for i, m in enumerate((*MODEL_NAMES, ENSEMBLE, BASELINE))}
    types = {t: i for i, t in enumerate((*SERIES_TYPES, "all"))}
    out["_o"] = out["series_type"].map(types) * 100 + out["method"].map(order)
    return out.sort_values("_o").drop(columns="_o").reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """A readable Markdown table of `accuracy_table`."""
    lines = ["| series type | method | exact | ±1 slice | n |", "|---|---|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.series_type} | {r.method} | {r.exact:.3f} | {r.within1:.3f} | {int(r.n)} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class _FitJob:
    """One model fit (a CV fold, or the final fit when `test` is empty): picklable, so the
    folds of all series types run in parallel processes."""

    series_type: str
    fold: int  # -1 = final fit on every labelled series
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray  # (N,) study id of every row
    test: list[np.ndarray] = field(default_factory=list)  # features of held-out series
    weights: dict[str, float] | None = None  # the final fit's vote (None = equal)


def _stack(series: Sequence[LabelledSeries]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, slice classes and study ids of `series`, row-stacked."""
    x = np.concatenate([ls.features for ls in series])
    y = np.concatenate([ls.slice_classes() for ls in series])
    groups = np.concatenate([np.full(len(ls.features), ls.study_id) for ls in series])
    return x, y, groups


def _run_fit_job(
    job: _FitJob, cfg: ModelConfig, seed: int, names: Sequence[str]
) -> list[dict[str, np.ndarray]] | SeriesTypeModels:
    """Fit; for a fold return, per held-out series, every member's probabilities (the
    ensemble's weights are fitted afterwards, on the out-of-fold probabilities)."""
    models = fit_series_type(
        job.series_type, job.x, job.y, cfg, seed, names, groups=job.groups, weights=job.weights
    )
    if job.fold < 0:
        return models
    out = []
    for f in job.test:
        proba = models.predict_proba(f)
        proba.pop(ENSEMBLE)
        out.append(proba)
    return out


def _run_jobs(
    jobs: list[_FitJob],
    cfg: SliceRelevanceConfig,
    names: Sequence[str],
    workers: int,
    desc: str,
    progress: bool = True,
) -> dict[tuple[str, int], Any]:
    fn = functools.partial(_run_fit_job, cfg=cfg.models, seed=cfg.seed, names=tuple(names))
    results: dict[tuple[str, int], Any] = {}
    for out in parallel_map(fn, jobs, workers=workers, desc=desc, progress=progress):
        if not out.ok:
            # A fold that cannot be fitted makes the whole evaluation meaningless: stop.
            raise RuntimeError(
                f"slice relevance: fitting {out.item.series_type} fold {out.item.fold} "
                f"failed: {out.error}"
            )
        results[(out.item.series_type, out.item.fold)] = out.result
    return results


@dataclass
class CrossValidation:
    """What `cross_validate` measured.

    rows: one row per (label row, method) of out-of-fold predictions (`_accuracy_rows`).
    oof_slices: the ensemble's out-of-fold slice of every task of every held-out series
        (`OOF_SLICE_COLUMNS`), which multitask preprocessing uses for the training studies.
    weights: per series type, the vote weights fitted on all out-of-fold probabilities (for
        the final models).
    fold_weights: per series type, the weights each fold's ensemble was scored with: fitted
        on the other folds only, so the reported ensemble accuracy is out-of-fold too.
    """

    rows: pd.DataFrame
    oof_slices: pd.DataFrame
    weights: dict[str, dict[str, float]]
    fold_weights: dict[str, list[dict[str, float]]]
    # Per series type, the exact accuracy on all out-of-fold probabilities of each member and
    # of the vote with `weights` (fitted on those same probabilities; the honest, cross-fitted
    # figure of the ensemble is in `rows`).
    fitted_vote_exact: dict[str, dict[str, float]] = field(default_factory=dict)


def cross_validate(
    series: Sequence[LabelledSeries],
    cfg: SliceRelevanceConfig,
    names: Sequence[str] = MODEL_NAMES,
    *,
    workers: int = 1,
    progress: bool = True,
) -> CrossValidation:
    """Study-wise k-fold CV of every base model and the ensemble, whose vote weights are
    fitted on out-of-fold probabilities (`vote.fit_vote_weights`, `cfg.vote_steps`). Folds
    run in `workers` processes."""
    from sklearn.model_selection import GroupKFold

    jobs: list[_FitJob] = []
    held_out: dict[tuple[str, int], np.ndarray] = {}
    groups_by_type: dict[str, list[LabelledSeries]] = {}
    for st in SERIES_TYPES:
        group = [ls for ls in series if ls.series_type == st]
        studies = {ls.study_id for ls in group}
        folds = min(cfg.folds, len(studies))
        if folds < 2:
            continue
        groups_by_type[st] = group
        ids = np.array([ls.study_id for ls in group])
        splitter = GroupKFold(n_splits=folds)
        for k, (train_i, test_i) in enumerate(splitter.split(np.zeros(len(group)), groups=ids)):
            x, y, g = _stack([group[i] for i in train_i])
            jobs.append(_FitJob(st, k, x, y, g, [group[i].features for i in test_i]))
            held_out[(st, k)] = test_i
    results = _run_jobs(jobs, cfg, names, workers, "slice relevance CV", progress)
    rows: list[dict[str, Any]] = []
    slice_rows: list[dict[str, Any]] = []
    weights: dict[str, dict[str, float]] = {}
    fold_weights: dict[str, list[dict[str, float]]] = {}
    fitted_vote_exact: dict[str, dict[str, float]] = {}
    for st, group in groups_by_type.items():
        tasks = tasks_for(st)
        oof: list[VoteSeries] = [VoteSeries({}, ls.targets) for ls in group]
        fold_of = np.zeros(len(group), dtype=np.int64)
        for (t, k), test_i in held_out.items():
            if t == st:
                for i, proba in zip(test_i, results[(t, k)], strict=True):
                    oof[i] = VoteSeries(proba, group[i].targets)
                    fold_of[i] = k
        weights[st] = fit_vote_weights(oof, names, tasks, cfg.vote_steps)
        grid = np.vstack([np.eye(len(names)), [[weights[st][n] for n in names]]])
        label_rows = sum(len(v.targets.get(t, ())) for v in oof for t in tasks)
        exact = vote_hits(oof, names, tasks, grid)[:, 0] / max(label_rows, 1)
        members = dict(zip(names, exact[:-1].tolist(), strict=True))
        fitted_vote_exact[st] = {**members, ENSEMBLE: float(exact[-1])}
        fold_weights[st] = []
        preds: dict[str, list[dict[str, int]]] = {m: [{}] * len(group) for m in (*names, ENSEMBLE)}
        for k in range(int(fold_of.max()) + 1):
            others = [v for v, f in zip(oof, fold_of, strict=True) if f != k]
            w = fit_vote_weights(others, names, tasks, cfg.vote_steps)
            fold_weights[st].append(w)
            for i in np.flatnonzero(fold_of == k):
                ls, proba = group[i], oof[i].proba
                ens = soft_vote(proba, w)
                for m, p in proba.items():
                    preds[m][i] = _predicted_slices(p, tasks)
                preds[ENSEMBLE][i] = _predicted_slices(ens, tasks)
                for j, task in enumerate(tasks, start=1):
                    chosen = preds[ENSEMBLE][i][task]
                    slice_rows.append(
                        {
                            "study_id": ls.study_id,
                            "series_id": ls.series_id,
                            "series_type": st,
                            "task": task,
                            "fold": k,
                            "slice_index": chosen,
                            "num_slices": len(ls.features),
                            "probability": float(ens[chosen, j]),
                        }
                    )
        rows.extend(_accuracy_rows(group, preds))
    return CrossValidation(
        pd.DataFrame(rows),
        pd.DataFrame(slice_rows, columns=list(OOF_SLICE_COLUMNS)),
        weights,
        fold_weights,
        fitted_vote_exact,
    )


def fit_all(
    series: Sequence[LabelledSeries],
    cfg: SliceRelevanceConfig,
    names: Sequence[str] = MODEL_NAMES,
    *,
    weights: Mapping[str, Mapping[str, float]] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, SeriesTypeModels]:
    """The final models of every series type that has labelled series, fitted in parallel;
    `weights` per series type set the ensemble's vote (equal for a type not given)."""
    jobs = []
    for st in SERIES_TYPES:
        group = [ls for ls in series if ls.series_type == st]
        if group:
            x, y, g = _stack(group)
            w = dict(weights[st]) if weights is not None and st in weights else None
            jobs.append(_FitJob(st, -1, x, y, g, weights=w))
    results = _run_jobs(jobs, cfg, names, workers, "slice relevance fit", progress)
    return {st: results[(st, -1)] for st in SERIES_TYPES if (st, -1) in results}
