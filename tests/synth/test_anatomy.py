"""The analytic spine: severity changes the image only near its structure, level and side."""

from __future__ import annotations

import numpy as np
import pytest

from lsdc.constants import TARGETS
from lsdc.synth.acquire import render_series
from lsdc.synth.anatomy import T
from lsdc.synth.writer import build_study

SEED, INDEX, SIZE = 11, 2, 64


def _voxel_centres(spec, s: int) -> np.ndarray:
    rows, cols, ps = spec.grid(s)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    o = spec.orientations[s]
    return spec.positions[s] + (cc * ps[1])[..., None] * o[:3] + (rr * ps[0])[..., None] * o[3:]


def _changed_points(target: str, a: int, b: int):
    base = build_study(SEED, INDEX, SIZE).labels.copy()
    base[:] = 0
    la, lb = base.copy(), base.copy()
    la[TARGETS.index(target)] = a
    lb[TARGETS.index(target)] = b
    sa, sb = build_study(SEED, INDEX, SIZE, la), build_study(SEED, INDEX, SIZE, lb)
    pts = []
    for spec_a, spec_b in zip(sa.specs, sb.specs, strict=True):
        np.testing.assert_array_equal(spec_a.positions, spec_b.positions)  # geometry unchanged
        va = render_series(sa.phantom, spec_a, np.random.default_rng(0), noise=False)
        vb = render_series(sb.phantom, spec_b, np.random.default_rng(0), noise=False)
        for s in range(spec_a.num_slices):
            diff = np.abs(va[s] - vb[s]) > 1e-4
            if diff.any():
                pts.append(_voxel_centres(spec_a, s)[diff])
    return sa, np.concatenate(pts) if pts else np.zeros((0, 3))


@pytest.mark.parametrize(
    ("target", "landmark", "side"),
    [
        ("spinal_canal_stenosis_l3_l4", "spinal", 0),
        ("left_neural_foraminal_narrowing_l4_l5", "foraminal_left", 1),
        ("right_neural_foraminal_narrowing_l2_l3", "foraminal_right", -1),
        ("left_subarticular_stenosis_l5_s1", "subarticular_left", 1),
    ],
)
def test_severity_changes_voxels_only_near_its_structure(target, landmark, side) -> None:
    study, pts = _changed_points(target, 0, 2)
    assert len(pts) > 0, "a severe label must change the image"
    level = target[-5:]
    ph = study.phantom
    centre = np.asarray(ph.landmarks()[landmark][level])
    dist = np.linalg.norm(pts - centre, axis=1)
    # Partial volume over a 64-px voxel (~5 mm, 4-5 mm thick) plus the disc of the same level
    # (its degeneration follows the level's severity) stay within ~45 mm of the structure.
    assert dist.max() < 45, dist.max()
    w, u, _ = ph.straighten(pts)
    k = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"].index(level) + 1
    # Never at another level: from below this disc up to the top of the vertebra above it (the
    # foramen of a level lies under the pedicle of the upper vertebra), plus a 64-px voxel.
    du = u - ph.disc_c[k]
    assert du.min() > -25 and du.max() < ph.p.body_heights[k + 1] + 5, (du.min(), du.max())
    assert du.max() < ph.disc_c[k - 1] - ph.disc_c[k] - 2  # below the next disc up
    if k < 5:
        assert du.min() > ph.disc_c[k + 1] - ph.disc_c[k] + 2  # above the next disc down
    if side:
        # Besides the shared disc (|w| < ~15 mm), nothing changes on the other side.
        assert (side * w > -20).all(), (side * w).min()
        assert (side * w > 10).any()  # the structure itself, on its own side


def test_severe_narrowing_shrinks_its_space() -> None:
    base = np.zeros(len(TARGETS), np.int64)
    j = TARGETS.index("spinal_canal_stenosis_l4_l5")
    areas = []
    for sev in (0, 2):
        lab = base.copy()
        lab[j] = sev
        ph = build_study(SEED, INDEX, SIZE, lab).phantom
        uc = ph.disc_c[4]  # L4/L5
        w, v = np.meshgrid(np.linspace(-15, 15, 121), np.linspace(-5, 30, 141))
        pts = np.stack(
            [ph.unstraighten(a, uc, b) for a, b in zip(w.ravel(), v.ravel(), strict=True)]
        )
        tis, _ = ph.tissues(pts)
        areas.append(np.isin(tis, [T.CSF, T.ROOT]).sum())
    assert areas[1] < 0.6 * areas[0]


def test_landmarks_sit_in_their_tissue_and_side() -> None:
    study = build_study(SEED, INDEX, SIZE, np.zeros(len(TARGETS), np.int64))
    ph = study.phantom
    lm = ph.landmarks()
    for lv in lm["spinal"]:
        tis, _ = ph.tissues(np.asarray([lm["spinal"][lv]]))
        assert tis[0] in (T.CSF, T.ROOT, T.CORD)
        for side, sign in (("left", 1), ("right", -1)):
            f = np.asarray(lm[f"foraminal_{side}"][lv])
            r = np.asarray(lm[f"subarticular_{side}"][lv])
            assert sign * (f[0] - ph.p.x0) > 10  # patient left = +x
            assert sign * (r[0] - ph.p.x0) > 5
            assert ph.tissues(f[None])[0][0] in (T.FAT, T.ROOT)
            assert ph.tissues(r[None])[0][0] in (T.FAT, T.ROOT)
