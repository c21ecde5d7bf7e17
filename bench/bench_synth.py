"""Phantom generator speed: studies per minute at 128 and 256 px (issue 3).

For each size, in the same run:
- synth:    `generate_dataset` of N studies (render + DICOM + tables), single process and with
            2 workers;
- baseline: writing the same number of DICOM files of the same matrices (the same series shapes
            as the phantom produced) filled with Rician noise, with `write_slice`, single process.
ratio = synth time / baseline time (how much the analytic rendering costs over plain writing).

    python bench/bench_synth.py [--studies 4] [--sizes 128 256]
        [--out bench/results/bench_synth.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lsdc.fileio import atomic_write_json
from lsdc.io.dicomwrite import write_slice
from lsdc.synth import generate_dataset

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_synth.json"


def _synth(out: Path, n: int, size: int, workers: int) -> float:
    t0 = time.perf_counter()
    generate_dataset(
        out, train_studies=n, test_studies=0, size=size, seed=123, workers=workers, progress=False
    )
    return time.perf_counter() - t0


def _shapes(root: Path) -> list[tuple[int, int, int]]:
    """(slices, rows, cols) of every series the phantom wrote."""
    shapes = []
    for rec in map(json.loads, (root / "truth" / "studies.jsonl").read_text().splitlines()):
        for s in rec["series"]:
            shapes.append((s["num_slices"], s["rows"], s["cols"]))
    return shapes


def _baseline(out: Path, shapes: list[tuple[int, int, int]]) -> float:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for k, (n, rows, cols) in enumerate(shapes):
        for i in range(n):
            a, b = rng.normal(0.3, 0.03, (2, rows, cols))
            px = np.clip(np.sqrt(a * a + b * b) * 1000, 0, 65535).astype(np.uint16)
            write_slice(
                out / str(k) / f"{i + 1}.dcm",
                px,
                study_id=1,
                series_id=k + 1,
                instance_number=i + 1,
                position=(0.0, 0.0, 4.0 * i),
                orientation=(1, 0, 0, 0, 1, 0),
                pixel_spacing=(1.0, 1.0),
                slice_thickness=4.0,
            )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for size in args.sizes:
            t1 = _synth(tmp_path / f"s{size}w1", args.studies, size, 1)
            t2 = _synth(tmp_path / f"s{size}w2", args.studies, size, 2)
            shapes = _shapes(tmp_path / f"s{size}w1")
            tb = _baseline(tmp_path / f"b{size}", shapes)
            files = sum(n for n, _, _ in shapes)
            row = {
                "size": size,
                "studies": args.studies,
                "files": files,
                "synth_s_1_worker": round(t1, 3),
                "synth_s_2_workers": round(t2, 3),
                "studies_per_min_1_worker": round(60 * args.studies / t1, 2),
                "studies_per_min_2_workers": round(60 * args.studies / t2, 2),
                "baseline_write_noise_s": round(tb, 3),
                "ratio_synth_vs_write_only": round(t1 / tb, 2),
            }
            print(json.dumps(row))
            results.append(row)
    atomic_write_json(
        args.out,
        {
            "benchmark": "bench_synth",
            # Load average at the end: other jobs on a shared machine slow every timing.
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            },
            "results": results,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
