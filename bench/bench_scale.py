"""Per-study cost of every stage at real image size, and what it predicts for the real dataset.

On a phantom at 512 px (the real sagittal matrices run 384-640), each stage runs in its own
process, as `lsdc fit --preset gpu` would run it (the preset's models and input sizes; 2 folds
and 1 epoch instead of 5 and 30), and is timed with its peak resident memory (wait4):

  index             `lsdc index` of the train split                    s / study
  features          slice-relevance features of the train studies      s / study
  relevance fit     `lsdc train slice-relevance` on those features     s (whole fit)
  multitask cache   relevance inference + crops, 1 worker, then 2      s / study, 1->2 speed-up
  sequence cache    stacks, 1 worker, then 2                           s / study, 1->2 speed-up
  sr                `lsdc train sr`                                    s / step
  multitask, seq.   `lsdc train ...`, 1 epoch on CPU                   s / study-epoch
  item cost, FLOPs  a dataset item (read + augment) per family; one    s / study, FLOP / study
                    fold's forward FLOPs, counted by torch
  predict           `lsdc predict DATA --runs` on the test studies     s / study (prep., inference)

From these it extrapolates the wall time of `lsdc fit --preset gpu` and `lsdc predict` on
--target-studies studies on a machine with --target-cores cores and one GPU, and prints the
model: CPU stages scale by the 2-worker parallel efficiency measured here (and by the ideal
one); GPU stages by the counted FLOPs at an ASSUMED GPU throughput (no GPU was measured),
shown for three values, bounded below by the data loader's CPU time.

    python bench/bench_scale.py                # 6+2 studies at 512 px (~15 min on 2 free cores)
    python bench/bench_scale.py --quick        # 6+1 studies at 96 px, tiny preset (~2 min)
    python bench/bench_scale.py --train-studies 8 --axial-slices 96 --axial-series 2

Writes JSON to bench/results/bench_scale.json (or --out); its data and runs stay in --work.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import run_child  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LSDC = [sys.executable, "-m", "lsdc.cli"]
# Validation of a study is a forward pass, a training step forward and backward: about a third
# of the cost. Used to split the measured epoch (half the studies validated at 2 folds) into
# training and validation at the real split (4/5 trained, 1/5 validated at 5 folds).
VAL_COST = 1 / 3
# ASSUMED sustained throughput of one data-centre GPU on these small convnets, TFLOP/s: an A100
# peaks at 312 (bf16 dense), an H100 near 1,000; resnet18/34 at 128-256 px with batch 16 use a
# small share of that. Nothing here was measured on a GPU.
GPU_TFLOPS = (10.0, 30.0, 100.0)
TRAIN_FLOPS = 3.0  # a training step ~ forward + backward ~ 3 forward passes
# A GPU-side epoch can be no faster than its CPU work: reading and augmenting every item, spread
# over the loader workers. SR is small (seconds on a GPU); its CPU time is divided by this.
SR_SPEEDUP = 100.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="6+1 studies at 96 px, tiny preset")
    p.add_argument("--train-studies", type=int, default=6)
    p.add_argument("--test-studies", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="phantom sagittal matrix, px")
    p.add_argument("--axial-slices", type=int, default=0, help="lsdc synth --axial-slices")
    p.add_argument("--axial-series", type=int, default=0, help="lsdc synth --axial-series")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        type=Path,
        help="an existing phantom (coordinates on every train study) "
        "instead of a new one; the synth options are then ignored",
    )
    p.add_argument("--preset", default="gpu", help="whose models and input sizes are timed")
    p.add_argument("--sr-steps", type=int, default=10)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="STAGE.key=value",
        help="more lsdc fit overrides, e.g. multitask.engine.batch_size=2 (a batch that does "
        "not grow with the studies, when comparing memory at two dataset sizes)",
    )
    p.add_argument("--target-studies", type=int, default=2000)
    p.add_argument("--target-cores", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("bench/results/scale_work"))
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_scale.json"))
    # Internal: one library call in this process, timed by the parent.
    p.add_argument("--child", choices=["features", "costs", "predict"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- child stages


def _child(args: argparse.Namespace) -> None:
    """The stages no single CLI command isolates: the relevance features alone, a training
    item's CPU cost, and predict's own per-stage seconds."""
    from lsdc.config import load_config
    from lsdc.pipeline import PLAN_FILE, Plan, predict
    from lsdc.preprocess.slice_relevance import SliceRelevanceConfig
    from lsdc.preprocess.slice_relevance.features import compute_features

    data = args.data or args.work / "data"
    runs, work = args.work / "runs", args.work / "cache"
    plan = Plan.from_dict(json.loads((runs / PLAN_FILE).read_text()))
    out: dict = {}
    if args.child == "features":
        from lsdc.io.tables import read_coordinates

        cfg = load_config(SliceRelevanceConfig, None, plan.overrides["relevance"])
        ids = sorted(read_coordinates(data / "train_label_coordinates.csv")["study_id"].unique())
        rep = compute_features(
            data, runs / "slice-relevance" / "features", ids, cfg.features, progress=False
        )
        out = {"studies": len(rep.written), "failed": len(rep.failed)}
    elif args.child == "costs":
        out = _model_costs(plan, work, runs)
    else:
        rep = predict(
            data, runs, args.work / "submission.csv", work_dir=work / "predict", progress=False
        )
        out = {"studies": rep.studies, "seconds": rep.seconds}
    args.child_out.write_text(json.dumps(out))


def _model_costs(plan, work: Path, runs: Path) -> dict[str, dict[str, float]]:
    """Per study and family: seconds to build one dataset item with the plan's training
    augmentation and without (the CPU work a GPU epoch cannot hide below), and the forward
    FLOPs of one fold's model (counted by torch, not timed: the GPU estimate rests on it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lsdc.config import load_config
    from lsdc.data.multitask import MultitaskDataset
    from lsdc.data.sequence import SequenceDataset
    from lsdc.inference.predictor import Predictor
    from lsdc.training.multitask import MultitaskTrainConfig
    from lsdc.training.sequence import SequenceTrainConfig

    mt = load_config(MultitaskTrainConfig, None, plan.overrides["multitask"])
    sq = load_config(SequenceTrainConfig, None, plan.overrides["sequence"])
    makers = {
        "multitask": lambda train: MultitaskDataset(
            work / "multitask-train", config=mt.data, train=train
        ),
        "sequence": lambda train: SequenceDataset(
            work / "sequence-train", augment=sq.augment if train else None
        ),
    }
    out = {}
    for name, make in makers.items():
        out[name] = {}
        for mode, train in (("train", True), ("eval", False)):
            ds = make(train)
            ds[0]  # first-call costs (lazy imports, allocator) are not per study
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            out[name][mode] = (time.perf_counter() - t0) / max(len(ds), 1)
        pred = Predictor.from_run(runs / name, folds=[0], device="cpu", calibrate=False)
        batch = pred.family.collate([make(False)[0]])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pred.predict_outputs(batch)
        out[name]["forward_flops"] = float(counter.get_total_flops())
    return out


