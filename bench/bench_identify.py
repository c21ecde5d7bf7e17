"""How well `lsdc grade` finds the series it needs in a scanner export, with no table: series
identification (`lsdc.grade.identify`) against the truth of a scanner-layout phantom, as
exported and with headers damaged, beside the baseline `lsdc predict` has for a study no table
lists (`io.study.series_type_from_description`: the competition's own type strings), on the same
series in the same run; and what reading the headers costs (`discover`) beside bare pydicom.

Scenarios, each on its own copy of the export (seeded, so every run damages the same series):
- `as exported`: vendor descriptions, protocol names, TE/TR/TI;
- `no description on half`: SeriesDescription and ProtocolName blanked on half the series;
- `no description, no timing on half`: the same, and EchoTime/RepetitionTime/InversionTime
  and ScanningSequence blanked on half the series (drawn independently).
A series counts as right when its identified type (None for the localiser) equals the truth.

    python bench/bench_identify.py [--studies 40] [--size 64] [--seed 5]
        [--out bench/results/bench_identify.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from lsdc.fileio import atomic_write_json
from lsdc.grade.discover import discover
from lsdc.grade.identify import identify_study
from lsdc.io.study import series_type_from_description
from lsdc.synth import generate_dataset

SCENARIOS = {
    "as exported": (0.0, 0.0),
    "no description on half": (0.5, 0.0),
    "no description, no timing on half": (0.5, 0.5),
}
TIMING = ("EchoTime", "RepetitionTime", "InversionTime", "ScanningSequence")


def damage(export: Path, manifest: pd.DataFrame, drop_text: float, drop_time: float, seed: int):
    """Blank the named headers of a seeded share of the series, in place."""
    rng = np.random.default_rng(seed)
    series = sorted(manifest["series_instance_uid"].unique())
    no_text = {s for s in series if rng.random() < drop_text}
    no_time = {s for s in series if rng.random() < drop_time}
    for row in manifest.itertuples(index=False):
        if row.series_instance_uid not in no_text | no_time:
            continue
        path = export / row.path
        ds = pydicom.dcmread(path)
        if row.series_instance_uid in no_text:
            ds.SeriesDescription = ""
            ds.ProtocolName = ""
        if row.series_instance_uid in no_time:
            for k in TIMING:
                if k in ds:
                    delattr(ds, k)
        ds.save_as(path)
    return len(no_text), len(no_time)


def _how(reason: str) -> str:
    if reason.startswith("skipped"):
        return "skipped: " + reason.split(";")[0].removeprefix("skipped: ").split(" (")[0]
    if "elimination" in reason:
        return "by elimination"
    if "only axial acquisition" in reason:
        return "the lone axial stack"
    if "says" in reason and ("SeriesDescription" in reason or "ProtocolName" in reason):
        return "description" + (" and timing" if "agrees" in reason else "")
    return "timing alone"


def score(export: Path, truth: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    found = discover([export])
    seconds = time.perf_counter() - t0
    right = wrong = baseline_right = 0
    how: Counter[str] = Counter()
    errors = []
    for study in found.studies.values():
        ident = identify_study(study)
        for c in ident.choices:
            want = truth[c.series.uid]
            want = None if want == "Localizer" else want
            ok = c.series_type == want
            right += ok
            wrong += not ok
            if not ok:
                errors.append(f"{c.series.first.description!r}: {want} -> {c.reason}")
            base = series_type_from_description(c.series.first.description)
            baseline_right += base == want
            how[_how(c.reason)] += 1
    n = right + wrong
    files = sum(len(s.files) for st in found.studies.values() for s in st.series.values())
    return {
        "series": n,
        "right": right,
        "accuracy": right / n,
        "baseline_accuracy": baseline_right / n,
        "how": dict(how.most_common()),
        "errors": errors[:10],
        "discover_seconds": round(seconds, 3),
        "files": files,
    }


def bare_read_seconds(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p, stop_before_pixels=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_identify.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-identify-") as tmp:
        data = generate_dataset(
            Path(tmp) / "data",
            train_studies=0,
            test_studies=args.studies,
            size=args.size,
            seed=args.seed,
            layout="scanner",
            progress=False,
        )
        manifest = pd.read_csv(data / "truth" / "test_export_manifest.csv")
        truth = dict(zip(manifest["series_instance_uid"], manifest["series_type"], strict=False))
        results = {}
        for name, (drop_text, drop_time) in SCENARIOS.items():
            copy = Path(tmp) / name.replace(" ", "_").replace(",", "")
            shutil.copytree(data / "test_export", copy)
            blanked = damage(copy, manifest, drop_text, drop_time, args.seed)
            res = score(copy, truth)
            res["series_blanked"] = {"description": blanked[0], "timing": blanked[1]}
            results[name] = res
            print(
                f"{name}: {res['right']}/{res['series']} right ({res['accuracy']:.1%}; "
                f"table matcher {res['baseline_accuracy']:.1%}); how: {res['how']}"
            )
        paths = [data / "test_export" / p for p in manifest["path"]]
        bare = min(bare_read_seconds(paths) for _ in range(2))
        found = min(score(data / "test_export", truth)["discover_seconds"] for _ in range(2))
    out = {
        "benchmark": "identify",
        "command": " ".join(sys.argv),
        "phantom": {"studies": args.studies, "size": args.size, "seed": args.seed},
        "scenarios": results,
        "discover_vs_bare_pydicom": {
            "files": len(paths),
            "discover_s": round(found, 3),
            "bare_pydicom_s": round(bare, 3),
            "ratio": round(found / bare, 3),
        },
    }
    print(f"discover {found:.2f} s vs bare pydicom {bare:.2f} s ({found / bare:.2f}x)")
    atomic_write_json(args.out, out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
