"""Check `lsdc.io.tables` and `lsdc.metrics` against the real RSNA tables (not a test).

Reads the real label and coordinate tables and the 4th-place out-of-fold predictions from
`../shared/rsna-real/` (relative to the repository; `--data` overrides), asserts the known facts
(1,975 studies, 572 empty cells, class fractions 77.36% / 16.31% / 6.33%), and scores the three
OOF files concatenated (labelled rows they lack filled with 1/3) with `lsdc.metrics` and with two
independent re-implementations written here from the formula: one on sklearn's `log_loss` in the
shape of the official Kaggle code, one with plain Python loops. All three must agree to 1e-9.

    python scripts/check_real_tables.py [--data DIR] [--out bench/results/real_tables.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.constants import CONDITION_GROUP, PROB_COLUMNS, SEVERITIES, TARGETS, parse_row_id
from lsdc.fileio import atomic_write_json
from lsdc.io.tables import labels_to_long, read_coordinates, read_submission, read_train_labels
from lsdc.metrics import labels_array, score, score_arrays, submission_array

REPO = Path(__file__).resolve().parents[1]
WEIGHT = {"Normal/Mild": 1.0, "Moderate": 2.0, "Severe": 4.0}
EPS = 1e-15


def fill_missing_labelled(wide: pd.DataFrame, sub: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Append a uniform 1/3 row for every labelled row the submission lacks."""
    study_ids, labels = labels_array(wide)
    probs = submission_array(sub, study_ids)
    lacking = np.argwhere((labels >= 0) & np.isnan(probs).any(axis=-1))
    rows = [f"{study_ids[s]}_{TARGETS[t]}" for s, t in lacking]
    fill = pd.DataFrame({"row_id": rows, **{c: 1.0 / 3.0 for c in PROB_COLUMNS}})
    return pd.concat([sub, fill], ignore_index=True), len(rows)


def _labelled_rows(wide: pd.DataFrame) -> list[tuple[str, int, str, str]]:
    """(row_id, study_id, group, severity) for every labelled cell of the wide table."""
    out = []
    for rec in wide.to_dict("records"):
        for target in TARGETS:
            sev = rec[target]
            if sev is not pd.NA and isinstance(sev, str):
                cond = next(c for c in CONDITION_GROUP if target.startswith(c + "_"))
                out.append((f"{rec['study_id']}_{target}", rec["study_id"], cond, sev))
    return out


def score_sklearn(wide: pd.DataFrame, sub: pd.DataFrame) -> dict[str, float]:
    """Independent: the official formula on sklearn.metrics.log_loss (labelled rows only)."""
    from sklearn.metrics import log_loss

    rows = _labelled_rows(wide)
    sol = pd.DataFrame(rows, columns=["row_id", "study_id", "condition", "severity"])
    sol["group"] = sol["condition"].map(CONDITION_GROUP)
    for i, name in enumerate(PROB_COLUMNS):
        sol[name] = (sol["severity"] == SEVERITIES[i]).astype(float)
    sol["sample_weight"] = sol["severity"].map(WEIGHT)
    pred = sub.set_index("row_id").loc[sol["row_id"], list(PROB_COLUMNS)].to_numpy(float)
    pred = pred / pred.sum(axis=1, keepdims=True)
    pred = pd.DataFrame(pred, columns=list(PROB_COLUMNS))
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 renamed y_pred -> y_proba
        for group in ("spinal", "foraminal", "subarticular"):
            idx = sol.index[sol["group"] == group]
            out[group] = log_loss(
                sol.loc[idx, list(PROB_COLUMNS)].to_numpy(),
                np.clip(pred.loc[idx].to_numpy(), EPS, 1 - EPS),
                sample_weight=sol.loc[idx, "sample_weight"].to_numpy(),
            )
        spinal = sol[sol["group"] == "spinal"].copy()
        spinal["pred_severe"] = pred.loc[spinal.index, "severe"].to_numpy()
        per_study = spinal.groupby("study_id").agg(
            y=("severe", "max"), w=("sample_weight", "max"), p=("pred_severe", "max")
        )
        out["any_severe_spinal"] = log_loss(
            per_study["y"].to_numpy(),
            np.clip(per_study["p"].to_numpy(), EPS, 1 - EPS),
            sample_weight=per_study["w"].to_numpy(),
            labels=[0.0, 1.0],
        )
    out["score"] = float(np.mean(list(out.values())))
    return {k: float(v) for k, v in out.items()}


