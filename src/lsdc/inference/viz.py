"""Pictures of a trained multitask run: where it looked and what the second pass saw.

`plot_multitask_study` draws, for one study, every crop's centre slice with the true keypoints
(circles, where the cache knows them) and the predicted ones (crosses, coloured by predicted
severity), then, for each of the 25 targets, the second-pass window at the predicted keypoint
before upsampling and after (SR, bicubic or direct sampling, as the run was trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lsdc.constants import SEVERITIES, TARGETS

_SEVERITY_COLOURS = ("#2ca02c", "#ff7f0e", "#d62728")


def plot_multitask_study(
    run_dir: str | Path,
    cache_dir: str | Path,
    study_id: int,
    out: str | Path,
    *,
    folds: Sequence[int] | None = None,
) -> Path:
    """Write the PNG `out` for `study_id` of `cache_dir` predicted by the multitask run
    `run_dir` (keypoints and severities averaged over `folds`, default all; windows of the
    first fold's model). For a training study, `folds=[its fold]` shows what the model that
    never saw it predicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsdc.data.multitask import GROUPS
    from lsdc.inference.predictor import Predictor
    from lsdc.preprocess.multitask import load_multitask_study

    predictor = Predictor.from_run(run_dir, device="cpu", folds=folds)
    if predictor.info["task"] != "multitask":
        raise ValueError(f"{run_dir}: a {predictor.info['task']!r} run, not a multitask run")
    predictor.check_cache(cache_dir)
    ds = predictor.family.dataset(cache_dir, [int(study_id)], predictor.info)
    batch = predictor.family.collate([ds[0]])
    outputs = predictor.predict_outputs(batch)
    probs, points = outputs["probs"][0].numpy(), outputs["keypoints"][0].numpy()
    crops = {c.key: c for c in load_multitask_study(cache_dir, study_id)}

    model = predictor.models[0]
    windows_lo, windows_hi = {}, {}
    with torch.no_grad():
        for g in GROUPS:
            n, k = len(g.keys), len(g.targets[0])
            centres = outputs["keypoints"][:, list(np.ravel(g.targets))].reshape(n, k, 2)
            fine = batch[f"{g.name}_fine"][0]
            hw = batch[f"{g.name}_fine_hw"][0]
            lo = model.windows_at(g.name, fine, hw, centres, upsampled=False)
            hi = model.windows_at(g.name, fine, hw, centres)
            for i, j in enumerate(np.ravel(g.targets)):
                windows_lo[int(j)] = lo[i, 1].numpy()  # centre slice
                windows_hi[int(j)] = hi[i, 1].numpy()

    keys = [k for g in GROUPS for k in g.keys]
    cols = 4
    crop_rows = -(-len(keys) // cols)
    fig = plt.figure(figsize=(3.2 * cols, 3.3 * crop_rows + 2.0 * 7))
    grid = fig.add_gridspec(crop_rows + 7, cols * 2, height_ratios=[1.6] * crop_rows + [1] * 7)
    targets_of = {k: t for g in GROUPS for k, t in zip(g.keys, g.targets, strict=True)}
    for i, key in enumerate(keys):
        c = crops[key]
        ax = fig.add_subplot(grid[i // cols, 2 * (i % cols) : 2 * (i % cols) + 2])
        ax.imshow(c.image[len(c.image) // 2], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{key.replace('__', ': ')}\n{c.source or 'absent'}", fontsize=7)
        ax.axis("off")
        if not c.present:
            continue
        h, w = c.image.shape[-2:]
        for kk, j in enumerate(targets_of[key]):
            if c.keypoint_mask[kk]:
                tx, ty = c.keypoints[kk]
                ax.plot(tx, ty, "o", mfc="none", mec="cyan", ms=7, mew=1.2)
            px, py = points[j] * np.array([w, h]) - 0.5
            sev = int(np.argmax(probs[j]))
            ax.plot(px, py, "x", color=_SEVERITY_COLOURS[sev], ms=7, mew=2)
    for j, target in enumerate(TARGETS):
        r, cc = crop_rows + j // 4, 2 * (j % 4)
        for off, img, label in ((0, windows_lo.get(j), "window"), (1, windows_hi.get(j), "2nd")):
            ax = fig.add_subplot(grid[r, cc + off])
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            sev = int(np.argmax(probs[j]))
            if off == 0:
                ax.set_title(
                    f"{target}\n{SEVERITIES[sev]} {probs[j, sev]:.2f}",
                    fontsize=6,
                    color=_SEVERITY_COLOURS[sev],
                )
            else:
                ax.set_title(f"{label} ({model.upsample_mode})", fontsize=6)
            ax.axis("off")
    fig.suptitle(
        f"study {study_id}: true (cyan circles) vs predicted keypoints (crosses coloured "
        "green/orange/red by predicted severity); second-pass windows",
        fontsize=9,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
