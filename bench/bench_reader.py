"""The second-pass reader alone: what the window reader learns when nothing else trains with it.

From a `lsdc fit` runs folder, the multitask model's second-pass windows are sampled once for
every training study that has coordinates, centred on the TRUE keypoints and on the run's own
out-of-fold keypoints (`oof.npz`), with the run's window geometry (size, pixels, upsampling).
Then, per fold of the run, a fresh copy of the run's second-pass reader (window encoder, MLP and
heads, as `model_kwargs` build them) is trained alone on the other folds' true-point windows
(optionally offset at random by up to `--jitter` of the window's half side) and scored on the
fold's windows:
- at the true points (what the reader could read with perfect localisation);
- at the run's predicted points (what it reads in `predict`);
- at the true points moved by `--shift` window pixels across (x: antero-posterior on sagittal
  windows, lateral on axial ones), a misplacement far smaller than the keypoint error. A reader
  whose score collapses there has learnt *where its point sits in the window*, which on the
  phantom tells severity (the spinal keypoint is the narrowed sac's centre, which moves with the
  narrowing) and which a predicted point does not carry.
Each score is given against the weighted prior of the fold's training studies, on the same rows.
Compare with `bench_signal_loss.py` (the joint model's second pass at true and predicted points).

    python bench/bench_reader.py --runs RUNS [--epochs 10] [--jitter 0.0] [--out JSON]
        [--set model.window_sagittal=0.09 model.window_px=36 model.window_pool=mean ...]

`--set` changes the reader's model arguments (window geometry and encoder) from the run's, so a
window size or encoder can be tried without training the joint model again.

Writes JSON to bench/results/bench_reader.json (or --out) and prints a table, with what the reader
costs a training step (forward and backward on 100 windows) against the default encoder, timed
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_signal_loss import reader_table  # noqa: E402


def sample_windows(
    run: Path, cache_dir: Path, ids: list[int], points: dict | None, kwargs: dict
) -> tuple:
    """(n, 25, C, P, P) float16 windows centred on the true points, or on `points` (study ->
    (25, 2) normalised crop x/y) where given, with the window geometry of `kwargs` (the reader's
    model arguments); right axial windows mirrored as the model reads them; and the (n, 25) mask
    of windows with a true point."""
    import torch

    from lsdc.constants import TARGETS
    from lsdc.data.multitask import GROUPS as CROPS
    from lsdc.data.multitask import collate_multitask
    from lsdc.inference.predictor import Predictor

    pred = Predictor.from_run(run, folds=[0], device="cpu")
    model = pred.models[0]
    model.set_windows(
        kwargs["window_sagittal"], kwargs["window_axial"], kwargs.get("window_sagittal_t1", 0.0)
    )
    model.window_px = kwargs["window_px"]
    ds = pred.family.dataset(cache_dir, ids, pred.info)
    windows, mask = None, np.zeros((len(ids), 25), bool)
    with torch.no_grad():
        for i in range(0, len(ids), 8):
            batch = collate_multitask([ds[j] for j in range(i, min(len(ids), i + 8))])
            b = len(batch["labels"])
            for g in CROPS:
                targets = getattr(model, f"targets_{g.name}")  # (n_crops, K)
                centres = batch["points"][:, targets]
                if points is not None:
                    at = np.stack([points[s] for s in ids[i : i + b]])
                    centres = torch.as_tensor(at, dtype=torch.float32)[:, targets]
                win = model.windows_at(
                    g.name,
                    batch[f"{g.name}_fine"].flatten(0, 1),
                    batch[f"{g.name}_fine_hw"].flatten(0, 1),
                    centres.flatten(0, 1),
                )
                win = win.reshape(b, targets.numel(), *win.shape[1:])
                if windows is None:
                    windows = np.zeros((len(ids), 25, *win.shape[2:]), np.float16)
                flat = targets.flatten()
                right = torch.tensor([TARGETS[t].startswith("right_") for t in flat.tolist()])
                if model.mirror_right and g.name == "axial":
                    win = torch.where(right[None, :, None, None, None], win.flip(-1), win)
                windows[i : i + b, flat.numpy()] = win.numpy()
                present = batch[f"{g.name}_present"].repeat_interleave(targets.shape[1], dim=1)
                mask[i : i + b, flat.numpy()] = (batch["point_mask"][:, flat] & present).numpy()
    return windows, mask


def reader_overrides(items: list[str]) -> dict:
    """`model.KEY=VALUE` items -> model arguments, values parsed as YAML (numbers, booleans)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("model."):
            raise SystemExit(f"--set takes model.KEY=VALUE, not {item!r}")
        out[key.removeprefix("model.")] = yaml.safe_load(value)
    return out


