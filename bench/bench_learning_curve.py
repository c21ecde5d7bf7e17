"""The learning curve: test score against the number of training studies, one phantom throughout.

One phantom (default: 400 training and 100 test studies at 192 px, seed 18) is written once.
For each point N (default 40, 100, 200, 400) the first N training studies of a fixed
permutation (so the subsets are nested) form a data folder of their own (symlinked images,
filtered tables); `lsdc fit --preset demo` trains every stage on it and `lsdc predict` predicts
the same test studies each time. Each point records, on the same held-out rows:
- each model's and the ensemble's test score, divided by the weighted prior (the best constant)
  and by the class prior, and the share of the prior -> oracle gap closed. The baselines (class
  prior, weighted prior, oracle) are those of the *whole* training set, the same at every
  point, so the curve moves only with the models;
- the OOF scores (the ensemble's cross-fitted) and each model's OOF class prior;
- the multitask keypoint error (median / p90 mm per series type, out of fold);
- the fit's wall time per stage and the predict time.

Each point runs in its own process and writes `WORK/points/N.json`; a rerun skips the points
already written and resumes an interrupted fit (the run folders are kept). The curve is written
after every point: JSON to bench/results/learning_curve.json (or --out), the same as a
Markdown table beside it (.md) and a PNG (score / weighted prior against training studies, log
x, one line per model, the oracle as a floor).

    python bench/bench_learning_curve.py                    # 1-3 hours on 2 cores
    python bench/bench_learning_curve.py --sizes 40 100     # some points
    python bench/bench_learning_curve.py --quick            # smoke: 24+6 studies at 64 px, tiny
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import run_child  # noqa: E402

TRAIN_TABLES = ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv")
# Issue 18's targets: the ensemble's test score / the weighted prior at N training studies.
TARGETS = {40: 0.85, 100: 0.70, 200: 0.55, 400: 0.45}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench/results/learning_curve_work"))
    p.add_argument("--data", type=Path, help="an existing phantom (else WORK/data is written)")
    p.add_argument("--train-studies", type=int, default=400)
    p.add_argument("--test-studies", type=int, default=100)
    p.add_argument("--size", type=int, default=192, help="phantom sagittal matrix, px")
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--sizes", type=int, nargs="+", default=[40, 100, 200, 400])
    p.add_argument("--preset", default="demo")
    p.add_argument("--models", default="multitask,sequence")
    p.add_argument("--fit", nargs="*", default=[], help="lsdc fit overrides (STAGE.key=value)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="24+6 studies at 64 px, tiny preset")
    p.add_argument("--fresh", action="store_true", help="empty WORK first (not the phantom)")
    p.add_argument("--out", type=Path, default=Path("bench/results/learning_curve.json"))
    p.add_argument("--png", type=Path, help="the picture (default: beside --out)")
    p.add_argument(
        "--before", type=Path, help="an earlier curve's JSON, drawn faintly beside this one"
    )
    p.add_argument("--point", type=int, help=argparse.SUPPRESS)  # one point, in a child
    args = p.parse_args(argv)
    if args.quick:
        args.train_studies, args.test_studies, args.size = 24, 6, 64
        args.sizes, args.preset = [12, 24], "tiny"
        if args.work == p.get_default("work"):
            args.work = Path("bench/results/learning_curve_quick")
        if args.out == p.get_default("out"):
            args.out = Path("bench/results/learning_curve_quick.json")
    if max(args.sizes) > args.train_studies:
        p.error(f"--sizes up to {max(args.sizes)} need --train-studies >= that")
    return args


# --------------------------------------------------------------------------- data


def train_order(data: Path, seed: int) -> list[int]:
    """Every training study of `data` in one fixed random order: the first N are point N."""
    import numpy as np

    from lsdc.io.tables import read_train_labels

    ids = sorted(int(s) for s in read_train_labels(data / "train.csv")["study_id"])
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


def subset_folder(data: Path, out: Path, study_ids: list[int]) -> Path:
    """A data folder holding only `study_ids` for training (images symlinked, train tables
    filtered) and the whole test split of `data`; rebuilt when its study list differs."""
    import pandas as pd

    stamp = out / "subset.json"
    wanted = sorted(study_ids)
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "train_images").mkdir(parents=True)
    keep = set(wanted)
    for name in TRAIN_TABLES:
        frame = pd.read_csv(data / name, dtype=str, keep_default_na=False)
        frame[frame["study_id"].astype(int).isin(keep)].to_csv(out / name, index=False)
    for sid in wanted:
        (out / "train_images" / str(sid)).symlink_to((data / "train_images" / str(sid)).resolve())
    for entry in data.iterdir():
        if entry.name not in (*TRAIN_TABLES, "train_images") and not (out / entry.name).exists():
            (out / entry.name).symlink_to(entry.resolve())
    stamp.write_text(json.dumps(wanted))
    return out


# --------------------------------------------------------------------------- one point


def run_point(args: argparse.Namespace, data: Path, n: int) -> dict:
    """Fit and predict at N training studies; every figure of the point."""
    import numpy as np

    from lsdc.demo import model_predictions
    from lsdc.evaluation import WEIGHTED, score_table
    from lsdc.pipeline import fit, predict

    base = args.work / f"n{n}"
    sub_data = subset_folder(data, base / "data", train_order(data, args.seed)[:n])
    models = [m for m in args.models.split(",") if m]
    t0 = time.perf_counter()
    fitted = fit(
        sub_data,
        base / "runs",
        preset=args.preset,
        models=models,
        overrides=args.fit,
        workers=args.workers,
    )
    fit_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub = predict(
        sub_data,
        base / "runs",
        base / "submission.csv",
        work_dir=base / "work",
        workers=args.workers,
    )
    predict_wall = time.perf_counter() - t0
    predictions = {"ensemble": (sub.study_ids, sub.probs)}
    predictions.update(model_predictions(base / "runs", sub))
    # The whole phantom's train.csv: the same baselines (and oracle fit) at every point.
    table = score_table(data, predictions)
    rows = table["rows"]
    weighted = rows[WEIGHTED]["score"]
    for row in rows.values():
        row["ratio_to_weighted_prior"] = row["score"] / weighted
    rows[OWN_PRIOR] = own_prior_row(data, sub_data, table)
    summaries = {}
    for m in models:
        path = base / "runs" / m / "summary.json"
        if path.exists():
            summaries[m] = json.loads(path.read_text())
    return {
        "train_studies": n,
        "test": table,
        "oof": fitted.oof,
        "oof_class_prior": {m: s.get("prior_score") for m, s in summaries.items()},
        "ensemble_oof": fitted.ensemble,
        "keypoint_error_mm": summaries.get("multitask", {}).get("keypoint_error_mm"),
        "fit_seconds": fitted.seconds,
        "fit_wall_seconds": round(fit_wall, 1),
        "predict_wall_seconds": round(predict_wall, 1),
        "test_studies_predicted": int(np.asarray(sub.study_ids).size),
    }


# --------------------------------------------------------------------------- curve

OWN_PRIOR = "weighted prior of the N studies"


def own_prior_row(data: Path, sub_data: Path, table: dict) -> dict:
    """The weighted prior of the point's own training studies (the best constant a model
    trained on them could know) on the truth rows `table` scored, in its rows' layout."""
    import numpy as np

    from lsdc.evaluation import WEIGHTED
    from lsdc.io.tables import read_train_labels
    from lsdc.metrics import labels_array, score_arrays
    from lsdc.training.engine import weighted_class_prior

    tids, tlabels = labels_array(read_train_labels(data / "truth" / "test_labels.csv"))
    _, own = labels_array(read_train_labels(sub_data / "train.csv"))
    if table["studies"] != len(tids):  # the same rows as the models, or none
        raise ValueError(f"{sub_data}: {table['studies']} of {len(tids)} test studies scored")
    terms = score_arrays(tlabels, np.repeat(weighted_class_prior(own)[None], len(tids), axis=0))
    weighted = table["rows"][WEIGHTED]["score"]
    return {
        "kind": "baseline",
        **{k: float(v) for k, v in terms.items()},
        "ratio_to_weighted_prior": terms["score"] / weighted,
    }


