"""The ensemble's vote: member weights fitted on out-of-fold probabilities.

An equal-weight soft vote trails its best member when some members are much weaker (on one
phantom the axial ensemble scored .917 exact against .962 for XGBoost alone). The weights are
therefore fitted on out-of-fold probabilities: among the weight vectors of a grid over the
simplex (steps of 1 / `steps`, the single members included), the one whose vote gives the
labelled slices the highest likelihood, each task's vote normalised over the series' slices
(a proper score of "which slice"), then the most label rows found exactly, then the nearest
equal weights.

Why the likelihood and not the count of exact hits the report shows: with a few hundred label
rows per series type the count is noisy, and weights that maximise it on some folds do worse
on the others. Cross-fitted (each fold voting with weights fitted on the other folds), exact
accuracy per series type (Sagittal T1, T2/STIR, Axial T2) on two phantoms:

    demo phantom, 59 studies:   likelihood .767 .803 .825   count .751 .790 .851
                                equal      .764 .807 .829   best member .771 .803 .820
    bench phantom, 89 studies:  likelihood .796 .845 .853   count .778 .814 .841
                                equal      .785 .814 .874   best member .786 .839 .847

On the probabilities it is fitted on, the fitted vote's likelihood is never below the best
member's (every single member is on the grid); its exact accuracy usually is not either, but
that is measured, not guaranteed (`CrossValidation.fitted_vote_exact`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class VoteSeries:
    """One held-out series: each member's (S, 1 + num tasks) probabilities, and per task the
    labelled sorted slice indices."""

    proba: Mapping[str, np.ndarray]
    targets: Mapping[str, Sequence[int]]


def weight_grid(members: int, steps: int) -> np.ndarray:
    """(C, members) weight vectors with entries in {0, 1/steps, ..., 1} summing to 1."""
    if members < 1 or steps < 1:
        raise ValueError(f"need members >= 1 and steps >= 1, got {members}, {steps}")
    rows = [
        c
        for c in itertools.product(range(steps + 1), repeat=members)
        if sum(c) == steps  # compositions of `steps`: C(steps + members - 1, members - 1)
    ]
    return np.asarray(rows, dtype=np.float64) / steps


def vote_hits(
    series: Sequence[VoteSeries], names: Sequence[str], tasks: Sequence[str], grid: np.ndarray
) -> np.ndarray:
    """(C, 2): for every weight vector of `grid`, the label rows found exactly and within one
    slice by the weighted vote (the slice of task k is the argmax of its class k + 1)."""
    hits = np.zeros((len(grid), 2), dtype=np.int64)
    for s in series:
        p = np.stack([np.asarray(s.proba[n], dtype=np.float64) for n in names])  # (M, S, K)
        pred = np.argmax(np.tensordot(grid, p, axes=1), axis=1)  # (C, K)
        for k, task in enumerate(tasks, start=1):
            for truth in s.targets.get(task, ()):
                d = np.abs(pred[:, k] - int(truth))
                hits[:, 0] += d == 0
                hits[:, 1] += d <= 1
    return hits


def vote_log_likelihood(
    series: Sequence[VoteSeries], names: Sequence[str], tasks: Sequence[str], grid: np.ndarray
) -> np.ndarray:
    """(C,): for every weight vector of `grid`, the sum over label rows of the log of the
    labelled slice's share of its task's vote over the series' slices."""
    total = np.zeros(len(grid))
    for s in series:
        p = np.stack([np.asarray(s.proba[n], dtype=np.float64) for n in names])  # (M, S, K)
        vote = np.tensordot(grid, p, axes=1)  # (C, S, K)
        for k, task in enumerate(tasks, start=1):
            truths = s.targets.get(task, ())
            if not truths:
                continue
            col = vote[:, :, k]
            share = col / np.maximum(col.sum(axis=1, keepdims=True), 1e-300)
            for truth in truths:
                total += np.log(np.maximum(share[:, int(truth)], 1e-12))
    return total


def fit_vote_weights(
    series: Sequence[VoteSeries], names: Sequence[str], tasks: Sequence[str], steps: int = 10
) -> dict[str, float]:
    """Member weights (summing to 1) whose vote gives the label rows of `series` the highest
    likelihood (see the module docstring); equal weights when `series` holds no label row or
    `steps` is 0."""
    names = list(names)
    rows = sum(len(s.targets.get(t, ())) for s in series for t in tasks)
    if steps <= 0 or rows == 0:
        return {n: 1.0 for n in names}
    grid = weight_grid(len(names), steps)
    loglik = np.round(vote_log_likelihood(series, names, tasks, grid), 9)
    hits = vote_hits(series, names, tasks, grid)
    spread = np.square(grid - 1.0 / len(names)).sum(axis=1)
    # lexsort sorts by the last key first: likelihood, then exact hits, then least spread.
    best = int(np.lexsort((spread, -hits[:, 0], -loglik))[0])
    return {n: float(w) for n, w in zip(names, grid[best], strict=True)}
