"""The demo's report: one self-contained HTML page with the PNGs it shows beside it.

Input: a score table (`lsdc.evaluation.score_table`), and optionally each model's aligned test
labels and probabilities (confusion matrices), run folders (out-of-fold scores from
`summary.json`, learning curves from `curves.png`), the multitask keypoint error, the seconds
each stage took and pictures made elsewhere (e.g. `lsdc.inference.viz.plot_multitask_study`).
Output: `out_dir/index.html`, `out_dir/scores.json` and every PNG the page names, linked
relatively, so the folder can be moved, zipped or opened straight from disk without a server.
An input left out leaves its section out.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.constants import METRIC_GROUPS, SEVERITIES
from lsdc.fileio import atomic_write_text
from lsdc.htmlpage import FileNames, esc, figure, pyplot, save_figure
from lsdc.metrics import SCORE_KEYS

__all__ = ["keypoint_error_of", "write_report"]

_TERM_TITLES = {
    "spinal": "spinal",
    "foraminal": "foraminal",
    "subarticular": "subarticular",
    "any_severe_spinal": "any severe spinal",
    "score": "score",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline td { color: #555; font-style: italic; background: #fafafa; }
tr.best td, tr.total td { font-weight: bold; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def keypoint_error_of(run_dir: str | Path) -> dict[str, dict[str, float]] | None:
    """The keypoint error in mm ({series type: {median, p90, n}}) that a multitask run's
    summary.json reports; None when the run has none (a sequence run, an unfinished run)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("keypoint_error_mm")


