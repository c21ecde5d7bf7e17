"""lsdc.report from tiny synthetic inputs: every image the page names is there, every model is
in the table, text is escaped, missing optional inputs leave their sections out."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from lsdc.constants import TARGETS
from lsdc.report import keypoint_error_of, write_report

TERMS = {"spinal": 0.5, "foraminal": 0.6, "subarticular": 0.7, "any_severe_spinal": 0.4}


def _row(kind: str, score: float, gap: float | None) -> dict:
    return {
        "kind": kind,
        **TERMS,
        "score": score,
        "ratio_to_prior": {"score": score / 0.8},
        "gap_closed": gap,
    }


SCORES = {
    "studies": 3,
    "test_studies": 4,
    "predicted": {"multitask": 4, "seq <b>&": 3},
    "models": ["multitask", "seq <b>&"],
    "rows": {
        "multitask": _row("model", 0.6, 0.4),
        "seq <b>&": _row("model", 0.7, 0.2),
        "class prior": _row("baseline", 0.8, 0.0),
        "uniform": _row("baseline", 1.0, -0.4),
        "oracle": _row("baseline", 0.3, 1.0),
    },
}


class _Page(HTMLParser):
    """Image sources and table cell texts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _png(path: Path, colour: float = 0.5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow(np.full((4, 4), colour), cmap="gray", vmin=0, vmax=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _run_dir(root: Path, name: str, keypoints: bool) -> Path:
    run = root / name
    _png(run / "curves.png")
    summary = {
        "studies": 8,
        "oof_score": {**TERMS, "score": 0.55},
        "prior_score": TERMS | {"score": 0.8},
    }
    if keypoints:
        summary["keypoint_error_mm"] = {
            "Axial T2": {"median": 2.0, "p90": 4.0, "n": 10},
            "Sagittal T1": {"median": 7.5, "p90": 12.0, "n": 12},
        }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_full_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=(3, len(TARGETS)))
    probs = rng.dirichlet(np.ones(3), size=(3, len(TARGETS)))
    runs = {
        "multitask": _run_dir(tmp_path / "runs", "mt", keypoints=True),
        "seq <b>&": _run_dir(tmp_path / "runs", "seq", keypoints=False),
    }
    pictures = [
        ("study 1 <points>", _png(tmp_path / "pics" / "kp.png", 0.2)),
        ("study 2", _png(tmp_path / "other" / "kp.png", 0.8)),  # same file name: kept apart
    ]
    out = tmp_path / "report"
    index = write_report(
        out,
        scores=SCORES,
        confusion={"multitask": (labels, probs), "seq <b>&": (labels, probs)},
        run_dirs=runs,
        keypoint_error=keypoint_error_of(runs["multitask"]),
        stage_seconds={"phantom": 12.0, "train": 300.5},
        pictures=pictures,
        title="demo <report>",
    )
    assert index == out / "index.html"
    page = _parse(index)
    text = index.read_text()

    # every named image is a real PNG in the folder, linked relatively, none twice
    assert len(page.images) == 2 + 1 + 2 + 2 + 1  # confusion, keypoints, pictures, curves, stages
    assert len(set(page.images)) == len(page.images)
    for src in page.images:
        assert "/" not in src
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pictures were copied, not linked: both distinct sources survive
    copied = [src for src in page.images if src.startswith("picture-")]
    assert len({(out / s).read_bytes() for s in copied}) == 2

    for name in ("multitask", "seq <b>&", "class prior", "uniform", "oracle"):
        assert name in page.cells
    assert "<b>" not in text and "seq &lt;b&gt;&amp;" in text
    assert "<title>demo &lt;report&gt;</title>" in text
    assert "40%" in page.cells and "100%" in page.cells  # gap closed as a share
    assert "0.75×" in page.cells  # ratio to the prior
    assert "seq &lt;b&gt;&amp; predicted 3" in text  # fewer studies than the truth holds
    assert "the 3 of the 4 in the truth that every model predicted" in text
    assert "Keypoint error" in text and "Sagittal T1" in page.cells
    assert "312.5" in page.cells  # stage total
    assert json.loads((out / "scores.json").read_text()) == SCORES


def test_optional_inputs_left_out(tmp_path: Path) -> None:
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    index = write_report(tmp_path / "r", scores=SCORES, run_dirs={"sequence": empty_run})
    page = _parse(index)
    text = index.read_text()
    assert page.images == []
    for heading in ("Confusion", "Keypoint", "Learning curves", "Stage times", "Cross-validation"):
        assert heading not in text
    assert "multitask" in page.cells
    assert keypoint_error_of(empty_run) is None
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["index.html", "scores.json"]


def test_missing_picture_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_report(tmp_path / "r", scores=SCORES, pictures=[("x", tmp_path / "nope.png")])


def test_best_model_is_marked(tmp_path: Path) -> None:
    text = write_report(tmp_path / "r", scores=SCORES).read_text()
    best = re.search(r'<tr class="best"><td>([^<]*)</td>', text)
    assert best is not None and best.group(1) == "multitask"
    assert text.count('<tr class="baseline">') == 3


def test_ensemble_section_names_each_groups_weights_and_the_verdict(tmp_path: Path) -> None:
    ensemble = {
        "models": ["multitask", "sequence"],
        "weights": {
            "spinal": {"multitask": 0.9, "sequence": 0.1},
            "foraminal": {"multitask": 0.5, "sequence": 0.5},
            "subarticular": {"multitask": 0.7, "sequence": 0.3},
        },
        "oof": {
            "studies": 40,
            "ensemble": {"score": 0.71},
            "chosen": "pool",
            "pool_se": 0.0123,
            "pool": {"score": 0.69},
            "models_calibrated": {"multitask": {"score": 0.70}, "sequence": {"score": 0.80}},
            "beats_each_model": False,
        },
    }
    text = write_report(tmp_path / "r", scores=SCORES, ensemble=ensemble).read_text()
    assert "<h2>Ensemble</h2>" in text and "0.90" in text and "0.10" in text
    assert "Kept: <b>the pool</b>" in text and "it scores 0.7100" in text
    assert "the pool minus the best model alone: -0.0100 ± 0.0123" in text
    assert "standard error over studies: within noise)" in text
    assert "the pool scores 0.6900" in text and "multitask 0.7000, sequence 0.8000" in text
    assert "does not beat every model alone" in text
    ensemble["oof"]["beats_each_model"] = True
    text = write_report(tmp_path / "r2", scores=SCORES, ensemble=ensemble).read_text()
    assert "It beats every model alone." in text
    ensemble["weights"] = {g: {"multitask": 1.0, "sequence": 0.0} for g in ensemble["weights"]}
    ensemble["oof"].update(chosen="multitask", beats_each_model=False, pool={"score": 0.75})
    text = write_report(tmp_path / "r3", scores=SCORES, ensemble=ensemble).read_text()
    assert "Kept: <b>multitask alone</b>" in text
    assert "the pool adds nothing multitask does not see" in text
    # One model: its calibration, no contest to report.
    one = {
        "models": ["multitask"],
        "weights": {g: {"multitask": 1.0} for g in ensemble["weights"]},
        "oof": {
            "studies": 80,
            "ensemble": {"score": 0.6653},
            "models": {"multitask": {"score": 0.6852}},
            "beats_each_model": False,
        },
    }
    text = write_report(tmp_path / "r4", scores=SCORES, ensemble=one).read_text()
    assert "One model: the ensemble is its calibration" in text
    assert "0.6653 calibrated (cross-fitted), 0.6852 raw" in text
    assert "Kept:" not in text and "does not beat" not in text
