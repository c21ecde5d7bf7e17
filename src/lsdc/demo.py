"""The end-to-end demo on phantom data: phantom -> `lsdc fit --preset demo` -> `lsdc predict` on
the held-out studies -> everything scored against the phantom's truth -> an HTML report.

Output folder:
  data/                 the phantom dataset (RSNA layout + truth/)
  runs/                 the runs folder of `lsdc fit` (plan, slice relevance, SR, both model
                        families, ensemble; training caches in runs/cache)
  work/                 the test caches made by `lsdc predict`
  submission.csv        the ensemble's predictions for the test studies (+ _warnings.csv,
                        _coordinates.csv)
  report/index.html     the report (scores vs class prior, uniform and oracle; confusion
                        matrices; keypoint error; predicted points; curves; stage times)
  demo.json             every figure of the run
A rerun reuses finished stages (same phantom, caches, finished folds).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.fileio import atomic_write_json


@dataclass
class DemoConfig:
    train_studies: int = 80
    test_studies: int = 20
    size: int = 128  # sagittal matrix of the phantom, px
    seed: int = 0
    workers: int = 2
    preset: str = "demo"
    models: list[str] | None = None  # None: the preset's (`lsdc.pipeline.PRESET_MODELS`)
    # `lsdc fit` overrides (STAGE.key=value) on top of the preset
    fit: list[str] = field(default_factory=list)


@dataclass
class DemoReport:
    out_dir: Path
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _phantom_matches(data: Path, cfg: DemoConfig) -> bool:
    """True when `data` already holds the phantom these settings would write."""
    found = data / "truth" / "synth.json"
    if not found.exists():
        return False
    args = json.loads(found.read_text())
    wanted = {
        "train_studies": cfg.train_studies,
        "test_studies": cfg.test_studies,
        "size": cfg.size,
        "seed": cfg.seed,
    }
    return all(args.get(k) == v for k, v in wanted.items())


def model_predictions(runs: Path, sub: Any) -> dict[str, tuple]:
    """Each model alone on the test studies it saw, with its run's own calibration (as
    `lsdc predict RUN CACHE` would give it), from the probabilities `predict` already made."""
    from lsdc.inference.calibration import CALIBRATION_FILE, Calibration, apply_calibration

    out = {}
    for name, probs in sub.model_probs.items():
        seen = ~np.isnan(probs).any(axis=(1, 2))
        p = probs[seen]
        cal = runs / name / CALIBRATION_FILE
        if cal.exists():
            p = apply_calibration(p, Calibration.load(cal))
        out[name] = (sub.study_ids[seen], p)
    return out


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None, *, log=print) -> DemoReport:
    """Run the whole demo into `out_dir`; returns (and writes to demo.json) its figures."""
    from dataclasses import replace

    from lsdc.evaluation import score_table
    from lsdc.pipeline import PRESET_MODELS, fit, predict
    from lsdc.synth import generate_dataset

    cfg = cfg or DemoConfig()
    cfg = replace(cfg, models=list(cfg.models or PRESET_MODELS[cfg.preset]))
    out = Path(out_dir)
    data, runs, work = out / "data", out / "runs", out / "work"
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(out)

    def timed(name: str, fn, parts=lambda result: {}):
        """Run a stage; record its own parts' seconds when it has them (no double count)."""
        log(f"[lsdc demo] {name}")
        t0 = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t0, 1)
        split = {f"{name}: {k}": v for k, v in parts(result).items()}
        report.seconds.update(split or {name: seconds})
        log(f"[lsdc demo] {name}: {seconds:.0f} s")
        return result

    if not _phantom_matches(data, cfg):
        timed(
            "phantom",
            lambda: generate_dataset(
                data,
                train_studies=cfg.train_studies,
                test_studies=cfg.test_studies,
                size=cfg.size,
                seed=cfg.seed,
                workers=cfg.workers,
            ),
        )
    fitted = timed(
        "fit",
        lambda: fit(
            data,
            runs,
            preset=cfg.preset,
            models=cfg.models,
            overrides=cfg.fit,
            workers=cfg.workers,
            log=log,
        ),
        parts=lambda r: r.seconds,
    )
    sub = timed(
        "predict",
        lambda: predict(
            data,
            runs,
            out / "submission.csv",
            work_dir=work,
            workers=cfg.workers,
            log=log,
        ),
        parts=lambda r: r.seconds,
    )

    predictions = {"ensemble": (sub.study_ids, sub.probs)}
    predictions.update(model_predictions(runs, sub))
    table = score_table(data, predictions)
    report.figures.update(
        test=table,
        oof=fitted.oof,
        ensemble_oof=fitted.ensemble,
        warnings=sub.warnings,
        prior_only=sub.prior_only,
    )
    summary = runs / "multitask" / "summary.json"
    if summary.exists():
        report.figures["keypoint_error_mm"] = json.loads(summary.read_text()).get(
            "keypoint_error_mm"
        )
    html = timed("report", lambda: _write_report(out, cfg, report, predictions))
    atomic_write_json(
        out / "demo.json",
        {"config": asdict(cfg), "figures": report.figures, "seconds": report.seconds},
    )
    prior = table["rows"]["class prior"]["score"]
    weighted = table["rows"]["weighted prior"]["score"]
    for name in ("ensemble", *cfg.models):
        row = table["rows"][name]
        log(
            f"[lsdc demo] {name:9s} test score {row['score']:.4f} = "
            f"{row['score'] / weighted:.2f}x the weighted prior ({weighted:.4f}), "
            f"{row['score'] / prior:.2f}x the class prior ({prior:.4f})"
        )
    log(f"[lsdc demo] submission {sub.path}; report {html}; figures {out / 'demo.json'}")
    return report