def write_report(
    out_dir: str | Path,
    *,
    scores: Mapping[str, Any],
    confusion: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    run_dirs: Mapping[str, str | Path] | None = None,
    keypoint_error: Mapping[str, Mapping[str, float]] | None = None,
    stage_seconds: Mapping[str, float] | None = None,
    pictures: Sequence[tuple[str, str | Path]] = (),
    title: str = "lsdc report",
    notes: Sequence[str] = (),
    ensemble: Mapping[str, Any] | None = None,
) -> Path:
    """Write `out_dir/index.html` (and the PNGs it shows, and scores.json); returns its path.

    scores: `lsdc.evaluation.score_table(...)`. confusion: {model: (labels (n, 25) codes,
    probs (n, 25, 3))}, e.g. from `lsdc.evaluation.align_predictions`. run_dirs: {name: run
    folder}; each one's summary.json (out-of-fold scores) and curves.png are shown when present.
    keypoint_error: {series type: {"median", "p90", "n"}} in mm (`keypoint_error_of`).
    stage_seconds: {stage: seconds}, in the order the stages ran. pictures: (caption, PNG path)
    pairs, copied in; a missing one is an error, since the caller made it. notes: paragraphs
    under the title (what data, which settings). ensemble: the saved ensemble file's content
    (weights per metric group, calibration, its cross-fitted OOF report under "oof").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for _, path in pictures:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: picture for the report not found")

    names = FileNames()
    parts = [f"<h1>{esc(title)}</h1>"]
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    parts.append(_scores_section(scores))
    atomic_write_text(out / "scores.json", json.dumps(scores, indent=2) + "\n")

    oof = _oof_section(run_dirs or {})
    if oof:
        parts.append(oof)
    if ensemble:
        parts.append(_ensemble_section(ensemble))
    if confusion:
        parts.append("<h2>Confusion matrices (test studies)</h2>")
        parts.append(
            '<p class="note">Rows: true severity; columns: the most probable predicted one; '
            "labelled targets of the scored test studies, left and right pooled. Colour: share "
            "of the true class's row.</p>"
        )
        for name, (labels, probs) in confusion.items():
            png = names.new(f"confusion-{name}")
            save_figure(out / png, _confusion_figure(name, labels, probs))
            parts.append(figure(png, f"{name}: true vs predicted severity"))
    if keypoint_error:
        png = names.new("keypoint-error")
        save_figure(out / png, _keypoint_figure(keypoint_error))
        parts.append(_keypoint_section(keypoint_error, png))
    if pictures:
        parts.append("<h2>Predicted vs true points</h2>")
        for caption, path in pictures:
            png = names.new(f"picture-{Path(path).stem}")
            shutil.copyfile(path, out / png)
            parts.append(figure(png, caption))
    curves = [(name, Path(d) / "curves.png") for name, d in (run_dirs or {}).items()]
    curves = [(name, p) for name, p in curves if p.is_file()]
    if curves:
        parts.append("<h2>Learning curves</h2>")
        for name, path in curves:
            png = names.new(f"curves-{name}")
            shutil.copyfile(path, out / png)
            parts.append(figure(png, f"{name}: loss and validation score per epoch, per fold"))
    if stage_seconds:
        png = names.new("stage-times")
        save_figure(out / png, _stage_figure(stage_seconds))
        parts.append(_stage_section(stage_seconds, png))

    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    return atomic_write_text(out / "index.html", page)


# --- HTML sections -------------------------------------------------------------------------


def _scores_section(scores: Mapping[str, Any]) -> str:
    rows: Mapping[str, Mapping[str, Any]] = scores["rows"]
    models = [n for n, r in rows.items() if r.get("kind") == "model"]
    best = min(models, key=lambda n: _finite_or_inf(rows[n]["score"]), default=None)
    n, total = scores.get("studies"), scores.get("test_studies")
    if total and n != total:
        which = f"the {n} of the {total} in the truth that every model predicted"
    else:
        which = f"{n} held-out test studies" + (", all those in the truth" if total else "")
    intro = (
        f"Official metric on {which}; every row is scored on the same studies. Lower is "
        "better. <em>× weighted prior</em>: score divided by the weighted prior's (the class "
        "prior times the metric's 1/2/4 severity weights, renormalised: the best constant "
        "prediction, so the bar a model must clear to be reading its images) on the same rows; "
        "<em>× prior</em>: the same for the plain class prior. "
        "<em>gap closed</em>: (prior − model) / (prior − oracle), the share of the way "
        "from the class prior to the oracle (a classifier given the phantom's true narrowing, "
        "the floor the labels' noise allows) that a model covers."
    )
    missing = {
        name: k for name, k in (scores.get("predicted") or {}).items() if total and k < total
    }
    lines = [
        "<h2>Scores on the test studies</h2>",
        f'<p class="note">{intro}</p>',
    ]
    if missing:
        text = ", ".join(f"{name} predicted {k}" for name, k in missing.items())
        lines.append(f'<p class="note">Not every model predicted every study: {esc(text)}.</p>')
    head = "".join(f"<th>{esc(_TERM_TITLES[k])}</th>" for k in SCORE_KEYS)
    lines.append(
        f"<table>\n<tr><th>model</th>{head}<th>× weighted prior</th><th>× prior</th>"
        "<th>gap closed</th></tr>"
    )
    weighted = (rows.get("weighted prior") or {}).get("score")
    for name, row in rows.items():
        cls = "baseline" if row.get("kind") == "baseline" else ("best" if name == best else "")
        cells = "".join(f'<td class="num">{_num(row.get(k))}</td>' for k in SCORE_KEYS)
        times = (row.get("ratio_to_prior") or {}).get("score")
        gap = row.get("gap_closed")
        by_weighted = row["score"] / weighted if weighted else None
        lines.append(
            f'<tr class="{cls}"><td>{esc(name)}</td>{cells}'
            f'<td class="num">{_num(by_weighted, ".2f", "×")}</td>'
            f'<td class="num">{_num(times, ".2f", "×")}</td>'
            f'<td class="num">{_percent(gap)}</td></tr>'
        )
    lines.append("</table>")
    return "\n".join(lines)


def _ensemble_section(ens: Mapping[str, Any]) -> str:
    """Which model the ensemble keeps for each metric group, and whether that beats each one."""
    models = list(ens.get("models", []))
    weights = ens.get("weights", {})
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    lines = [
        "<h2>Ensemble</h2>",
        '<p class="note">Weight of each model per metric group (left and right share theirs), '
        "then one calibration. "
        + (
            "Two kinds of ensemble compete out of fold: the pool (weights fitted to minimise "
            "the metric) and each model alone with its own calibration (weight 1; the others "
            "serve only the studies it cannot read). The one that scores best cross-fitted is "
            "kept.</p>"
            if len(models) > 1
            else "One model: the ensemble is its calibration, fitted out of fold.</p>"
        ),
        f"<table>\n<tr><th>group</th>{head}</tr>",
    ]
    for group, row in weights.items():
        cells = "".join(f'<td class="num">{_num(row.get(m), ".2f")}</td>' for m in models)
        lines.append(f"<tr><td>{esc(group)}</td>{cells}</tr>")
    lines.append("</table>")
    oof = ens.get("oof") or {}
    if oof.get("ensemble") and len(models) == 1:
        raw = (oof.get("models") or {}).get(models[0], {}).get("score")
        lines.append(
            f'<p class="note">Out of fold, on {esc(str(oof.get("studies", "")))} studies: '
            f"{_num(oof['ensemble']['score'])} calibrated (cross-fitted), {_num(raw)} raw.</p>"
        )
    elif oof.get("ensemble"):
        own = {m: (oof.get("models_calibrated") or {}).get(m, {}).get("score") for m in models}
        text = ", ".join(f"{m} {_num(s)}" for m, s in own.items() if s is not None)
        pool = (oof.get("pool") or {}).get("score")
        chosen = oof.get("chosen", "pool")
        kept = "the pool" if chosen == "pool" else f"{chosen} alone"
        verdict = (
            "It beats every model alone."
            if oof.get("beats_each_model")
            else "It does not beat every model alone: "
            + (
                "the pool and a model alone are close on these studies, and the folds that "
                "chose it were not the ones that scored it."
                if chosen == "pool"
                else f"the pool adds nothing {chosen} does not see."
            )
        )
        lines.append(
            f'<p class="note">Out of fold, cross-fitted on {esc(str(oof.get("studies", "")))} '
            f"studies: the pool scores {_num(pool)}, each model with its own calibration "
            f"{esc(text)}{esc(_pool_against_best(pool, own, oof.get('pool_se')))}. "
            f"Kept: <b>{esc(kept)}</b>; chosen and fitted on the other folds "
            f"each time, it scores {_num(oof['ensemble']['score'])}. {esc(verdict)}</p>"
        )
    return "\n".join(lines)


def _pool_against_best(pool: Any, own: Mapping[str, Any], se: Any) -> str:
    """' (the pool minus the best model alone: D ± SE ...)', or '' without the figures."""
    scores = [x for x in own.values() if isinstance(x, (int, float))]
    if not scores or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (pool, se)):
        return ""
    diff = pool - min(scores)
    return (
        f" (the pool minus the best model alone: {diff:+.4f} ± {se:.4f}, one bootstrap "
        f"standard error over studies{': within noise' if abs(diff) <= se else ''})"
    )


def _oof_section(run_dirs: Mapping[str, str | Path]) -> str:
    """Out-of-fold scores of the runs that have a summary.json, next to their class prior."""
    found = []
    for name, run in run_dirs.items():
        path = Path(run) / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            if "oof_score" in summary:
                found.append((name, summary))
    if not found:
        return ""
    head = "".join(f"<th>{esc(_TERM_TITLES[k])}</th>" for k in SCORE_KEYS)
    lines = [
        "<h2>Cross-validation (out-of-fold, training studies)</h2>",
        '<p class="note">Each training study scored by the fold that did not train on it; the '
        "class prior and weighted prior of each fold's training studies on the same rows. "
        "<em>calibrated</em>: "
        "with the temperature fitted on the other folds (cross-fitted), as predictions on new "
        "studies are.</p>",
        f"<table>\n<tr><th>run</th><th>studies</th>{head}<th>× weighted prior</th>"
        "<th>× prior</th></tr>",
    ]
    for name, s in found:
        prior = s.get("prior_score") or {}
        weighted = s.get("weighted_prior_score") or {}
        variants = [("", s["oof_score"]), (" calibrated", s.get("oof_score_calibrated"))]
        for suffix, terms in variants:
            if not terms:
                continue
            cells = "".join(f'<td class="num">{_num(terms.get(k))}</td>' for k in SCORE_KEYS)
            ratio = terms["score"] / prior["score"] if prior.get("score") else None
            by_weighted = terms["score"] / weighted["score"] if weighted.get("score") else None
            lines.append(
                f"<tr><td>{esc(name + suffix)}</td>"
                f'<td class="num">{esc(str(s.get("studies", "")))}</td>{cells}'
                f'<td class="num">{_num(by_weighted, ".2f", "×")}</td>'
                f'<td class="num">{_num(ratio, ".2f", "×")}</td></tr>'
            )
        for label, base in (("weighted prior", weighted), ("class prior", prior)):
            if not base:
                continue
            cells = "".join(f'<td class="num">{_num(base.get(k))}</td>' for k in SCORE_KEYS)
            by_weighted = base["score"] / weighted["score"] if weighted.get("score") else None
            by_prior = base["score"] / prior["score"] if prior.get("score") else None
            lines.append(
                f'<tr class="baseline"><td>{esc(name)}: {label}</td>'
                f'<td class="num">{esc(str(s.get("studies", "")))}</td>{cells}'
                f'<td class="num">{_num(by_weighted, ".2f", "×")}</td>'
                f'<td class="num">{_num(by_prior, ".2f", "×")}</td></tr>'
            )
    lines.append("</table>")
    return "\n".join(lines)


def _keypoint_section(error: Mapping[str, Mapping[str, float]], png: str) -> str:
    lines = [
        "<h2>Keypoint error (multitask, out-of-fold)</h2>",
        '<p class="note">Distance in mm between predicted and true points of the training '
        "studies with coordinates, each predicted by the fold that did not train on it.</p>",
        "<table>\n<tr><th>series type</th><th>points</th><th>median mm</th><th>p90 mm</th></tr>",
    ]
    for series, stats in error.items():
        n = stats.get("n")
        lines.append(
            f'<tr><td>{esc(series)}</td><td class="num">{"" if n is None else int(n)}</td>'
            f'<td class="num">{_num(stats.get("median"), ".1f")}</td>'
            f'<td class="num">{_num(stats.get("p90"), ".1f")}</td></tr>'
        )
    lines.append("</table>")
    lines.append(figure(png, "median and 90th percentile of the keypoint error per series type"))
    return "\n".join(lines)


def _stage_section(seconds: Mapping[str, float], png: str) -> str:
    total = sum(seconds.values())
    lines = [
        "<h2>Stage times</h2>",
        "<table>\n<tr><th>stage</th><th>seconds</th><th>minutes</th><th>share</th></tr>",
    ]
    for stage, s in [*seconds.items(), ("total", total)]:
        share = s / total if total else None
        lines.append(
            f'<tr class="{"total" if stage == "total" else ""}"><td>{esc(stage)}</td>'
            f'<td class="num">{_num(s, ".1f")}</td><td class="num">{_num(s / 60, ".1f")}</td>'
            f'<td class="num">{_percent(share)}</td></tr>'
        )
    lines.append("</table>")
    lines.append(figure(png, "wall time of each stage"))
    return "\n".join(lines)


def _finite_or_inf(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


def _num(x: Any, fmt: str = ".4f", suffix: str = "") -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    return f"{x:{fmt}}{suffix}"


def _percent(x: Any) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    if 0 < x < 0.005:
        return "<1%"  # a stage that ran, shown as 0%, reads like one that did not
    return f"{100 * x:.0f}%"


# --- figures -------------------------------------------------------------------------------


def _confusion_figure(name: str, labels: np.ndarray, probs: np.ndarray):
    from lsdc.evaluation import confusion_matrices

    plt = pyplot()
    matrices = confusion_matrices(labels, probs)
    short = ["Normal/\nMild", "Moderate", "Severe"]
    fig, axes = plt.subplots(1, len(METRIC_GROUPS), figsize=(11, 3.8), constrained_layout=True)
    for ax, group in zip(axes, METRIC_GROUPS, strict=True):
        cm = matrices[group]
        rows = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(cm):
            ax.text(
                j, i, f"{count}\n{100 * share[i, j]:.0f}%", ha="center", va="center",
                fontsize=9, color="white" if share[i, j] > 0.6 else "black",
            )  # fmt: skip
        ax.set_xticks(range(len(SEVERITIES)), short, fontsize=8)
        ax.set_yticks(range(len(SEVERITIES)), short, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{group} ({int(cm.sum())} labels)", fontsize=10)
    fig.suptitle(name, fontsize=12, fontweight="bold")
    return fig


def _keypoint_figure(error: Mapping[str, Mapping[str, float]]):
    plt = pyplot()
    series = list(error)
    x = np.arange(len(series))
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    for k, (stat, colour) in enumerate((("median", "C0"), ("p90", "C1"))):
        values = [float(error[s].get(stat, np.nan)) for s in series]
        bars = ax.bar(x + (k - 0.5) * 0.38, values, 0.38, label=stat, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, series)
    ax.set_ylabel("mm")
    ax.set_title("keypoint error")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    return fig


def _stage_figure(seconds: Mapping[str, float]):
    plt = pyplot()
    stages = list(seconds)
    values = [float(seconds[s]) for s in stages]
    minutes = max(values, default=0) >= 120  # long runs read better in minutes
    shown = [v / 60 for v in values] if minutes else values
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(stages) + 1.0), constrained_layout=True)
    bars = ax.barh(range(len(stages)), shown, color="C2")
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_yticks(range(len(stages)), stages)
    ax.invert_yaxis()  # first stage on top, in the order they ran
    ax.set_xlabel("minutes" if minutes else "seconds")
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    return fig