# --------------------------------------------------------------------------- the run


class Stages:
    """Runs stages as child processes; records seconds, peak RSS and the per-unit count."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.rows: dict[str, dict] = {}
        self.log = work / "stages.log"

    def run(self, name: str, command: list[str], units: int, unit: str, **env: str) -> dict:
        print(f"[scale] {name} ...", flush=True)
        child = run_child(command, env=env, log=self.log)
        if child.status != 0:
            raise SystemExit(f"[scale] {name} failed (exit {child.status}); see {self.log}")
        row = {
            "seconds": child.seconds,
            "peak_rss_mb": child.peak_rss_mb,
            "units": units,
            "unit": unit,
            "per_unit_s": child.seconds / max(units, 1),
            "command": " ".join(command[2:] if command[:2] == LSDC[:2] else command),
        }
        self.rows[name] = row
        print(
            f"[scale] {name}: {child.seconds:.1f} s, {row['per_unit_s']:.2f} s/{unit}, "
            f"peak {child.peak_rss_mb:.0f} MB",
            flush=True,
        )
        return row

    def child(
        self, args: argparse.Namespace, name: str, what: str, units: int, unit: str, **env: str
    ):
        out = self.work / f"{what}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what]
        cmd += ["--work", str(self.work), "--child-out", str(out)]
        cmd += ["--data", str(args.data)] if args.data else []
        row = self.run(name, cmd, units, unit, **env)
        return row, json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        _child(args)
        return {}
    from lsdc.pipeline import PLAN_FILE, RUN_DIRS, make_plan, sequence_cache_overrides

    if args.quick:
        args.train_studies, args.test_studies, args.size, args.preset = 6, 1, 96, "tiny"
        args.sr_steps = 5
    n, n_test = args.train_studies, args.test_studies
    work = args.work.resolve()
    if work.exists() and any(work.iterdir()) and not (work / "stages.log").exists():
        raise SystemExit(f"{work}: not empty and not a bench_scale folder; choose another --work")
    shutil.rmtree(work, ignore_errors=True)  # a previous run's: every stage starts afresh
    work.mkdir(parents=True)
    data = args.data.resolve() if args.data else work / "data"
    runs, cache = work / "runs", work / "cache"
    small = [
        "relevance.folds=2",
        *(f"{m}.engine.{k}" for m in ("multitask", "sequence") for k in ("folds=2", "epochs=1")),
        # Loader workers would each hold a copy of the process: one process measures one study.
        "multitask.engine.num_workers=0",
        "sequence.engine.num_workers=0",
        f"sr.steps={args.sr_steps}",
        "sr.device=cpu",
    ]
    if args.quick:  # the relevance models' sizes, not their number: the stage still runs
        small += [
            f"relevance.models.{k}"
            for k in ("rf_trees=20", "xgb_trees=20", "svm_components=50", "mlp_max_iter=30")
        ]
    small += args.set
    plan = make_plan(args.preset, overrides=small)
    runs.mkdir(parents=True)
    (runs / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    st = Stages(work)
    one = {"OMP_NUM_THREADS": "1"}  # preprocessing workers are single-threaded processes
    t_all, load0 = time.perf_counter(), os.getloadavg()

    if args.data:
        n, n_test = (len(_listed(data, split)) for split in ("train", "test"))
        made = data / "truth" / "synth.json"  # what the phantom was made with, for the record
        if made.exists():
            meta = json.loads(made.read_text())
            args.size = meta["size"]
            args.axial_slices = meta.get("axial_slices", 0)
            args.axial_series = meta.get("axial_series", 0)
    else:
        synth = [*LSDC, "synth", str(data), "--train-studies", str(n)]
        synth += ["--test-studies", str(n_test), "--size", str(args.size), "--seed", str(args.seed)]
        synth += ["--coords-fraction", "1.0", "--axial-slices", str(args.axial_slices)]
        synth += ["--axial-series", str(args.axial_series), "--workers", "2"]
        st.run("synth (2 workers, not a product stage)", synth, n + n_test, "study")
    files = sum(1 for _ in (data / "train_images").rglob("*.dcm"))
    st.run(
        "index",
        [*LSDC, "index", str(data), "--out", str(work / "index.csv"), "--workers", "1"],
        n,
        "study",
        **one,
    )
    st.child(args, "relevance features", "features", n, "study")
    rel = runs / RUN_DIRS["relevance"]
    st.run(
        "relevance fit",
        [*LSDC, "train", "slice-relevance", str(data), "--out", str(rel)]
        + plan.overrides["relevance"],
        n,
        "study",
    )
    seq_over = sequence_cache_overrides(plan, runs)
    for workers in (1, 2):
        suffix = "" if workers == 1 else "-2w"
        for model, extra in (
            ("multitask", ["--relevance-run", str(rel), *plan.overrides["multitask_cache"]]),
            ("sequence", seq_over),
        ):
            st.run(
                f"{model} cache ({workers} worker{'s' if workers > 1 else ''})",
                [*LSDC, "preprocess", str(data), "--pipeline", model, "--cache",
                 str(cache / f"{model}-train{suffix}"), "--workers", str(workers), *extra],
                n,
                "study",
                **one,
            )  # fmt: skip
    st.run(
        "sr",
        [*LSDC, "train", "sr", str(cache / "multitask-train"), "--out", str(runs / "sr")]
        + plan.overrides["sr"],
        args.sr_steps,
        "step",
    )
    for model in plan.models:
        extra = ["sr_run=../sr"] if model == "multitask" and "sr" in _stages(plan) else []
        st.run(
            f"{model} train (1 epoch, 2 folds)",
            [*LSDC, "train", model, str(cache / f"{model}-train"), "--out", str(runs / model)]
            + plan.overrides[model]
            + extra,
            n,
            "study-epoch",
        )
    # One thread, as in a DataLoader worker (torch sets it there); with two on a loaded 2-core
    # machine a 50-microsecond tensor op took 10-20 ms.
    _, costs = st.child(args, "item cost + FLOPs (both families)", "costs", n, "study", **one)
    st.run(
        "ensemble",
        [*LSDC, "ensemble", "fit", *(f"--runs={runs / m}" for m in plan.models),
         "--out", str(runs / "ensemble.json"), "--folds", "2"],
        n,
        "study",
    )  # fmt: skip
    _, pred = st.child(args, "predict", "predict", n_test, "study")

    epochs = {m: _epoch_seconds(runs / m) for m in plan.models}
    result = {
        "command": "python bench/bench_scale.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {
            "train_studies": n,
            "test_studies": n_test,
            "size": args.size,
            "axial_slices": args.axial_slices,
            "axial_series": args.axial_series,
            "preset": args.preset,
            "plan_overrides": small,
            "train_dicom_files": files,
        },  # fmt: skip
        "stages": st.rows,
        "epoch_seconds": epochs,
        "model_costs": costs,
        "load_average": {"start": load0, "end": os.getloadavg()},
        "predict_seconds": pred["seconds"],
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }
    result["extrapolation"] = extrapolate(result, plan, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"wrote {args.out}")
    return result


def _stages(plan) -> list[str]:
    from lsdc.pipeline import stages_of

    return stages_of(plan)


def _listed(data: Path, split: str) -> set[int]:
    """Studies of a split, as its series-descriptions table lists them."""
    from lsdc.io.tables import read_series_descriptions

    return set(read_series_descriptions(data / f"{split}_series_descriptions.csv")["study_id"])


def _epoch_seconds(run: Path) -> float:
    """Mean wall seconds of one epoch (training + validation), from the run's summary."""
    return float(json.loads((run / "summary.json").read_text())["epoch_seconds"])