def score_loops(wide: pd.DataFrame, sub: pd.DataFrame) -> dict[str, float]:
    """Independent: the formula as plain loops over rows, with math.log."""
    pred = {
        r: (a, b, c)
        for r, a, b, c in zip(
            sub["row_id"], sub["normal_mild"], sub["moderate"], sub["severe"], strict=True
        )
    }
    num: dict[str, float] = defaultdict(float)
    den: dict[str, float] = defaultdict(float)
    study_y: dict[int, int] = {}
    study_w: dict[int, float] = {}
    study_p: dict[int, float] = {}
    for row_id, study_id, condition, severity in _labelled_rows(wide):
        total = sum(pred[row_id])
        p = [min(max(v / total, EPS), 1 - EPS) for v in pred[row_id]]
        k = SEVERITIES.index(severity)
        w = WEIGHT[severity]
        group = CONDITION_GROUP[condition]
        num[group] += -w * math.log(p[k])
        den[group] += w
        if group == "spinal":
            study_y[study_id] = max(study_y.get(study_id, 0), int(severity == "Severe"))
            study_w[study_id] = max(study_w.get(study_id, 0.0), w)
            study_p[study_id] = max(study_p.get(study_id, -1.0), pred[row_id][2] / total)
    out = {g: num[g] / den[g] for g in ("spinal", "foraminal", "subarticular")}
    a_num = a_den = 0.0
    for sid, y in study_y.items():
        p = min(max(study_p[sid], EPS), 1 - EPS)
        a_num += -study_w[sid] * (math.log(p) if y else math.log(1 - p))
        a_den += study_w[sid]
    out["any_severe_spinal"] = a_num / a_den
    out["score"] = sum(out.values()) / 4
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "rsna-real")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_tables.json")
    args = ap.parse_args(argv)
    data: Path = args.data

    wide = read_train_labels(data / "train.csv")
    long = labels_to_long(wide)
    n_studies = int(wide["study_id"].nunique())
    n_empty = int(long["severity"].isna().sum())
    counts = long["severity"].value_counts().sort_index()
    labelled = int(counts.sum())
    fractions = {SEVERITIES[int(k)]: float(v) / labelled for k, v in counts.items()}
    print(f"train.csv: {n_studies} studies, {labelled} labelled cells, {n_empty} empty cells")
    print("class fractions: " + ", ".join(f"{k} {v:.2%}" for k, v in fractions.items()))
    assert n_studies == 1975, n_studies
    assert n_empty == 572, n_empty
    expected = {"Normal/Mild": 0.7736, "Moderate": 0.1631, "Severe": 0.0633}
    for name, frac in expected.items():
        assert abs(fractions[name] - frac) < 5e-5, (name, fractions[name])

    coords = read_coordinates(data / "train_label_coordinates.csv")
    series_types = {k: int(v) for k, v in coords["series_type"].value_counts().items()}
    coord_studies = int(coords["study_id"].nunique())
    without = sorted(set(wide["study_id"]) - set(coords["study_id"]))
    print(
        f"coordinates: {len(coords)} rows, {coord_studies} studies, "
        f"{coords['series_id'].nunique()} series; by series type {series_types}; "
        f"{len(without)} labelled studies without coordinates"
    )
    assert len(coords) == 48809, len(coords)
    assert coords["condition"].map(CONDITION_GROUP).notna().all()

    oof_files = sorted((data / "oof-4th-place").glob("*.csv"))
    assert len(oof_files) == 3, oof_files
    sub = pd.concat([read_submission(f) for f in oof_files], ignore_index=True)
    groups = Counter(CONDITION_GROUP[parse_row_id(r)[1]] for r in sub["row_id"])
    sub, n_filled = fill_missing_labelled(wide, sub)
    print(f"oof: {len(sub) - n_filled} rows {dict(groups)}; {n_filled} labelled rows filled 1/3")

    ours = score(wide, sub)
    ref_sklearn = score_sklearn(wide, sub)
    ref_loops = score_loops(wide, sub)
    print(f"{'term':<20}{'lsdc.metrics':>16}{'sklearn ref':>16}{'loop ref':>16}")
    max_diff = 0.0
    for key in ours:
        diff = max(abs(ours[key] - ref_sklearn[key]), abs(ours[key] - ref_loops[key]))
        max_diff = max(max_diff, diff)
        print(f"{key:<20}{ours[key]:>16.10f}{ref_sklearn[key]:>16.10f}{ref_loops[key]:>16.10f}")
    print(f"max abs difference: {max_diff:.3e}")
    assert max_diff < 1e-9, max_diff

    # Reference points: constant predictions. Under the 1/2/4 weights the best constant is the
    # class prior times the weights, renormalised, not the plain prior.
    study_ids = wide["study_id"].tolist()
    prior_row = [fractions[name] for name in SEVERITIES]
    weighted = [f * WEIGHT[name] for f, name in zip(prior_row, SEVERITIES, strict=True)]
    weighted_row = [v / sum(weighted) for v in weighted]
    baselines = {}
    constants = (
        ("class_prior", prior_row),
        ("weighted_class_prior", weighted_row),
        ("uniform", [1 / 3] * 3),
    )
    for name, row in constants:
        const = pd.DataFrame(
            [[f"{s}_{t}", *row] for s in study_ids for t in TARGETS],
            columns=["row_id", *PROB_COLUMNS],
        )
        baselines[name] = score(wide, const)
        print(f"constant {name} prediction: score {baselines[name]['score']:.4f}")
    # Per target (condition x level): that target's class frequencies times the weights.
    _, codes = labels_array(wide)
    per_target = np.stack([(codes == k).sum(axis=0) * WEIGHT[n] for k, n in enumerate(SEVERITIES)])
    per_target = (per_target / per_target.sum(axis=0)).T  # (25, 3)
    prior_probs = np.broadcast_to(per_target, (len(study_ids), len(TARGETS), 3))
    baselines["per_target_weighted_prior"] = score_arrays(codes, prior_probs)
    value = baselines["per_target_weighted_prior"]["score"]
    print(f"per-target weighted class prior: score {value:.4f}")

    result = {
        "data": str(data),
        "constant_predictions": baselines,
        "studies": n_studies,
        "labelled_cells": labelled,
        "empty_cells": n_empty,
        "class_fractions": fractions,
        "coordinates": {
            "rows": len(coords),
            "studies": coord_studies,
            "series_types": series_types,
            "labelled_studies_without_coordinates": len(without),
        },
        "oof_4th_place": {
            "files": [f.name for f in oof_files],
            "rows": len(sub) - n_filled,
            "labelled_rows_filled_uniform": n_filled,
            "score_lsdc": ours,
            "score_sklearn_reference": ref_sklearn,
            "score_loop_reference": ref_loops,
            "max_abs_difference": max_diff,
        },
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
