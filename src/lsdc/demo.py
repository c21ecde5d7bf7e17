"""The end-to-end demo on phantom data: every stage that exists, in order, on a laptop.

phantom (synth) -> slice relevance (train + CV report) -> multitask crops (train and test caches,
picture) -> sequence caches -> sequence model (cross-validated, OOF score) -> multitask model
(cross-validated, OOF score and keypoint error) -> test predictions of both -> valid submissions
-> scored against the phantom's truth, next to the class prior.

Output folder:
  data/                 the phantom dataset (RSNA layout + truth/)
  runs/slice-relevance  runs/sequence  runs/multitask    run folders
  cache/                per-study caches of both pipelines
  pictures/             phantom montage, multitask crops, sequence slices, training curves,
                        predicted vs true keypoints
  submission.csv        the sequence model's predictions for the phantom's test studies
  submission-multitask.csv (+ _coordinates.csv)  the multitask model's, with its keypoints
  demo.json             every figure of the run
A rerun reuses finished stages (same phantom, caches, finished folds).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lsdc.fileio import atomic_write_json


@dataclass
class DemoConfig:
    # Sized so the model clears the class prior on the test studies in minutes on 2 cores.
    train_studies: int = 80
    test_studies: int = 20
    size: int = 128  # sagittal matrix of the phantom, px
    seed: int = 0
    workers: int = 2
    folds: int = 2
    relevance_folds: int = 3  # study-wise CV folds of the slice-relevance report
    epochs: int = 10
    crop_size: int = 64  # sequence-model input, px
    backbone: str = "resnet10t"
    multitask_input: int = 96  # multitask first-pass input, px (crops are cached at 128)
    multitask_epochs: int = 12


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


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None, *, log=print) -> DemoReport:
    """Run the whole demo into `out_dir`; returns (and writes to demo.json) its figures."""
    from lsdc.inference.predictor import predict_submission
    from lsdc.inference.submission import validate_submission_file
    from lsdc.inference.viz import plot_multitask_study
    from lsdc.io.tables import read_train_labels
    from lsdc.metrics import labels_array, score_arrays, score_files
    from lsdc.preprocess import multitask, sequence
    from lsdc.preprocess.cache import StudyCache
    from lsdc.preprocess.slice_relevance import format_table, train_slice_relevance
    from lsdc.preprocess.viz import plot_crops
    from lsdc.synth import generate_dataset, study_ids
    from lsdc.synth.preview import render_preview
    from lsdc.training.engine import class_prior
    from lsdc.training.multitask import train_multitask
    from lsdc.training.sequence import train_sequence

    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    data, runs, cache, pics = out / "data", out / "runs", out / "cache", out / "pictures"
    pics.mkdir(parents=True, exist_ok=True)
    report = DemoReport(out)

    def stage(name: str):
        report.seconds[name] = time.perf_counter()
        log(f"[lsdc demo] {name}")

    def done(name: str) -> None:
        report.seconds[name] = round(time.perf_counter() - report.seconds[name], 1)

    stage("phantom")
    if not _phantom_matches(data, cfg):
        generate_dataset(
            data,
            train_studies=cfg.train_studies,
            test_studies=cfg.test_studies,
            size=cfg.size,
            seed=cfg.seed,
            workers=cfg.workers,
        )
    first = study_ids(cfg.seed, 1)[0]
    render_preview(data, first, pics / "phantom.png")
    done("phantom")

    stage("slice relevance")
    relevance = runs / "slice-relevance"
    # report.md is written last: its presence means a finished run, reused as it is (the
    # multitask caches are keyed to the run's files, so retraining would invalidate them).
    if not (relevance / "report.md").exists():
        sr = train_slice_relevance(
            data, relevance, workers=cfg.workers, overrides=[f"folds={cfg.relevance_folds}"]
        )
        log(format_table(sr.table))
    report.figures["slice_relevance"] = json.loads((relevance / "report.json").read_text())
    done("slice relevance")

    stage("multitask crops")
    for split in ("train", "test"):
        multitask.preprocess_dataset(
            data, cache / f"multitask-{split}", split=split, workers=cfg.workers,
            relevance_run=relevance,
        )  # fmt: skip
    plot_crops(cache / "multitask-train", first, pics / "multitask-crops.png")
    done("multitask crops")

    stage("sequence caches")
    seq_overrides = [f"size={cfg.crop_size}", f"axial_roi_path={relevance / 'axial_roi.json'}"]
    for split in ("train", "test"):
        rep = sequence.preprocess_dataset(
            data, cache / f"sequence-{split}", split=split, workers=cfg.workers,
            overrides=seq_overrides,
        )  # fmt: skip
        if rep.failed:
            log(f"[lsdc demo] {len(rep.failed)} {split} studies failed: {rep.failed}")
    sequence.plot_sequence_study(cache / "sequence-train", first, pics / "sequence-slices.png")
    done("sequence caches")

    stage("sequence model")
    result = train_sequence(
        cache / "sequence-train",
        runs / "sequence",
        folds=cfg.folds,
        epochs=cfg.epochs,
        overrides=[f"model.backbone={cfg.backbone}", "engine.progress_bar=false"],
    )
    report.figures["sequence_oof"] = result.score
    report.figures["sequence_oof_class_prior"] = result.prior_score
    curves = runs / "sequence" / "curves.png"
    if curves.exists():
        shutil.copyfile(curves, pics / "sequence-curves.png")
    done("sequence model")

    stage("multitask model")
    mt = train_multitask(
        cache / "multitask-train",
        runs / "multitask",
        folds=cfg.folds,
        epochs=cfg.multitask_epochs,
        overrides=[
            f"model.backbone={cfg.backbone}",
            f"data.input.sagittal_size={cfg.multitask_input}",
            f"data.input.axial_size={cfg.multitask_input}",
            f"model.window_px={max(16, cfg.multitask_input // 4)}",
            "engine.progress_bar=false",
        ],
    )
    report.figures["multitask_oof"] = mt.score
    report.figures["multitask_oof_class_prior"] = mt.prior_score
    mt_summary = json.loads((runs / "multitask" / "summary.json").read_text())
    report.figures["multitask_keypoint_error_mm"] = mt_summary["keypoint_error_mm"]
    if (runs / "multitask" / "curves.png").exists():
        shutil.copyfile(runs / "multitask" / "curves.png", pics / "multitask-curves.png")
    done("multitask model")

    stage("predict test")
    sub = predict_submission(
        runs / "sequence",
        cache / "sequence-test",
        out / "submission.csv",
        series_descriptions=data / "test_series_descriptions.csv",
        tta_flip=True,
    )
    problems = validate_submission_file(sub.path, data / "test_series_descriptions.csv")
    if problems:
        raise RuntimeError(f"{sub.path}: invalid submission: {problems[:5]}")
    truth = data / "truth" / "test_labels.csv"
    report.figures["test"] = score_files(truth, sub.path)
    report.figures["test_studies_given_prior"] = sub.filled
    # The class prior of the training labels on the same test rows: the bar to clear.
    train_codes = labels_array(read_train_labels(data / "train.csv"))[1]
    _, test_codes = labels_array(read_train_labels(truth))
    prior = class_prior(train_codes)
    report.figures["test_class_prior"] = score_arrays(
        test_codes, prior[None].repeat(len(test_codes), axis=0)
    )
    mt_sub = predict_submission(
        runs / "multitask",
        cache / "multitask-test",
        out / "submission-multitask.csv",
        series_descriptions=data / "test_series_descriptions.csv",
        tta_flip=True,
    )
    problems = validate_submission_file(mt_sub.path, data / "test_series_descriptions.csv")
    if problems:
        raise RuntimeError(f"{mt_sub.path}: invalid submission: {problems[:5]}")
    report.figures["test_multitask"] = score_files(truth, mt_sub.path)
    test_ids = StudyCache.open(cache / "multitask-test").study_ids()
    if test_ids:
        plot_multitask_study(
            runs / "multitask", cache / "multitask-test", test_ids[0],
            pics / "multitask-keypoints.png",
        )  # fmt: skip
    done("predict test")

    atomic_write_json(
        out / "demo.json",
        {"config": asdict(cfg), "figures": report.figures, "seconds": report.seconds},
    )
    p = report.figures["test_class_prior"]
    for name, key in (("sequence", "test"), ("multitask", "test_multitask")):
        t = report.figures[key]
        log(
            f"[lsdc demo] {name} test score "
            + ", ".join(f"{k} {v:.4f}" for k, v in t.items())
            + f"  (class prior {p['score']:.4f})"
        )
    log(f"[lsdc demo] submission {sub.path}; pictures in {pics}; figures in {out / 'demo.json'}")
    return report
