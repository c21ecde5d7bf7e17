"""How the ensemble chooses, measured out of fold: the plain minimum (what `fit_ensemble` does)
against the one-standard-error rule (keep the best model alone unless the pool beats it by more
than the paired bootstrap standard error of the difference), on the OOF predictions of runs
folders that trained two or more model families.

Each way of choosing is scored nested, as `fit_ensemble` scores itself: the OOF studies are
split into 5 folds; each fold is predicted by the candidate chosen, and fitted, on the other
folds alone (the choice from every candidate cross-fitted inside them). Repeated over split
seeds; no test study is read.

    python bench/bench_ensemble_choice.py --runs lc/n40/runs lc/n100/runs lc/n200/runs
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lsdc.inference.ensemble import (
    OOF,
    POOL,
    _split,
    align,
    best_candidate,
    cross_fit,
    fit_candidate,
    paired_se,
)
from lsdc.metrics import score_arrays

Rule = Callable[[np.ndarray, Mapping[str, np.ndarray]], str]


def minimum(labels: np.ndarray, preds: Mapping[str, np.ndarray]) -> str:
    return best_candidate({c: score_arrays(labels, p)["score"] for c, p in preds.items()})


def one_standard_error(labels: np.ndarray, preds: Mapping[str, np.ndarray]) -> str:
    scores = {c: score_arrays(labels, p)["score"] for c, p in preds.items()}
    alone = min((c for c in preds if c != POOL), key=lambda c: scores[c])
    margin = paired_se(labels, preds[POOL], preds[alone])
    return POOL if scores[POOL] < scores[alone] - margin else alone


RULES: dict[str, Rule] = {"minimum": minimum, "one_standard_error": one_standard_error}


def nested(
    labels: np.ndarray, probs: Sequence[np.ndarray], names: Sequence[str], seed: int, folds: int
) -> dict[str, dict]:
    """{rule: {"score": nested score, "choices": per-fold choice}} on one split of the studies."""
    split = _split(np.arange(len(labels)), folds, seed)
    out = {r: np.empty((len(labels), 25, 3)) for r in RULES}
    choices: dict[str, list[str]] = {r: [] for r in RULES}
    for f in range(folds):
        tr, te = split != f, split == f
        train = [p[tr] for p in probs]
        inner = _split(np.arange(int(tr.sum())), folds, seed + 1 + f)
        preds = {c: cross_fit(c, labels[tr], train, names, inner) for c in (POOL, *names)}
        for rule, choose in RULES.items():
            choice = choose(labels[tr], preds)
            choices[rule].append(choice)
            ens = fit_candidate(choice, labels[tr], train, names)
            out[rule][te] = ens.combine([p[te] for p in probs])
    return {
        r: {"score": score_arrays(labels, out[r])["score"], "choices": choices[r]} for r in RULES
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="runs folders of lsdc fit")
    p.add_argument("--models", nargs="+", default=["multitask", "sequence"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_ensemble_choice.json"))
    args = p.parse_args(argv)
    rows = {}
    for runs in args.runs:
        ids, labels, probs = align([OOF.load(runs / m) for m in args.models])
        per_seed = [nested(labels, probs, args.models, s, args.folds) for s in range(args.seeds)]
        rows[str(runs)] = {
            "studies": len(ids),
            **{
                r: {
                    "nested_scores": [round(x[r]["score"], 4) for x in per_seed],
                    "mean": round(float(np.mean([x[r]["score"] for x in per_seed])), 4),
                    "choices": [x[r]["choices"] for x in per_seed],
                }
                for r in RULES
            },
        }
        line = ", ".join(f"{r} {rows[str(runs)][r]['mean']:.4f}" for r in RULES)
        print(f"{runs}: {len(ids)} OOF studies, nested score (mean of {args.seeds}): {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": args.models, "runs": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
