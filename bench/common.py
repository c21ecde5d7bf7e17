"""Shared pieces of the model benchmarks: scores on the phantom's held-out truth, the class
prior and the oracle on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a[k] / b[k] for k in a if b.get(k)}


def test_scores(data: Path, study_ids: np.ndarray, probs: np.ndarray) -> dict | None:
    """Model vs class prior (of all training labels) on the phantom's held-out test rows;
    None when the dataset has no truth folder."""
    from lsdc.io.tables import read_train_labels
    from lsdc.metrics import labels_array, score_arrays
    from lsdc.training.engine import class_prior, weighted_class_prior

    truth = data / "truth" / "test_labels.csv"
    if not truth.exists():
        return None
    tids, tlabels = labels_array(read_train_labels(truth))
    pos = {int(s): i for i, s in enumerate(study_ids)}
    keep = [i for i, s in enumerate(tids) if int(s) in pos]
    labels = tlabels[keep]
    p = probs[[pos[int(tids[i])] for i in keep]]
    _, train_labels = labels_array(read_train_labels(data / "train.csv"))
    prior = np.broadcast_to(class_prior(train_labels), p.shape)
    model, base = score_arrays(labels, p), score_arrays(labels, prior)
    out = {"studies": len(keep), "model": model, "class_prior": base}
    out["ratio_model_to_prior"] = ratio(model, base)
    # The metric-optimal constant: a model that ignores its images ends here, below the prior.
    weighted = np.broadcast_to(weighted_class_prior(train_labels), p.shape)
    out["weighted_class_prior"] = score_arrays(labels, weighted)
    oracle = oracle_probs(data, [int(tids[i]) for i in keep])
    if oracle is not None:
        out["oracle"] = score_arrays(labels, oracle)
        gap = base["score"] - out["oracle"]["score"]
        out["share_of_prior_to_oracle_gap_closed"] = (base["score"] - model["score"]) / gap
    return out


def narrowing_table(data: Path) -> dict[int, np.ndarray]:
    """The phantom's true narrowing fraction (25,) per study (truth/studies.jsonl)."""
    from lsdc.constants import TARGETS

    path = data / "truth" / "studies.jsonl"
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["study_id"])] = np.array([rec["narrowing"][t] for t in TARGETS])
    return out


def oracle_probs(data: Path, study_ids: list[int]) -> np.ndarray | None:
    """The oracle: per metric group, a multinomial logistic regression from the true narrowing
    fraction to the label, fitted on the training studies, applied to `study_ids` (n, 25, 3).
    What a model that measured every narrowing exactly could say; the labels' grader noise
    keeps it above zero."""
    from sklearn.linear_model import LogisticRegression

    from lsdc.io.tables import read_train_labels
    from lsdc.metrics import labels_array
    from lsdc.training.losses import GROUP_TARGETS

    if not (data / "truth" / "studies.jsonl").exists():
        return None
    fractions = narrowing_table(data)
    ids, labels = labels_array(read_train_labels(data / "train.csv"))
    x_train = np.stack([fractions[int(s)] for s in ids])
    x_test = np.stack([fractions[int(s)] for s in study_ids])
    out = np.zeros((len(study_ids), labels.shape[1], 3))
    for idx in GROUP_TARGETS.values():
        f, y = x_train[:, idx].ravel(), labels[:, idx].ravel()
        keep = y >= 0
        clf = LogisticRegression(C=100.0, max_iter=2000)
        clf.fit(np.c_[f[keep], f[keep] ** 2], y[keep])
        ft = x_test[:, idx].ravel()
        p = np.zeros((len(ft), 3))
        p[:, clf.classes_] = clf.predict_proba(np.c_[ft, ft**2])
        out[:, idx] = p.reshape(len(study_ids), len(idx), 3)
    return out
