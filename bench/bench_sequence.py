"""Benchmark of the sequence pipeline on a phantom split.

Measures, in one run and on the same rows:
- out-of-fold score (the four terms and their mean) of the sequence model, and of the class
  prior (per-target class frequencies of each fold's training studies) as the baseline; ratio;
- the same on the held-out phantom test split (truth/test_labels.csv), prior from all training
  studies, when the phantom has its truth folder;
- wall time per training epoch (train + validation), preprocessing time per study, and
  inference time per study (fold ensemble, batch 1, on CPU unless --infer-device says otherwise).

    python bench/bench_sequence.py                       # small CPU default (~10-15 min, 2 cores)
    python bench/bench_sequence.py --data PHANTOM_DIR    # an existing RSNA-format phantom
    python bench/bench_sequence.py --train-studies 240 --size 128 model.backbone=resnet18

Writes JSON to bench/results/bench_sequence.json (or --out).
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

from common import heldout_scores, oracle_probs, ratio  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="existing phantom / RSNA-format dataset")
    p.add_argument("--work", type=Path, default=Path("bench/results/sequence_work"))
    p.add_argument("--train-studies", type=int, default=48)
    p.add_argument("--test-studies", type=int, default=8)
    p.add_argument("--phantom-size", type=int, default=96, help="phantom sagittal matrix, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="crop size of the cache, px")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--infer-device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_sequence.json"))
    p.add_argument(
        "overrides",
        nargs="*",
        help="training overrides (default model.backbone=resnet10t engine.batch_size=8)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from lsdc.inference.predictor import Predictor
    from lsdc.metrics import score_arrays
    from lsdc.preprocess.sequence import preprocess_dataset
    from lsdc.training.sequence import train_sequence

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    data = args.data
    if data is None:
        from lsdc.synth import generate_dataset

        data = (
            work
            / f"phantom_{args.train_studies}_{args.test_studies}_{args.phantom_size}_{args.seed}"
        )
        if not (data / "train.csv").exists():
            t0 = time.perf_counter()
            generate_dataset(
                data,
                train_studies=args.train_studies,
                test_studies=args.test_studies,
                size=args.phantom_size,
                seed=args.seed,
                workers=args.workers,
            )
            timings["phantom_seconds"] = time.perf_counter() - t0

    caches = {}
    for split in ("train", "test"):
        if not (data / f"{split}_series_descriptions.csv").exists():
            continue
        cache = work / f"cache_{data.name}_{split}_{args.size}"
        t0 = time.perf_counter()
        report = preprocess_dataset(
            data, cache, split=split, workers=args.workers, overrides=[f"size={args.size}"]
        )
        n = len(report.written)
        if n:
            timings[f"preprocess_{split}_seconds_per_study"] = (time.perf_counter() - t0) / n
        if report.failed:
            print(f"{split}: {len(report.failed)} studies failed: {report.failed}", file=sys.stderr)
        caches[split] = cache

    overrides = args.overrides or ["model.backbone=resnet10t", "engine.batch_size=8"]
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: timings must not include a resume
    t0 = time.perf_counter()
    cv = train_sequence(
        caches["train"], run, folds=args.folds, epochs=args.epochs, overrides=overrides
    )
    timings["train_seconds"] = time.perf_counter() - t0
    timings["epoch_seconds"] = cv.epoch_seconds

    result: dict = {
        "benchmark": "bench_sequence",
        "data": str(data),
        "studies_oof": len(cv.study_ids),
        "oof": {"model": cv.score, "class_prior": cv.prior_score},
        "oof_oracle": score_arrays(cv.labels, oracle_probs(data, cv.study_ids.tolist()))
        if (data / "truth" / "studies.jsonl").exists()
        else None,
        "oof_ratio_model_to_prior": ratio(cv.score, cv.prior_score),
        "timings": timings,
        "settings": {
            "epochs": args.epochs,
            "folds": args.folds,
            "size": args.size,
            "phantom_size": args.phantom_size,
            "train_studies": args.train_studies,
            "test_studies": args.test_studies,
            "overrides": overrides,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "train_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "infer_device": args.infer_device,
        },
    }

    if "test" in caches:
        predictor = Predictor.from_run(run, device=args.infer_device)
        ids = predictor.family.dataset(caches["test"], None, predictor.info).study_ids
        if args.infer_device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        predictor.predict_cache(caches["test"], ids[:1], batch_size=1)  # warm-up
        t0 = time.perf_counter()
        pred = predictor.predict_cache(caches["test"], batch_size=1)
        per_study = (time.perf_counter() - t0) / max(1, len(pred.study_ids))
        timings["inference_seconds_per_study"] = per_study
        result["inference"] = {
            "folds_in_ensemble": len(predictor.models),
            "seconds_per_study": per_study,
            "device": args.infer_device,
        }
        scored = heldout_scores(data, pred.study_ids, pred.probs)
        if scored is not None:
            result["test"] = scored

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lsdc.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(f"written {args.out}; curves {run / 'curves.png'}")
    return result


if __name__ == "__main__":
    main()
