"""Recompute the phantom's label facts from the real RSNA tables (never copied into the repo).

Writes src/lsdc/synth/facts.json: class frequencies per target (condition x level), empty-cell
rates, the correlation matrix of the 25 ordinal labels (used as the latent Gaussian correlation of
the label sampler) and the share of studies with at least one empty cell.

    python scripts/derive_phantom_facts.py [--real /work/shared/rsna-real] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.constants import SEVERITIES, SEVERITY_INDEX, TARGETS
from lsdc.fileio import atomic_write_text

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lsdc" / "synth" / "facts.json"


def derive(real_dir: Path) -> dict:
    wide = pd.read_csv(real_dir / "train.csv")
    missing = [t for t in TARGETS if t not in wide.columns]
    if missing:
        raise ValueError(f"{real_dir / 'train.csv'}: missing columns {missing}")
    codes = wide[list(TARGETS)].apply(lambda col: col.map(SEVERITY_INDEX))  # NaN for empty
    freqs, empty = {}, {}
    for t in TARGETS:
        col = codes[t]
        counts = np.array([(col == k).sum() for k in range(len(SEVERITIES))], dtype=float)
        freqs[t] = [round(float(c), 5) for c in counts / counts.sum()]
        empty[t] = round(float(col.isna().mean()), 5)
    # Latent correlation: Pearson on normal scores of the ordinal codes (mid-rank of each class
    # mapped through the inverse normal CDF), pairwise-complete; made positive definite below.
    from scipy.stats import norm

    scores = pd.DataFrame(index=codes.index)
    for t in TARGETS:
        col = codes[t]
        cum = np.concatenate([[0.0], np.cumsum(freqs[t])])
        mid = {k: norm.ppf(np.clip((cum[k] + cum[k + 1]) / 2, 1e-4, 1 - 1e-4)) for k in range(3)}
        scores[t] = col.map(mid)
    corr = scores.corr(min_periods=50).to_numpy()
    corr = np.nan_to_num(corr, nan=0.0)
    np.fill_diagonal(corr, 1.0)
    w, v = np.linalg.eigh(corr)
    corr = (v * np.clip(w, 1e-3, None)) @ v.T
    d = np.sqrt(np.diag(corr))
    corr = corr / np.outer(d, d)
    n_empty = codes.isna().sum(axis=1)
    overall = np.array([(codes == k).sum().sum() for k in range(3)], dtype=float)
    return {
        "source": "scripts/derive_phantom_facts.py on the real RSNA 2024 LSDC train.csv",
        "n_studies": int(len(wide)),
        "targets": list(TARGETS),
        "class_frequencies": freqs,
        "overall_frequencies": [round(float(x), 5) for x in overall / overall.sum()],
        "empty_rate": empty,
        "studies_with_empty_share": round(float((n_empty > 0).mean()), 5),
        "empty_cells_per_affected_study_mean": round(float(n_empty[n_empty > 0].mean()), 3),
        "latent_correlation": [[round(float(x), 4) for x in row] for row in corr],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path("/work/shared/rsna-real"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    facts = derive(args.real)
    atomic_write_text(args.out, json.dumps(facts, indent=1) + "\n")
    print(f"wrote {args.out}: overall {facts['overall_frequencies']}")


if __name__ == "__main__":
    main()