def _write_report(out: Path, cfg: DemoConfig, report: DemoReport, predictions: dict) -> Path:
    """Pictures, then the HTML report that shows them."""
    from lsdc.evaluation import align_predictions
    from lsdc.inference.viz import plot_multitask_study
    from lsdc.preprocess.sequence import plot_sequence_study
    from lsdc.preprocess.viz import plot_crops
    from lsdc.report import keypoint_error_of, write_report
    from lsdc.synth import study_ids
    from lsdc.synth.preview import render_preview
    from lsdc.training.folds import FOLDS_FILE, load_folds

    data, runs, pics = out / "data", out / "runs", out / "pictures"
    first = study_ids(cfg.seed, 1)[0]
    pictures = [
        ("A phantom study: every series type", render_preview(data, first, pics / "phantom.png"))
    ]
    if "multitask" in cfg.models:
        cache = runs / "cache" / "multitask-train"
        pictures.append(
            (
                "Multitask crops of a training study with their mapped keypoints",
                plot_crops(cache, first, pics / "multitask-crops.png"),
            )
        )
        # Training studies predicted by the fold model that never saw them: true points exist.
        folds = load_folds(runs / "multitask" / FOLDS_FILE)
        for k in sorted(set(folds.values()))[:2]:
            sid = min(s for s, f in folds.items() if f == k)
            png = plot_multitask_study(
                runs / "multitask", cache, sid, pics / f"keypoints-{sid}.png", folds=[k]
            )
            pictures.append(
                (
                    f"Study {sid} predicted by fold {k}'s model (it never saw it): "
                    "true vs predicted keypoints, second-pass windows",
                    png,
                )
            )
    if "sequence" in cfg.models:
        pictures.append(
            (
                "Sequence model input: the ordered, cropped slices of each series type",
                plot_sequence_study(
                    runs / "cache" / "sequence-train", first, pics / "sequence.png"
                ),
            )
        )
    aligned = align_predictions(data, predictions)
    return write_report(
        out / "report",
        scores=report.figures["test"],
        confusion={n: (aligned.labels, p) for n, p in aligned.probs.items()},
        run_dirs={m: runs / m for m in cfg.models},
        keypoint_error=keypoint_error_of(runs / "multitask") if "multitask" in cfg.models else None,
        stage_seconds=report.seconds,
        pictures=pictures,
        title="lsdc demo: phantom data, held-out test studies",
        ensemble=json.loads((runs / "ensemble.json").read_text())
        if (runs / "ensemble.json").is_file()
        else None,
        notes=[
            f"{cfg.train_studies} training and {cfg.test_studies} test phantom studies at "
            f"{cfg.size} px; `lsdc fit --preset {cfg.preset}` then `lsdc predict`.",
        ],
    )