# --------------------------------------------------------------------------- the model


def extrapolate(r: dict, plan, args: argparse.Namespace) -> dict:
    """Wall seconds of `lsdc fit` and `lsdc predict` on N studies with C cores and one GPU,
    for each assumed GPU throughput, and the model that gives them (`model`)."""
    from lsdc.config import load_config
    from lsdc.pipeline import make_plan
    from lsdc.training.engine import EngineConfig
    from lsdc.training.superres import SRTrainConfig

    target = make_plan(plan.preset)  # as `lsdc fit --preset` runs it: its folds, epochs, steps
    s, N, C = r["stages"], args.target_studies, args.target_cores
    eff = {
        m: s[f"{m} cache (1 worker)"]["seconds"] / s[f"{m} cache (2 workers)"]["seconds"] / 2
        for m in ("multitask", "sequence")
    }
    measured_e = min(1.0, sum(eff.values()) / len(eff))
    engines = {
        m: load_config(EngineConfig, None, [o.removeprefix("engine.") for o in target.overrides[m]
                                            if o.startswith("engine.")])
        for m in target.models
    }  # fmt: skip
    out: dict = {"parallel_efficiency_2_workers": eff, "scenarios": {}}
    for e in sorted({measured_e, 1.0}):
        for tflops in GPU_TFLOPS:
            rate = tflops * 1e12

            def cpu(per_study: float, e: float = e) -> float:
                return per_study * N / (C * e)

            fit = {
                "index": cpu(s["index"]["per_unit_s"]),
                "relevance features": cpu(s["relevance features"]["per_unit_s"]),
                "relevance fit": cpu(s["relevance fit"]["per_unit_s"]),
                "multitask cache": cpu(s["multitask cache (1 worker)"]["per_unit_s"]),
                "sequence cache": cpu(s["sequence cache (1 worker)"]["per_unit_s"]),
            }
            if "sr" in _stages(target):
                steps = load_config(SRTrainConfig, None, target.overrides["sr"]).steps
                fit["sr"] = s["sr"]["per_unit_s"] * steps / SR_SPEEDUP
            pred = {}
            for m, eng in engines.items():
                c = r["model_costs"][m]
                n_train, n_val = N * (eng.folds - 1) / eng.folds, N / eng.folds
                gpu = (n_train * TRAIN_FLOPS + n_val) * c["forward_flops"] / rate
                workers = max(1, min(eng.num_workers, C))
                loader = (n_train * c["train"] + n_val * c["eval"]) / workers
                fit[m] = eng.folds * eng.epochs * max(gpu, loader)
                prep = r["predict_seconds"][f"{m} preprocess"] / r["config"]["test_studies"]
                pred[f"{m} preprocess"] = cpu(prep)
                # Every fold, with the mirror (tta_flip); the predictor reads studies in its
                # main process, so item loading is serial.
                infer = eng.folds * 2 * c["forward_flops"] / rate
                pred[f"{m} inference"] = N * max(infer, c["eval"])
            out["scenarios"][f"e={e:.2f}, {tflops:g} TFLOP/s"] = {
                "efficiency": e,
                "gpu_tflops": tflops,
                "fit": fit,
                "fit_total": sum(fit.values()),
                "predict": pred,
                "predict_total": sum(pred.values()),
            }
    out["model"] = model_text(r, target, engines, args, measured_e)
    return out


