"""Pictures of preprocessing caches: the multitask crops of one study with their keypoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsdc.constants import LEVELS

# One colour per level, shared by every panel so a level reads the same everywhere.
_LEVEL_COLOURS = ("#e6194b", "#f58231", "#ffe119", "#3cb44b", "#4363d8")


def _level_colour(name: str) -> str:
    for i, lv in enumerate(LEVELS):
        if name.endswith(lv):
            return _LEVEL_COLOURS[i]
    return "#ffffff"


def _short(name: str) -> str:
    """`left_neural_foraminal_narrowing_l4_l5` -> `L NFN L4/L5`-like short labels."""
    words = name.split("_")
    side = {"left": "L ", "right": "R "}.get(words[0], "")
    level = "/".join(w.upper() for w in words[-2:])
    return f"{side}{level}"


def plot_crops(cache_dir: str | Path, study_id: int, out: str | Path, *, per_row: int = 2) -> Path:
    """PNG of the three crops of every task of one study in a multitask cache, with the mapped
    keypoints (filled on the selected slice, hollow on its neighbours; hidden when masked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsdc.fileio import atomic_write_bytes
    from lsdc.preprocess.multitask import load_multitask_study

    crops = load_multitask_study(cache_dir, study_id)
    n_rows = int(np.ceil(len(crops) / per_row))
    fig, axes = plt.subplots(
        n_rows, 3 * per_row, figsize=(2.2 * 3 * per_row, 2.45 * n_rows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for i, c in enumerate(crops):
        row, col0 = divmod(i, per_row)
        col0 *= 3
        for j in range(3):
            ax = axes[row, col0 + j]
            ax.imshow(c.image[j], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if j == 1:
                ax.set_title(
                    f"{c.series_type}: {c.task}\n"
                    + (
                        f"series {c.series_id}, inst {'/'.join(map(str, c.instance_numbers))}, "
                        f"{c.source}"
                        if c.present
                        else "series type missing"
                    ),
                    fontsize=7,
                )
            if not c.present:
                continue
            for name, (x, y), ok in zip(
                c.keypoint_names, c.keypoints, c.keypoint_mask, strict=True
            ):
                if not ok:
                    continue
                colour = _level_colour(name)
                if j == 1:
                    ax.scatter([x], [y], s=22, c=colour, edgecolors="black", linewidths=0.5)
                    ax.annotate(
                        _short(name), (x, y), xytext=(4, 2), textcoords="offset points",
                        color=colour, fontsize=5,
                    )  # fmt: skip
                else:
                    ax.scatter([x], [y], s=22, facecolors="none", edgecolors=colour, linewidths=0.8)
    fig.suptitle(f"study {study_id}: multitask crops (centre = selected slice)", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())