def curve_rows(points: list[dict]) -> list[dict]:
    """One flat row per point: every model's and baseline's score and ratios."""
    out = []
    for p in points:
        rows = p["test"]["rows"]
        row = {"train_studies": p["train_studies"]}
        for name, r in rows.items():
            row[name] = {
                "score": r["score"],
                "x_weighted_prior": r["ratio_to_weighted_prior"],
                "x_class_prior": r["score"] / rows["class prior"]["score"],
                "gap_closed": r.get("gap_closed"),
            }
        row["keypoint_error_mm"] = p.get("keypoint_error_mm")
        row["fit_wall_seconds"] = p["fit_wall_seconds"]
        out.append(row)
    return out


def curve_markdown(points: list[dict]) -> str:
    """The curve as a Markdown table: test score / weighted prior of every model, the constants
    and the oracle; the OOF; keypoint error; fit time."""
    from lsdc.evaluation import BASELINES

    names = [n for n in points[-1]["test"]["rows"] if n not in (*BASELINES, OWN_PRIOR)]
    head = ["training studies", *(f"{n} (x wp)" for n in names), "weighted prior of the N",
            "class prior", "oracle", "ensemble: x class prior, gap closed",
            "OOF ensemble (cross-fitted) / multitask / sequence",
            "keypoint error median / p90 mm: axial, Sag T1, Sag T2", "fit wall"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in sorted(points, key=lambda p: p["train_studies"]):
        rows = p["test"]["rows"]

        def x(name: str, rows: dict = rows) -> str:
            return f"{rows[name]['ratio_to_weighted_prior']:.3f}" if name in rows else "n/a"

        ens = rows.get("ensemble", {})
        gap = ens.get("gap_closed")
        oof = p.get("oof", {})
        oof_ens = (p.get("ensemble_oof") or {}).get("ensemble", {}).get("score")
        kp = p.get("keypoint_error_mm") or {}
        kps = ", ".join(
            f"{kp[t]['median']:.1f} / {kp[t]['p90']:.1f}"
            for t in ("Axial T2", "Sagittal T1", "Sagittal T2/STIR")
            if t in kp
        )
        cells = [
            str(p["train_studies"]),
            *(f"**{x(n)}**" if n == "ensemble" else x(n) for n in names),
            x(OWN_PRIOR),
            x("class prior"),
            x("oracle"),
            f"{ens['score'] / rows['class prior']['score']:.3f}, "
            + ("n/a" if gap is None else f"{gap:.0%}")
            if ens
            else "n/a",
            " / ".join(
                "n/a" if v is None else f"{v:.3f}"
                for v in (
                    oof_ens,
                    oof.get("multitask", {}).get("score"),
                    oof.get("sequence", {}).get("score"),
                )
            ),
            kps or "n/a",
            f"{p['fit_wall_seconds'] / 60:.0f} min",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(points: list[dict], png: Path, before: list[dict] | None = None) -> Path:
    """Score / weighted prior against training studies (log x): a line per model, the
    weighted prior at 1 and the oracle as the floor; `before` (an earlier curve's points)
    drawn faintly in the same colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsdc.evaluation import BASELINES, ORACLE, PRIOR

    points = sorted(points, key=lambda p: p["train_studies"])
    xs = [p["train_studies"] for p in points]
    ticks = set(xs)
    names = [n for n in points[-1]["test"]["rows"] if n not in (*BASELINES, OWN_PRIOR)]
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=120)
    for name in names:
        ys = [p["test"]["rows"][name]["ratio_to_weighted_prior"] for p in points]
        style = {"lw": 2.5} if name == "ensemble" else {"lw": 1.5, "ls": "--"}
        line = ax.plot(xs, ys, marker="o", label=name, **style)[0]
        old = sorted(
            (p for p in before or () if name in p["test"]["rows"]),
            key=lambda p: p["train_studies"],
        )
        if old:
            ax.plot(
                [p["train_studies"] for p in old],
                [p["test"]["rows"][name]["ratio_to_weighted_prior"] for p in old],
                marker="x", color=line.get_color(), alpha=0.35, lw=1, label=f"{name}, before",
            )  # fmt: skip
            ticks |= {p["train_studies"] for p in old}
    for name, style in ((PRIOR, ":"), (OWN_PRIOR, "--"), (ORACLE, "-.")):
        if all(name in p["test"]["rows"] for p in points):
            ys = [p["test"]["rows"][name]["ratio_to_weighted_prior"] for p in points]
            ax.plot(xs, ys, color="grey", ls=style, lw=1, label=name)
    ax.axhline(
        1.0, color="black", lw=0.8, label="weighted prior of the whole training set (best constant)"
    )
    shown = sorted(n for n in TARGETS if n in ticks)
    if shown:
        ax.scatter(
            shown, [TARGETS[n] for n in shown], marker="_", s=300, lw=2, color="tab:red",
            zorder=3, label="target (issue 18)",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [str(x) for x in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("training studies (2 folds)")
    ax.set_ylabel("test score / weighted prior (lower is better)")
    n_test = points[-1]["test"]["studies"]
    ax.set_title(f"Learning curve on {n_test} held-out phantom studies", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def write_curve(args: argparse.Namespace, data: Path, points: list[dict]) -> dict:
    points = sorted(points, key=lambda p: p["train_studies"])
    png = args.png or args.out.with_suffix(".png")
    before = json.loads(args.before.read_text())["points"] if args.before else None
    result = {
        "benchmark": "bench_learning_curve",
        "command": "python bench/bench_learning_curve.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "phantom": json.loads((data / "truth" / "synth.json").read_text()),
        "preset": args.preset,
        "fit_overrides": args.fit,
        "before": str(args.before) if args.before else None,
        "models": args.models,
        "baselines_from": "the whole phantom's training set, the same at every point",
        "curve": curve_rows(points),
        "points": points,
        "png": str(plot_curve(points, png, before)) if points else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True))
    args.out.with_suffix(".md").write_text(curve_markdown(points))
    return result


def ensure_phantom(args: argparse.Namespace) -> Path:
    if args.data is not None:
        return args.data
    data = args.work / "data"
    wanted = {
        "train_studies": args.train_studies,
        "test_studies": args.test_studies,
        "size": args.size,
        "seed": args.seed,
    }
    stamp = data / "truth" / "synth.json"
    if stamp.exists() and all(json.loads(stamp.read_text()).get(k) == v for k, v in wanted.items()):
        return data
    from lsdc.synth import generate_dataset

    shutil.rmtree(data, ignore_errors=True)
    print(f"[curve] phantom: {wanted}", flush=True)
    generate_dataset(data, workers=args.workers, **wanted)
    return data


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.point is not None:
        data = ensure_phantom(args)
        point = run_point(args, data, args.point)
        path = args.work / "points" / f"{args.point}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(point, indent=2, sort_keys=True))
        return None
    if args.fresh:
        for child in args.work.glob("*"):
            if child.name != "data":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    args.work.mkdir(parents=True, exist_ok=True)
    data = ensure_phantom(args)
    points = []
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--fresh"]
    for n in sorted(args.sizes):
        path = args.work / "points" / f"{n}.json"
        if not path.exists():
            print(f"[curve] {n} training studies", flush=True)
            child = run_child(
                [sys.executable, __file__, *forwarded, "--data", str(data), "--point", str(n)],
                log=args.work / f"n{n}.log",
            )
            if child.status != 0 or not path.exists():
                print(f"[curve] point {n} failed (exit {child.status}); see {args.work}/n{n}.log")
                break
            point = json.loads(path.read_text())
            point["peak_rss_mb"] = child.peak_rss_mb
            path.write_text(json.dumps(point, indent=2, sort_keys=True))
        point = json.loads(path.read_text())
        if OWN_PRIOR not in point["test"]["rows"]:  # a point written before this baseline
            point["test"]["rows"][OWN_PRIOR] = own_prior_row(
                data, args.work / f"n{n}" / "data", point["test"]
            )
        points.append(point)
        result = write_curve(args, data, points)
        for row in result["curve"]:
            if row["train_studies"] == n:
                print(
                    f"[curve] {n}: ensemble {row['ensemble']['score']:.4f} = "
                    f"{row['ensemble']['x_weighted_prior']:.2f}x the weighted prior",
                    flush=True,
                )
    print(f"wrote {args.out}")
    return result if points else None


if __name__ == "__main__":
    main()