def model_text(r: dict, target, engines: dict, args: argparse.Namespace, e: float) -> str:
    eng = "; ".join(
        f"{m}: {x.folds} folds x {x.epochs} epochs, {x.num_workers} loader workers"
        for m, x in engines.items()
    )
    return "\n".join(
        [
            f"N = {args.target_studies} studies, C = {args.target_cores} cores, one GPU. "
            f"Measured on {r['machine']['cpus']} shared cores (load average "
            f"{r['load_average']['start'][0]:.1f} -> {r['load_average']['end'][0]:.1f}), "
            f"{r['config']['train_studies']} train studies at {r['config']['size']} px.",
            "CPU stages (index, relevance features and fit, caches, predict preprocessing): "
            f"s/study x N / (C x e); e = {e:.2f} the parallel efficiency measured from 1 to 2 "
            "preprocessing workers on this loaded machine, and e = 1 (ideal) beside it; disk "
            "and memory bandwidth not modelled. The relevance fit is taken as linear in "
            "studies (its model fits are not: an upper bound at this sample size).",
            "GPU stages: NO GPU WAS MEASURED. An epoch = max(FLOPs / R, loader CPU time / "
            "workers): FLOPs = (N(k-1)/k trained x 3 + N/k validated) x the forward FLOPs of "
            "one study counted by torch on the preset's model; R an ASSUMED sustained GPU "
            f"throughput of {', '.join(f'{x:g}' for x in GPU_TFLOPS)} TFLOP/s; loader time "
            "from items built here on one thread (augmented for training). x folds x epochs "
            f"of preset {target.preset!r}: {eng}. SR: CPU s/step x the preset's steps / "
            f"{SR_SPEEDUP:g} (assumed).",
            "Predict: preprocessing as the CPU stages; inference N x max(folds x 2 (mirror) x "
            "forward FLOPs / R, item load time) (the predictor loads studies in its main "
            "process).",
        ]
    )