def reader_seconds(kwargs: dict, px: int, repeats: int = 3) -> float:
    """Seconds of one training step's reader (forward and backward) on 100 windows of `px`."""
    import torch

    from lsdc.models.registry import build_model

    model = build_model("multitask", **kwargs).train()
    x = torch.rand(100, 3, px, px)

    def step() -> None:
        model.embed_windows(x).sum().backward()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def train_reader(
    kwargs: dict,
    windows,
    mask,
    labels,
    prior,
    *,
    epochs: int,
    jitter: float,
    seed: int,
    lr: float = 1e-3,
    batch: int = 4,
):  # -> a function of windows, mask -> probabilities
    """A fresh copy of the run's second pass trained alone on `windows` (teacher windows of the
    training studies) with the metric's loss; returns its predict function."""
    import torch
    import torch.nn.functional as F

    from lsdc.models.registry import build_model
    from lsdc.training.losses import LossConfig, metric_loss

    torch.manual_seed(seed)
    model = build_model("multitask", **kwargs)
    parts = [model.second, model.second_mlp, model.second_heads]
    params = [p for m in parts if m is not None for p in m.parameters()]
    prior_logits = torch.nn.Parameter(torch.as_tensor(np.log(prior), dtype=torch.float32))
    opt = torch.optim.AdamW([*params, prior_logits], lr=lr, weight_decay=0.01)
    targets = torch.arange(25)
    x_all = torch.from_numpy(windows.astype(np.float32))
    y_all, m_all = torch.from_numpy(labels).long(), torch.from_numpy(mask)

    def forward(x, m):
        b = x.shape[0]
        logits = model.read_windows(x.flatten(0, 1), targets.repeat(b)).reshape(b, 25, 3)
        return torch.where(m[..., None], logits, prior_logits[None].expand(b, -1, -1))

    def move(x, offsets):  # (B, 25, C, P, P), offsets (B * 25, 2) in half-window units
        theta = torch.zeros(len(offsets), 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = offsets
        flat = x.flatten(0, 1)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        return F.grid_sample(flat, grid, align_corners=False, padding_mode="border").view_as(x)

    gen = torch.Generator().manual_seed(seed)
    bs = batch
    for _ in range(epochs):
        for m in parts:
            if m is not None:
                m.train()
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order) - bs + 1, bs):
            idx = order[i : i + bs]
            x = x_all[idx]
            if jitter > 0:
                x = move(x, (torch.rand(len(idx) * 25, 2, generator=gen) * 2 - 1) * jitter)
            loss = metric_loss(forward(x, m_all[idx]), y_all[idx], LossConfig())["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    for m in parts:
        if m is not None:
            m.eval()

    def predict(windows, mask) -> np.ndarray:
        x, m = torch.from_numpy(windows.astype(np.float32)), torch.from_numpy(mask)
        with torch.no_grad():
            return np.concatenate(
                [
                    forward(x[i : i + 16], m[i : i + 16]).softmax(-1).numpy()
                    for i in range(0, len(x), 16)
                ]
            ).astype(np.float64)

    return predict


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="a `lsdc fit` runs folder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--jitter", type=float, default=0.0, help="training offsets, half windows")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--batch", type=int, default=4, help="studies a step (25 windows each)")
    p.add_argument("--seed", type=int, default=0, help="training seed (fold k: 100 * seed + k)")
    p.add_argument("--shift", type=int, default=2, help="window pixels, the shift probe")
    p.add_argument("--out", type=Path, default=Path("bench/results/bench_reader.json"))
    p.add_argument(
        "--set", nargs="*", default=[], metavar="model.KEY=VALUE", help="reader model arguments"
    )
    args = p.parse_args(argv)

    import torch

    from lsdc.fileio import load_npz
    from lsdc.preprocess.cache import StudyCache
    from lsdc.training.engine import weighted_class_prior
    from lsdc.training.folds import FOLDS_FILE, load_folds

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run, cache_dir = args.runs / "multitask", args.runs / "cache" / "multitask-train"
    folds = load_folds(run / FOLDS_FILE)
    cache = StudyCache.open(cache_dir)
    oof, _ = load_npz(run / "oof.npz")
    predicted = dict(zip(oof["study_ids"].tolist(), oof["out_keypoints"], strict=True))
    ids = sorted(s for s in folds if cache.has(s) and s in predicted)
    kwargs = json.loads((run / "run.json").read_text())["model_kwargs"]
    kwargs = {**kwargs, "sr_path": None, **reader_overrides(args.set)}
    t0 = time.perf_counter()
    true_w, mask = sample_windows(run, cache_dir, ids, None, kwargs)
    pred_w, _ = sample_windows(run, cache_dir, ids, predicted, kwargs)
    keep = mask.any(axis=1)  # studies with coordinates
    ids = [s for s, k in zip(ids, keep, strict=True) if k]
    true_w, pred_w, mask = true_w[keep], pred_w[keep], mask[keep]
    moved_w = np.roll(true_w, args.shift, axis=-1)
    labels = cache.labels(ids)
    fold = np.array([folds[s] for s in ids])
    readers = {
        k: np.zeros((len(ids), 25, 3)) for k in ("weighted prior", "true", "predicted", "moved")
    }
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        prior = weighted_class_prior(labels[tr])
        predict = train_reader(
            kwargs,
            true_w[tr],
            mask[tr],
            labels[tr],
            prior,
            epochs=args.epochs,
            jitter=args.jitter,
            seed=100 * args.seed + int(f),
            lr=args.lr,
            batch=args.batch,
        )
        readers["weighted prior"][te] = prior
        readers["true"][te] = predict(true_w[te], mask[te])
        readers["predicted"][te] = predict(pred_w[te], mask[te])
        readers["moved"][te] = predict(moved_w[te], mask[te])
    print(f"{len(ids)} studies with coordinates, {len(np.unique(fold))} folds, reader alone")
    # What the reader costs a training step, against the default encoder in the same run.
    px = int(true_w.shape[-1])
    default = {k: v for k, v in kwargs.items() if k != "window_widths"}
    cost = {"seconds_100_windows": reader_seconds(kwargs, px)}
    cost["default_widths_seconds"] = reader_seconds(default, px)
    cost["x_default"] = cost["seconds_100_windows"] / cost["default_widths_seconds"]
    print(f"reader step on 100 windows: {cost['x_default']:.2f}x the default encoder's time")
    table = reader_table(labels, readers, "windows at", 20)
    result = {
        "benchmark": "bench_reader",
        "command": "python bench/bench_reader.py " + " ".join(argv or sys.argv[1:]),
        "runs": str(args.runs),
        "studies": len(ids),
        "epochs": args.epochs,
        "jitter": args.jitter,
        "lr": args.lr,
        "batch": args.batch,
        "seed": args.seed,
        "shift_px": args.shift,
        "window_px": int(true_w.shape[-1]),
        "reader": {k: v for k, v in kwargs.items() if k.startswith("window")},
        "seconds": time.perf_counter() - t0,
        "reader_cost": cost,
        "readers": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
