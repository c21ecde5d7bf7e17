"""Benchmark of the whole product on a phantom: `lsdc fit` then `lsdc predict` (the demo's path).

Measures, in one run and on the same held-out rows: the test score of each model and of the
ensemble beside the class prior, uniform and the oracle (ratio to the prior, share of the
prior->oracle gap closed); out-of-fold scores (the ensemble's cross-fitted); keypoint error;
each fit stage's seconds; CPU inference seconds per study per model (preprocessing apart) and
for the whole `predict`.

    python bench/bench_pipeline.py                 # the demo: 80+20 studies at 128 px
    python bench/bench_pipeline.py --quick         # 16+4 studies at 64 px, tiny models
    python bench/bench_pipeline.py --train-studies 200 --size 192 --fit multitask.engine.epochs=16

Writes JSON to bench/results/bench_pipeline.json (or --out); the HTML report of the run is in
--work/report/index.html.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--work", type=Path, default=Path("bench/results/pipeline_work"), help="emptied first"
    )
    p.add_argument("--quick", action="store_true", help="tiny phantom and models (minutes)")
    p.add_argument("--train-studies", type=int, default=None)
    p.add_argument("--test-studies", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="phantom sagittal matrix, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--preset", default="demo")
    p.add_argument("--fit", nargs="*", default=[], help="lsdc fit overrides (STAGE.key=value)")
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_pipeline.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from lsdc.demo import DemoConfig, run_demo

    cfg = DemoConfig(workers=args.workers, seed=args.seed, preset=args.preset)
    if args.quick:
        cfg.train_studies, cfg.test_studies, cfg.size, cfg.preset = 16, 4, 64, "tiny"
    for name in ("train_studies", "test_studies", "size"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.fit += args.fit
    # A fresh run: the demo resumes finished stages (whose times would then be near zero), and
    # a folder left by other settings (--quick, say) would be refused.
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    report = run_demo(args.work, cfg)
    wall = time.perf_counter() - t0
    fig, secs = report.figures, report.seconds
    studies = fig["test"]["studies"]
    infer = {
        k.split(": ")[1].replace(" inference", ""): v / max(studies, 1)
        for k, v in secs.items()
        if k.endswith(" inference")
    }
    predict_total = sum(v for k, v in secs.items() if k.startswith("predict: "))
    result = {
        "command": "python bench/bench_pipeline.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "config": {
            k: getattr(cfg, k)
            for k in ("train_studies", "test_studies", "size", "seed", "preset", "fit")
        },
        "test": fig["test"],
        "oof": fig["oof"],
        "ensemble_oof": fig["ensemble_oof"],
        "keypoint_error_mm": fig.get("keypoint_error_mm"),
        "seconds": secs,
        "wall_seconds": round(wall, 1),
        "inference_seconds_per_study": {
            **infer,
            "ensemble (predict, all stages)": predict_total / max(studies, 1),
        },
        "report": str(Path(args.work) / "report" / "index.html"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True))
    rows = fig["test"]["rows"]
    prior = rows["class prior"]["score"]
    for name, row in rows.items():
        print(f"{name:12s} test {row['score']:.4f}  ({row['score'] / prior:.2f}x prior)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