def print_report(r: dict) -> None:
    print(f"\nPer-stage cost, {r['config']['size']} px, {r['machine']['cpus']} CPUs:")
    print(f"{'stage':42s} {'seconds':>8s} {'per unit':>19s} {'peak RSS':>9s}")
    for name, row in r["stages"].items():
        per = f"{row['per_unit_s']:.2f} s/{row['unit']}"
        print(f"{name:42s} {row['seconds']:8.1f} {per:>19s} {row['peak_rss_mb']:6.0f} MB")
    # lsdc's pools start workers from a forkserver, not from the command: wait4 never sees
    # them, so a 2-worker row's memory is its main process alone; a worker's is the 1-worker row.
    print("(2-worker rows: peak of the main process only; each worker's ~ the 1-worker row)")
    n = r["config"]["train_studies"]
    for m, ep in r["epoch_seconds"].items():
        c = r["model_costs"][m]
        gflops = n / 2 * (TRAIN_FLOPS + 1) * c["forward_flops"] / ep / 1e9
        print(
            f"{m}: CPU epoch {ep:.1f} s ({n} studies, half validated: ~{gflops:.0f} GFLOP/s "
            f"here); forward {c['forward_flops'] / 1e9:.1f} GFLOP/study; item "
            f"{c['train']:.3f} s augmented, {c['eval']:.3f} s plain"
        )
    print(f"predict seconds ({r['config']['test_studies']} studies): {r['predict_seconds']}")
    x = r["extrapolation"]
    print("\nModel behind the extrapolation:\n" + x["model"])
    print(f"\n{'scenario':26s} {'fit, h':>7s} {'predict, min':>13s}  largest fit stages")
    for name, v in x["scenarios"].items():
        top = sorted(v["fit"].items(), key=lambda kv: -kv[1])[:3]
        tops = ", ".join(f"{k} {t / 3600:.2f} h" for k, t in top)
        fit_h, pred_min = v["fit_total"] / 3600, v["predict_total"] / 60
        print(f"{name:26s} {fit_h:7.2f} {pred_min:13.1f}  {tops}")


if __name__ == "__main__":
    main()
