"""Benchmark of the multitask pipeline on a phantom split (the split of bench_sequence.py).

Measures, in one run and on the same rows:
- out-of-fold and held-out test scores (four terms and their mean) of the multitask model, the
  class prior, and the oracle (a classifier given the phantom's true narrowing fractions);
- keypoint error in mm (median and p90 per series type, out-of-fold);
- variants (default: the second pass read by the first-pass backbone instead of its own window
  encoder, one head per target instead of per condition, SR upsampling instead of bicubic;
  `--variants "upsample=none,keypoint_head=regression"` for others), each trained on fold 0
  with the same settings otherwise and scored on fold 0's validation studies, with its
  keypoint error;
- the ceiling: the second pass fed windows at the *true* keypoints (out-of-fold studies with
  coordinates), beside the same model at its predicted keypoints, so that localisation and
  classification errors can be told apart;
- the SR network's PSNR/SSIM against bicubic on held-out crops;
- seconds per training epoch and per study at inference (fold ensemble with flip TTA, CPU);
- with --sequence-json, the sequence benchmark's scores on the same split, for comparison.

    python bench/bench_multitask.py --data PHANTOM   # an existing phantom (else one is made)
    python bench/bench_multitask.py --train-studies 200 --test-studies 50 --phantom-size 192

Writes JSON to bench/results/bench_multitask.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import heldout_scores, oracle_probs, ratio  # noqa: E402

DEFAULT_OVERRIDES = [
    "model.backbone=resnet10t",
    "data.input.sagittal_size=96",
    "data.input.axial_size=96",
    "model.window_px=24",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="existing phantom / RSNA-format dataset")
    p.add_argument("--work", type=Path, default=Path("bench/results/multitask_work"))
    p.add_argument("--train-studies", type=int, default=200)
    p.add_argument("--test-studies", type=int, default=50)
    p.add_argument("--phantom-size", type=int, default=192, help="phantom sagittal matrix, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=128, help="crop size of the cache, px")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--relevance-folds", type=int, default=3)
    p.add_argument("--sr-steps", type=int, default=1500)
    p.add_argument(
        "--variants",
        default="second_backbone=shared,heads=target,upsample=sr",
        help="model settings each trained on fold 0 beside the main run, compared on fold 0's\n"
        "validation studies ('' = none); upsample=sr uses the SR run trained here",
    )
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--sequence-json", type=Path, help="bench_sequence.py JSON on the same data")
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_multitask.json"))
    p.add_argument("overrides", nargs="*", help=f"training overrides (default {DEFAULT_OVERRIDES})")
    return p.parse_args(argv)


def _fold_rows(run: Path, fold: int, *, inside: bool = True) -> list[int]:
    """Studies of fold `fold` (or, with inside=False, of every other fold)."""
    from lsdc.training.folds import load_folds

    return sorted(s for s, k in load_folds(run / "folds.csv").items() if (k == fold) == inside)


def _predict_fold(run: Path, cache: Path, fold: int, ids: list[int], teacher: bool) -> dict:
    """Fold `fold`'s model on `ids` (teacher: second pass at the true keypoints) -> combined
    and per-pass probabilities (n, 25, 3)."""
    import torch

    from lsdc.data.multitask import collate_multitask
    from lsdc.inference.predictor import Predictor

    pred = Predictor.from_run(run, folds=[fold], device="cpu")
    ds = pred.family.dataset(cache, ids, pred.info)
    ds.teacher = teacher
    out = {"logits": [], "logits_first": [], "logits_second": []}
    model = pred.models[0]
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            batch = collate_multitask([ds[j] for j in range(i, min(len(ds), i + 8))])
            res = model(batch)
            for k in out:
                out[k].append(res[k].float().softmax(-1).numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in out.items()}


def _variant_figures(run: Path, labels: np.ndarray, probs: np.ndarray) -> dict:
    """Fold-0 score and the run's out-of-fold keypoint error."""
    from lsdc.metrics import score_arrays

    summary = json.loads((run / "summary.json").read_text())
    return {"score": score_arrays(labels, probs), "keypoint_error_mm": summary["keypoint_error_mm"]}


def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum(axis=-1, keepdims=True)


