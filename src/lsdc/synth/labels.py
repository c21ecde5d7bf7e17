"""Severity labels with the real class balance and correlations; the narrowing behind each label.

Labels come from a latent Gaussian model: z ~ N(0, C) over the 25 targets, where C is the
correlation of the real labels' normal scores (facts.json), cut at per-target thresholds so each
target's class frequencies match the real ones exactly in expectation. Empty cells follow the real
per-target rates, clustered in a share of studies as in the real table.

Each label's *true* narrowing (fraction of space lost) is drawn inside its severity band (<1/3,
1/3-2/3, >2/3) and then blurred by grader noise, so a share of labels sit on the neighbouring class
in the image: no model can be perfect, just as with real readers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.stats import norm

from lsdc.constants import TARGETS

FACTS_PATH = Path(__file__).with_name("facts.json")
# Severity bands of lost space, and the grader noise (sd of the narrowing a label stands for).
BANDS = ((0.02, 0.30), (0.36, 0.64), (0.70, 0.92))
GRADER_SD = 0.05


@lru_cache(maxsize=1)
def load_facts() -> dict:
    """The committed facts derived from the real tables (scripts/derive_phantom_facts.py)."""
    facts = json.loads(FACTS_PATH.read_text())
    if facts.get("targets") != list(TARGETS):
        raise ValueError(f"{FACTS_PATH}: targets do not match lsdc.constants.TARGETS")
    return facts


@lru_cache(maxsize=1)
def _model() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    facts = load_facts()
    chol = np.linalg.cholesky(np.asarray(facts["latent_correlation"], float))
    freqs = np.asarray([facts["class_frequencies"][t] for t in TARGETS], float)
    cum = np.cumsum(freqs, axis=1)[:, :2]
    thresholds = norm.ppf(np.clip(cum, 1e-6, 1 - 1e-6))  # (25, 2)
    share = float(facts["studies_with_empty_share"])
    empty = np.asarray([facts["empty_rate"][t] for t in TARGETS], float)
    return chol, thresholds, np.clip(empty / max(share, 1e-9), 0, 1), share


def sample_labels(rng: np.random.Generator) -> np.ndarray:
    """Severity index per target (25,) in TARGETS order; -1 marks an empty cell."""
    chol, thresholds, empty_given, share = _model()
    z = chol @ rng.standard_normal(len(TARGETS))
    labels = (z[:, None] > thresholds).sum(axis=1).astype(np.int64)
    # Draw the empty mask unconditionally so the stream does not depend on the outcome.
    study_has_empty = rng.random() < share
    cell = rng.random(len(TARGETS)) < empty_given
    if study_has_empty:
        labels[cell] = -1
    return labels


def narrowing_for(rng: np.random.Generator, severity: int) -> float:
    """True fraction of space lost behind a label (an empty cell is drawn as a hidden grade)."""
    if severity < 0:
        severity = int(rng.choice(3, p=[0.78, 0.16, 0.06]))
    lo, hi = BANDS[severity]
    f = lo + (hi - lo) * rng.beta(1.3, 1.3)
    return float(np.clip(f + rng.normal(0, GRADER_SD), 0.0, 0.95))


def severity_of(fraction: float) -> int:
    """The severity band a narrowing fraction falls in (what an ideal reader would say)."""
    return int(fraction >= 1 / 3) + int(fraction >= 2 / 3)