def _labels(cache: Path, ids: list[int]) -> np.ndarray:
    from lsdc.preprocess.cache import StudyCache

    return StudyCache.open(cache).labels(ids)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from lsdc.inference.predictor import Predictor
    from lsdc.metrics import score_arrays
    from lsdc.preprocess.multitask import preprocess_dataset
    from lsdc.training.engine import class_prior
    from lsdc.training.multitask import train_multitask
    from lsdc.training.superres import train_sr

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = args.data
    if data is None:
        from lsdc.synth import generate_dataset

        name = f"phantom_{args.train_studies}_{args.test_studies}_{args.phantom_size}_{args.seed}"
        data = work / name
        if not (data / "train.csv").exists():
            t0 = time.perf_counter()
            generate_dataset(
                data, train_studies=args.train_studies, test_studies=args.test_studies,
                size=args.phantom_size, seed=args.seed, workers=args.workers,
            )  # fmt: skip
            timings["phantom_seconds"] = time.perf_counter() - t0

    relevance = work / "slice-relevance"
    if not (relevance / "report.md").exists():
        import subprocess

        # In a child process: once XGBoost has run here, forked preprocessing workers could
        # hang (OpenMP), and lsdc would fall back to one worker.
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lsdc.cli", "train", "slice-relevance", str(data),
             "--out", str(relevance), "--workers", str(args.workers),
             f"folds={args.relevance_folds}"],
            check=True,
        )  # fmt: skip
        timings["slice_relevance_seconds"] = time.perf_counter() - t0
    relevance_report = json.loads((relevance / "report.json").read_text())

    caches = {}
    for split in ("train", "test"):
        if not (data / f"{split}_series_descriptions.csv").exists():
            continue
        cache = work / f"cache_{split}_{args.crop_size}"
        t0 = time.perf_counter()
        rep = preprocess_dataset(
            data, cache, split=split, workers=args.workers, relevance_run=relevance,
            overrides=[f"crop_size={args.crop_size}"],
        )  # fmt: skip
        if rep.written:
            timings[f"preprocess_{split}_seconds_per_study"] = (time.perf_counter() - t0) / len(
                rep.written
            )
        if rep.failed:
            print(f"{split}: {len(rep.failed)} studies failed: {rep.failed}", file=sys.stderr)
        caches[split] = cache

    sr_run = work / "sr"
    if not (sr_run / "report.json").exists():
        t0 = time.perf_counter()
        train_sr(caches["train"], sr_run, overrides=[f"steps={args.sr_steps}"])
        timings["sr_train_seconds"] = time.perf_counter() - t0
    sr_report = json.loads((sr_run / "report.json").read_text())

    overrides = args.overrides or DEFAULT_OVERRIDES
    base = [*overrides, "engine.progress_bar=false"]
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)  # fresh: timings must not include a resume
    t0 = time.perf_counter()
    cv = train_multitask(caches["train"], run, folds=args.folds, epochs=args.epochs, overrides=base)
    timings["train_seconds"] = time.perf_counter() - t0
    timings["epoch_seconds"] = cv.epoch_seconds
    summary = json.loads((run / "summary.json").read_text())
    main_mode = next(
        (o.split("=", 1)[1] for o in base if o.startswith("model.upsample=")), "bicubic"
    )

    oof_oracle = oracle_probs(data, cv.study_ids.tolist())
    result: dict = {
        "benchmark": "bench_multitask",
        "data": str(data),
        "studies_oof": len(cv.study_ids),
        "oof": {
            "model": cv.score,
            # calibration fitted on the other fold's OOF (cross-fitting), never on these rows
            **({"model_calibrated": cv.calibrated_score} if cv.calibrated_score else {}),
            "class_prior": cv.prior_score,
            **({"oracle": score_arrays(cv.labels, oof_oracle)} if oof_oracle is not None else {}),
        },
        "oof_ratio_model_to_prior": ratio(cv.score, cv.prior_score),
        "keypoint_error_mm": summary["keypoint_error_mm"],
        "slice_relevance": relevance_report["accuracy"],
        "superres": sr_report,
        "timings": timings,
        "settings": {
            "epochs": args.epochs,
            "folds": args.folds,
            "crop_size": args.crop_size,
            "phantom_size": args.phantom_size,
            "train_studies": args.train_studies,
            "test_studies": args.test_studies,
            "overrides": base,
            "upsample": main_mode,
        },  # fmt: skip
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "train_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        },
    }

    # Ceiling: the second pass at the true keypoints, on fold-0 studies that have them.
    val0 = _fold_rows(run, 0)
    labels0 = _labels(caches["train"], val0)
    at_pred = _predict_fold(run, caches["train"], 0, val0, teacher=False)
    at_true = _predict_fold(run, caches["train"], 0, val0, teacher=True)
    prior0 = np.broadcast_to(
        class_prior(_labels(caches["train"], _fold_rows(run, 0, inside=False))),
        at_pred["logits"].shape,
    )
    result["fold0"] = {
        "studies": len(val0),
        "class_prior": score_arrays(labels0, prior0),
        "first_pass": score_arrays(labels0, at_pred["logits_first"]),
        "second_pass_at_predicted_points": score_arrays(labels0, at_pred["logits_second"]),
        "second_pass_at_true_points": score_arrays(labels0, at_true["logits_second"]),
        "combined_at_predicted_points": score_arrays(labels0, at_pred["logits"]),
        "combined_with_second_pass_at_true_points": score_arrays(labels0, at_true["logits"]),
        # the two passes averaged (geometric mean) at inference: what combine=average would give
        "passes_averaged": score_arrays(
            labels0, _normalise(np.sqrt(at_pred["logits_first"] * at_pred["logits_second"]))
        ),
    }

    # Variants: the same model with one setting changed, trained and scored on fold 0.
    result["fold0"]["variants"] = {"main": _variant_figures(run, labels0, at_pred["logits"])}
    for variant in [v for v in args.variants.split(",") if v]:
        extra = [f"model.{variant}", "engine.train_folds=[0]"]
        if variant == "upsample=sr":
            extra.append(f"sr_run={sr_run}")
        vrun = work / f"run_{variant.replace('=', '_')}"
        shutil.rmtree(vrun, ignore_errors=True)
        t0 = time.perf_counter()
        train_multitask(
            caches["train"], vrun, folds=args.folds, epochs=args.epochs, overrides=[*base, *extra]
        )
        p = _predict_fold(vrun, caches["train"], 0, val0, teacher=False)
        result["fold0"]["variants"][variant] = {
            **_variant_figures(vrun, labels0, p["logits"]),
            "train_seconds": time.perf_counter() - t0,
        }

    if "test" in caches:
        predictor = Predictor.from_run(run, device="cpu", tta_flip=True)
        torch.set_num_threads(os.cpu_count() or 1)
        ids = predictor.family.dataset(caches["test"], None, predictor.info).study_ids
        predictor.predict_cache(caches["test"], ids[:1], batch_size=1)  # warm-up
        t0 = time.perf_counter()
        pred = predictor.predict_cache(caches["test"], batch_size=1)
        per_study = (time.perf_counter() - t0) / max(1, len(pred.study_ids))
        timings["inference_seconds_per_study"] = per_study
        result["inference"] = {
            "folds_in_ensemble": len(predictor.models),
            "flip_tta": True,
            "seconds_per_study": per_study,
            "device": "cpu",
        }
        scored = heldout_scores(data, pred.study_ids, pred.probs)
        if scored is not None:
            result["test"] = scored
            if predictor.calibration is not None:
                # the same folds without the OOF-fitted calibration, for its effect
                predictor.calibration = None
                raw = predictor.predict_cache(caches["test"], batch_size=1)
                result["test"]["model_uncalibrated"] = heldout_scores(
                    data, raw.study_ids, raw.probs
                )["model"]

    if args.sequence_json is not None and args.sequence_json.exists():
        seq = json.loads(args.sequence_json.read_text())
        result["sequence"] = {k: seq.get(k) for k in ("data", "oof", "test", "settings")}
        if "test" in seq and "test" in result:
            result["test_ratio_multitask_to_sequence"] = ratio(
                result["test"]["model"], seq["test"]["model"]
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lsdc.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(f"written {args.out}; curves {run / 'curves.png'}")
    return result


if __name__ == "__main__":
    main()
