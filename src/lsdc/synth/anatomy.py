"""An analytic 3-D lumbar spine in patient coordinates (DICOM LPS, mm), narrowed by its labels.

The spine is built in *straightened* coordinates (w, u, v): w = lateral (+ = patient's left),
u = arc length along the lordotic curve (+ = superior), v = antero-posterior offset from the
posterior margin of the vertebral bodies (+ = posterior). The lordosis is a circular arc in the
sagittal (y, z) plane, so the map patient <-> straightened is closed-form and vectorised. Every
structure is a few comparisons in (w, u, v), so any set of points (a slice grid supersampled through
the thickness) is classified into tissues in one pass: `SpinePhantom.tissues(points)`.

Narrowing per level and side (fraction of space lost, 0..1) is applied only within a bump around
the disc of that level (|du| < ~1 disc height), and only on the side it belongs to, so a label is
visible only at its slice, level and side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import IntEnum

import numpy as np

from lsdc.constants import LEVELS


class T(IntEnum):
    """Tissue ids; the contrast tables in acquire.py give each one a signal per sequence."""

    AIR = 0
    SUBCUT_FAT = 1
    MUSCLE = 2
    VISCERA = 3
    FAT = 4  # retroperitoneal / intermuscular / epidural / foraminal fat
    CORTEX = 5
    MARROW = 6
    ANNULUS = 7
    CSF = 8
    ROOT = 9
    LIGAMENT = 10
    VESSEL = 11
    KIDNEY = 12
    CORD = 13
    JOINT = 14  # facet joint fluid/cartilage
    SKIN = 15
    NUCLEUS = 16  # + disc index 0..5 (T12/L1 .. L5/S1): per-level degeneration sets its signal


N_TISSUES = int(T.NUCLEUS) + 6

VERTEBRAE = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")  # bodies above the sacrum
DISCS = ("T12/L1",) + tuple(lv.upper().replace("_", "/") for lv in LEVELS)  # 6 discs
LEVEL_DISC = {lv: i + 1 for i, lv in enumerate(LEVELS)}  # LEVELS -> index into DISCS
SIDES = ("left", "right")  # side index 0 = patient's left (+w, +x)
SIDE_SIGN = {"left": 1.0, "right": -1.0}


@dataclass
class SpineParams:
    """Everything that defines one phantom spine (mm, radians); JSON-able via `to_dict`."""

    x0: float  # lateral position of the midline (patient x)
    cy: float  # centre of the lordotic arc (patient y, posterior of the spine)
    cz: float  # centre of the lordotic arc (patient z)
    radius: float  # lordosis radius
    u_apex: float  # arc length (from the S1 endplate) of the most anterior point of the curve
    body_heights: list[float]  # T11..L5 (7)
    disc_heights: list[float]  # T12/L1..L5/S1 (6), after degeneration
    body_width: float
    body_depth: float
    sac_width: float
    sac_depth: float
    epi_ant: float  # anterior epidural space
    epi_post: float  # posterior epidural fat
    lamina_thick: float
    body_outline: tuple[float, float]  # trunk half-width, half-depth
    back_v: float  # v of the skin of the back
    subcut: float  # subcutaneous fat thickness
    psoas_scale: float
    degeneration: list[float]  # per disc 0..1 (darker, flatter nucleus)
    spinal: list[float] = field(default_factory=lambda: [0.0] * 5)  # narrowing per level
    foraminal: list[list[float]] = field(default_factory=lambda: [[0.0] * 5, [0.0] * 5])
    subarticular: list[list[float]] = field(default_factory=lambda: [[0.0] * 5, [0.0] * 5])
    texture: list[list[float]] = field(default_factory=list)  # random plane waves (kx,ky,kz,ph)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_params(rng: np.random.Generator) -> SpineParams:
    """Random anatomy of one patient (no narrowing yet; see `set_narrowing`)."""
    scale = rng.uniform(0.9, 1.1)
    body_h = (np.array([23.0, 24.0, 25.5, 26.5, 27.5, 27.5, 26.5]) * scale).tolist()
    disc_h = (np.array([6.5, 7.5, 8.5, 9.5, 10.5, 9.5]) * scale * rng.uniform(0.9, 1.1, 6)).tolist()
    return SpineParams(
        x0=float(rng.normal(0, 4)),
        cy=float(rng.normal(0, 6)),
        cz=float(rng.normal(0, 8)),
        radius=float(rng.uniform(220, 320)),
        u_apex=float(rng.uniform(70, 110)),
        body_heights=body_h,
        disc_heights=disc_h,
        body_width=float(rng.uniform(42, 50) * scale),
        body_depth=float(rng.uniform(30, 36) * scale),
        sac_width=float(rng.uniform(17, 21)),
        sac_depth=float(rng.uniform(13, 16)),
        epi_ant=float(rng.uniform(1.0, 2.0)),
        epi_post=float(rng.uniform(2.5, 4.5)),
        lamina_thick=float(rng.uniform(6, 8)),
        body_outline=(float(rng.uniform(140, 180)), float(rng.uniform(105, 130))),
        back_v=float(rng.uniform(70, 90)),
        subcut=float(rng.uniform(10, 35)),
        psoas_scale=float(rng.uniform(0.8, 1.2)),
        degeneration=[0.0] * 6,
        # Coarse waves (20-90 mm: marrow and muscle heterogeneity) and fine ones (10-30 mm: bowel).
        texture=[
            [*(rng.normal(0, 1, 3) / rng.uniform(6, 25)).tolist(), float(rng.uniform(0, 6.3))]
            for _ in range(8)
        ]
        + [
            [*(rng.normal(0, 1, 3) * rng.uniform(0.2, 0.45)).tolist(), float(rng.uniform(0, 6.3))]
            for _ in range(8)
        ],
    )


def set_narrowing(
    params: SpineParams,
    spinal: np.ndarray,
    foraminal: np.ndarray,
    subarticular: np.ndarray,
    degeneration_noise: np.ndarray | None = None,
) -> SpineParams:
    """Set the narrowing fractions (spinal (5,), foraminal/subarticular (2 sides, 5)) in place.

    Disc degeneration (darker, flatter disc) follows the mean narrowing of its level, so the disc
    itself is a (weak, realistic) cue of the level's severity.
    """
    spinal = np.asarray(spinal, float)
    foraminal = np.asarray(foraminal, float)
    subarticular = np.asarray(subarticular, float)
    params.spinal = spinal.round(5).tolist()
    params.foraminal = foraminal.round(5).tolist()
    params.subarticular = subarticular.round(5).tolist()
    level_mean = (spinal + foraminal.mean(0) + subarticular.mean(0)) / 3
    deg = np.concatenate([[0.1], level_mean])
    if degeneration_noise is not None:
        deg = deg + degeneration_noise
    params.degeneration = np.clip(deg, 0, 1).round(5).tolist()
    return params


def _bump(d: np.ndarray, sigma: float | np.ndarray, cut: float = 2.2) -> np.ndarray:
    """Smooth bump exp(-d^2/2s^2), exactly zero beyond `cut` sigmas (keeps changes local)."""
    floor = math.exp(-0.5 * cut * cut)  # a Python float keeps float32 inputs float32
    z = d / sigma
    return np.where(np.abs(z) < cut, np.exp(-0.5 * z * z) - floor, 0.0) / (1 - floor)


def _waves(p32: np.ndarray, params: list[list[float]]) -> np.ndarray:
    """Sum of plane waves sin(k.x + phase) at points (N, 3), normalised to unit variance."""
    acc = np.zeros(len(p32), np.float32)
    for kx, ky, kz, ph in params:
        acc += np.sin(
            np.float32(kx) * p32[:, 0]
            + np.float32(ky) * p32[:, 1]
            + np.float32(kz) * p32[:, 2]
            + np.float32(ph)
        )
    return acc / np.float32(np.sqrt(max(len(params), 1) / 2))


class SpinePhantom:
    """Tissue classification and landmarks for one `SpineParams`."""

    def __init__(self, params: SpineParams) -> None:
        self.p = params
        p = params
        bh = np.asarray(p.body_heights)
        dh = np.asarray(p.disc_heights)
        # Layout along u, from the S1 endplate (u = 0) upwards: disc L5/S1, L5, disc L4/L5, ...
        disc_lo, body_lo = np.zeros(6), np.zeros(7)
        u = 0.0
        for k in range(5, -1, -1):  # discs bottom-up
            disc_lo[k] = u
            u += dh[k]
            body_lo[k + 1] = u  # body above disc k is vertebra index k+1 (T12 for k=0)
            u += bh[k + 1]
        body_lo[0] = u + 6.0  # T11 above an (unlabelled) T11/T12 disc
        self.disc_lo, self.disc_hi = disc_lo, disc_lo + dh
        self.disc_c = disc_lo + dh / 2
        self.body_lo, self.body_hi = body_lo, body_lo + bh
        self.body_c = body_lo + bh / 2
        self.canal_v = p.epi_ant + p.sac_depth / 2  # centre of the thecal sac (v)
        self.lam_v = p.epi_ant + p.sac_depth + p.epi_post  # inner surface of the laminae
        self.recess_w = p.sac_width / 2 + 1.5  # lateral recess centre (|w|)
        self.recess_v = p.epi_ant + 3.0
        self.pillar_w = (p.sac_width / 2 + 3.0, p.sac_width / 2 + 16.0)  # articular column |w|
        self.foramen_w = float(np.mean(self.pillar_w))
        # Foramina sit between the pedicles, from the disc up to mid-body of the vertebra above.
        self.foramen_u = self.disc_c + 0.32 * bh[1:]
        self.foramen_hu = 0.5 * bh[1:] * 0.78  # half height
        self.foramen_v = 5.5
        self.foramen_hv = 4.6
        self.conus_u = float(self.body_c[2] - 0.2 * bh[2])  # conus medullaris tip near mid L1
        # float32 copies for the per-point lookups (half the memory traffic of float64).
        f32 = np.float32
        self._disc_c32, self._disc_h32 = self.disc_c.astype(f32), dh.astype(f32)
        self._body_lo32, self._body_hi32 = body_lo.astype(f32), (body_lo + bh).astype(f32)
        self._body_c32 = self.body_c.astype(f32)
        self._foramen_u32, self._foramen_hu32 = (
            self.foramen_u.astype(f32),
            self.foramen_hu.astype(f32),
        )
        self.aorta_bif_u = self.body_c[5]  # aortic bifurcation at L4

    # -- coordinate maps ---------------------------------------------------------------------
    # The centreline is a circular arc (lordosis) between the sacrum and T12, continued by its
    # tangent lines above and below, so the curvature stays in the lumbar spine.
    def _phi_limits(self) -> tuple[float, float]:
        p = self.p
        return (-45.0 - p.u_apex) / p.radius, (float(self.body_c[1]) - p.u_apex) / p.radius

    def straighten(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient LPS points (..., 3) -> straightened (w, u, v)."""
        p = self.p
        lo, hi = self._phi_limits()
        dy = pts[..., 1] - p.cy
        dz = pts[..., 2] - p.cz
        r = np.sqrt(dy * dy + dz * dz)
        phi = np.arctan2(dz, -dy)
        u = phi * p.radius + p.u_apex
        v = p.radius - r
        for lim in (lo, hi):
            # Beyond the arc: coordinates in the frame of the tangent line at the arc's end.
            # Python floats (math) keep float32 inputs in float32.
            py, pz = -p.radius * math.cos(lim), p.radius * math.sin(lim)
            ty, tz = math.sin(lim), math.cos(lim)
            ry, rz = dy - py, dz - pz
            along = ry * ty + rz * tz
            sel = along > 0 if lim == hi else along < 0
            u = np.where(sel, lim * p.radius + p.u_apex + along, u)
            v = np.where(sel, ry * tz - rz * ty, v)
        return pts[..., 0] - p.x0, u, v

    def unstraighten(self, w: float, u: float, v: float) -> np.ndarray:
        """Straightened (w, u, v) -> patient LPS point (3,)."""
        p = self.p
        lo, hi = self._phi_limits()
        phi = (u - p.u_apex) / p.radius
        lim = min(max(phi, lo), hi)
        r = p.radius - v
        base = np.array([p.x0 + w, p.cy - r * np.cos(lim), p.cz + r * np.sin(lim)])
        return base + (phi - lim) * p.radius * np.array([0.0, np.sin(lim), np.cos(lim)])

    def tangent(self, u: float) -> np.ndarray:
        """Unit vector along the spine (superior) at arc length u, patient coordinates."""
        lo, hi = self._phi_limits()
        phi = min(max((u - self.p.u_apex) / self.p.radius, lo), hi)
        return np.array([0.0, np.sin(phi), np.cos(phi)])

    def sheared(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(us, vs): height along the spine and horizontal AP offset from the spine at that height.

        Used for the trunk, so its horizontal cross-sections stay undistorted far from the axis.
        """
        p = self.p
        lo, hi = self._phi_limits()
        zlo, zhi = p.radius * math.sin(lo), p.radius * math.sin(hi)
        dz = pts[..., 2] - p.cz
        phi = np.arcsin(np.clip(dz / p.radius, math.sin(lo), math.sin(hi)))
        yc = -p.radius * np.cos(phi)
        # Tangent continuation: y changes by tan(lim) per mm of z beyond the arc.
        yc = yc + np.where(dz > zhi, (dz - zhi) * math.tan(hi), 0.0)
        yc = yc + np.where(dz < zlo, (dz - zlo) * math.tan(lo), 0.0)
        us = phi * p.radius + p.u_apex + np.where(dz > zhi, dz - zhi, 0.0)
        us = us + np.where(dz < zlo, dz - zlo, 0.0)
        return us, pts[..., 1] - p.cy - yc

    # -- landmarks ---------------------------------------------------------------------------
    def landmarks(self) -> dict[str, dict[str, list[float]]]:
        """Patient-space points of the labelled structures: {structure: {level: xyz}}.

        spinal: centre of the (narrowed) thecal sac at the disc; foraminal_left/right: centre of
        the foramen; subarticular_left/right: centre of the lateral recess at the disc; disc:
        centre of the disc (for axial slice placement).
        """
        out: dict[str, dict[str, list[float]]] = {
            k: {}
            for k in (
                "disc",
                "spinal",
                "foraminal_left",
                "foraminal_right",
                "subarticular_left",
                "subarticular_right",
            )
        }
        for i, lv in enumerate(LEVELS):
            k = LEVEL_DISC[lv]
            uc = float(self.disc_c[k])
            g = self.p.spinal[i]
            out["disc"][lv] = self.unstraighten(0.0, uc, -self.p.body_depth / 2).tolist()
            out["spinal"][lv] = self.unstraighten(0.0, uc, self._sac_center(g)).tolist()
            for _s, side in enumerate(SIDES):
                sign = SIDE_SIGN[side]
                fu = float(self.foramen_u[k]) + 0.1 * self.foramen_hu[k]
                out[f"foraminal_{side}"][lv] = self.unstraighten(
                    sign * self.foramen_w, fu, self.foramen_v
                ).tolist()
                out[f"subarticular_{side}"][lv] = self.unstraighten(
                    sign * self.recess_w, uc, self.recess_v
                ).tolist()
        return out

    def _sac_center(self, g: float | np.ndarray) -> float | np.ndarray:
        # Disc bulge pushes the sac from the front (60%), flavum from the back (40%).
        d = self.p.sac_depth
        return self.canal_v + 0.6 * g * d / 2 - 0.4 * g * d / 2

    # -- tissue classification ---------------------------------------------------------------
    def tissues(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue id (uint8) and a smooth texture value (-1..1) at each point of `pts` (N, 3)."""
        p = self.p
        # float32 throughout: mm-scale geometry needs ~1e-4 mm, float32 gives ~3e-5 at 300 mm.
        pts = pts.astype(np.float32, copy=False)
        w, u, v = self.straighten(pts)
        tis = self._trunk(pts, w)
        # The spine's structures are evaluated only near it (about half of a slice's points).
        near = np.flatnonzero((np.abs(w) < 62) & (v > -50) & (v < 70) & (u > -130))
        tis[near] = self._spine(w[near], u[near], v[near], tis[near])
        # Texture: random plane waves in patient space (marrow, muscle streaks); for the viscera
        # a thresholded fine field draws bowel loops (bright content, dark walls and gas).
        p32 = pts
        tex = np.clip(_waves(p32, p.texture[:8]) / 2, -1, 1)
        vis = tis == T.VISCERA
        if vis.any() and len(p.texture) > 8:
            fine = np.abs(_waves(p32[vis], p.texture[8:]))
            tex[vis] = np.tanh(3.0 * (fine - 0.55))
        return tis, tex

    def _trunk(self, pts: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Soft tissues of the trunk (skin, fat, muscles, viscera, kidneys, vessels)."""
        p = self.p
        aw = np.abs(w)
        tis = np.zeros(w.shape, np.uint8)
        us, vs = self.sheared(pts)
        # Trunk: skin, subcutaneous fat, abdominal wall, viscera. The body wall follows the
        # lordosis only partly (35%): the back and belly are straighter than the spine.
        hw, hd = p.body_outline
        vc = p.back_v - hd
        vo = vs + 0.65 * (pts[..., 1] - p.cy - vs + p.radius)
        q_out = (w / hw) ** 2 + ((vo - vc) / hd) ** 2
        q_in = (w / (hw - p.subcut)) ** 2 + ((vo - vc) / (hd - p.subcut)) ** 2
        q_vis = (w / (hw - p.subcut - 9)) ** 2 + ((vo - vc) / (hd - p.subcut - 9)) ** 2
        tis[q_out < 1] = T.SUBCUT_FAT
        tis[(q_out < 1) & (q_out > (1 - 2.5 / hd) ** 2)] = T.SKIN
        tis[q_in < 1] = T.MUSCLE
        tis[(q_vis < 1) & (vs < -12)] = T.VISCERA
        tis[(q_vis < 1) & (vs >= -12)] = T.FAT
        # Sacral region: pelvis replaces viscera below S1 (muscle-ish); keep simple fat/muscle.
        tis[(q_vis < 1) & (us < -40)] = T.MUSCLE
        # Retroperitoneal fat around the spine.
        tis[((w / 80) ** 2 + ((vs + 10) / 42) ** 2 < 1) & (q_in < 1)] = T.FAT
        # Flank muscles (obliques / transversus) and the posterior abdominal wall.
        flank = (q_in < 1) & (q_vis > 0.75) & (vs > -40) & (aw > 70)
        tis[flank] = T.MUSCLE

        # Kidneys (upper lumbar), aorta (left of midline) and IVC (right).
        ku = float(self.body_c[2]) + 10
        for sgn in (1.0, -1.0):
            qk = ((w - sgn * 72) / 27) ** 2 + ((vs + 8) / 22) ** 2 + ((us - ku) / 55) ** 2
            tis[qk < 1] = T.KIDNEY
        vvc = -p.body_depth - 11
        bif = float(self.aorta_bif_u)
        above = us > bif
        ao = np.where(above, (w - 12) ** 2 + (vs - vvc) ** 2 < 10**2, 0)
        ivc = np.where(above, ((w + 14) / 12) ** 2 + ((vs - vvc + 2) / 9) ** 2 < 1, 0)
        spread = np.clip(bif - us, 0, None) * 0.35
        iliac = ~above & (
            ((aw - 10 - spread) ** 2 + (vs - vvc - 0.1 * spread) ** 2 < 7.5**2) & (us > -60)
        )
        tis[(ao > 0) | (ivc > 0) | iliac] = T.VESSEL

        # Psoas: anterolateral to the bodies, growing towards L5.
        b2, b6 = float(self.body_c[2]), float(self.body_c[6])
        grow = np.clip((b2 - us) / (b2 - b6), 0, 1.15)
        pr = (5 + 15 * grow) * p.psoas_scale
        pw = p.body_width / 2 + pr * 0.75
        tis[((aw - pw) / pr) ** 2 + ((vs + p.body_depth * 0.4) / (pr * 0.8)) ** 2 < 1] = T.MUSCLE
        # Paraspinal muscles (multifidus + erector spinae) behind the laminae, a fat septum between.
        # Two lobes either side of the spinous processes; a fat septum splits each lobe.
        para = ((aw - 27) / 26) ** 2 + ((vs - (self.lam_v + 22)) / 27) ** 2 < 1
        para &= (vs > self.lam_v - 12) & (q_in < 1) & (aw > 3)
        tis[para] = T.MUSCLE
        tis[para & (np.abs(aw - 21 - 0.3 * (vs - self.lam_v)) < 0.6)] = T.FAT
        # Iliac wings below the iliac crest (about the L4/L5 disc): an oblique bony plate from the
        # sacro-iliac joint (posteromedial) to the anterior superior iliac spine (anterolateral),
        # gluteal muscles behind it and the iliacus in front.
        crest = float(self.disc_c[4]) + 4.0
        x1, y1, dx, dy = 48.0, 42.0, 64.0, -70.0
        t = np.clip(((aw - x1) * dx + (vs - y1) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        ex, ey = aw - x1 - t * dx, vs - y1 - t * dy
        dist = np.sqrt(ex * ex + ey * ey)
        side = np.sign(ex * -dy + ey * dx)  # + = posterolateral of the plate
        pelvis = (us < crest) & (us > -110) & (q_in < 1)
        span = (t > 0.0) & (t < 1.0)
        tis[pelvis & span & (dist < 18) & (side > 0)] = T.MUSCLE  # gluteus medius
        tis[pelvis & span & (dist < 10) & (side < 0)] = T.MUSCLE  # iliacus
        wing = pelvis & (dist < 3.5 + 1.5 * (1 - t))
        tis[wing] = T.MARROW
        tis[wing & (dist > 1.8 + 1.5 * (1 - t))] = T.CORTEX
        # Quadratus lumborum, lateral to the transverse processes.
        tis[((aw - 58) / 18) ** 2 + ((vs - 14) / 12) ** 2 < 1] = T.MUSCLE

        return tis

    def _spine(self, w: np.ndarray, u: np.ndarray, v: np.ndarray, tis: np.ndarray) -> np.ndarray:
        """Bones, discs, canal, foramina and recesses painted over `tis` (points near the spine)."""
        p = self.p
        aw = np.abs(w)
        side = (w < 0).astype(np.intp)  # 0 = left (+w), 1 = right
        # Nearest disc (k) and body (j) for every point.
        # searchsorted on ascending midpoints: disc_c is descending in k, so flip.
        dc_asc = self.disc_c[::-1]
        kd = 5 - np.clip(np.searchsorted((dc_asc[1:] + dc_asc[:-1]) / 2, u), 0, 5)
        du = u - self._disc_c32[kd]
        dh = self._disc_h32[kd]
        lvl = np.clip(kd - 1, 0, 4)  # LEVELS index (T12/L1 -> treated as no narrowing)
        labelled = kd >= 1
        sp = np.where(labelled, np.asarray(p.spinal, np.float32)[lvl], 0.0)
        fo = np.where(labelled, np.asarray(p.foraminal, np.float32)[side, lvl], 0.0)
        sa = np.where(labelled, np.asarray(p.subarticular, np.float32)[side, lvl], 0.0)
        bump = _bump(du, 0.45 * dh + 1.5)
        g_sp = sp * bump
        g_sa = sa * bump

        # Soft tissues use *sheared* coordinates (us, vs): horizontal offsets from the spine at the
        # same height, so trunk cross-sections stay undistorted far from the curved spine axis.
        # Vertebral bodies (T11..L5): waisted ellipses with cortical rim and endplates.
        jb = np.clip(np.searchsorted(self.body_c[::-1], u), 0, 6)
        jb = 6 - jb  # index into descending body arrays: choose nearest below/above
        cand = np.stack([np.clip(jb, 0, 6), np.clip(jb + 1, 0, 6), np.clip(jb - 1, 0, 6)])
        dist = np.abs(u[None] - self._body_c32[cand])
        jb = np.take_along_axis(cand, dist.argmin(0)[None], 0)[0]
        blo, bhi = self._body_lo32[jb], self._body_hi32[jb]
        t = np.clip((u - blo) / (bhi - blo), 0, 1)
        waist = 1 - 0.07 * (1 - (2 * t - 1) ** 2)
        a = p.body_width / 2 * waist
        b = p.body_depth / 2 * waist
        vb = v + p.body_depth / 2
        # Squarish (super-elliptic) cross-section: a wide, flat posterior margin like a real body.
        qb = np.abs(w / a) ** 3 + np.abs(vb / b) ** 3
        post_ok = (
            v < -1.2 * np.clip(1 - (w / (0.6 * a)) ** 2, 0, 1) + 0.3
        )  # concave posterior margin
        # Concave endplates (deepest centrally) and rounded corners.
        conc = 1.6 * np.clip(1 - qb, 0, 1)
        corner = np.clip(1 - np.minimum(u - blo, bhi - u) / 3.0, 0, 1)
        in_body = (u >= blo + conc) & (u <= bhi - conc) & (qb < 1 - 0.3 * corner) & post_ok
        # Sacrum: S1 body then a tapering, posteriorly tilting plate.
        su = -u
        s_depth = p.body_depth * np.clip(1 - su / 130, 0.25, 1)
        s_width = p.body_width * np.clip(1 - su / 160, 0.35, 1.05) / 2 + 18 * (su < 45)
        vsa = v + s_depth / 2 - 0.12 * su
        in_sac = (u < 0) & (u > -120) & ((w / s_width) ** 2 + (vsa / (s_depth / 2)) ** 2 < 1)
        cortex = in_body & (
            (qb > (1 - 1.8 / b) ** 3 - 0.3 * corner)
            | (u - blo < 1.6 + conc)
            | (bhi - u < 1.6 + conc)
            | (v > -1.6)
        )
        tis[in_body | in_sac] = T.MARROW
        tis[cortex] = T.CORTEX
        tis[in_sac & ((u > -1.6) | ((w / s_width) ** 2 + (vsa / (s_depth / 2)) ** 2 > 0.8))] = (
            T.CORTEX
        )

        # Posterior elements: articular columns (pedicles + pars + facets), laminae, spinous
        # processes and transverse processes. Marrow inside a cortex.
        pw0, pw1 = self.pillar_w
        # Articular column: a rounded (super-elliptic) bar from the body back to the laminae.
        cw, chw = (pw0 + pw1) / 2, (pw1 - pw0) / 2
        cv, chv = (self.lam_v + 8.5) / 2 - 0.5, (self.lam_v + 8.5) / 2
        qc = ((aw - cw) / chw) ** 4 + ((v - cv) / chv) ** 4
        column = (qc < 1) & (u > -25)
        # Laminae: a roof sloping down from the midline to the facets.
        lv0 = self.lam_v + 2.0 - 0.28 * aw
        lam = (
            (aw < pw1 - 2)
            & (v > lv0)
            & (v < lv0 + p.lamina_thick)
            & ((u - self._body_c32[jb]) > -0.62 * (bhi - blo))
            & (u > -10)
        )
        sp_u = self._body_c32[jb] - 0.35 * (v - self.lam_v)
        spinous = (
            (aw < 3.2)
            & (v > self.lam_v)
            & (v < self.lam_v + 38)
            & (np.abs(u - sp_u) < 0.3 * (bhi - blo))
            & (u > -10)
        )
        tp_u = self._body_c32[jb] + 0.15 * (bhi - blo)
        transverse = (aw > pw0) & (aw < 58) & (np.abs(v - 11) < 3.5) & (np.abs(u - tp_u) < 4.5)
        post = column | lam | spinous | transverse
        tis[post] = T.MARROW
        edge = (
            (column & (qc > 0.55))
            | (lam & ((v - lv0 < 1.3) | (lv0 + p.lamina_thick - v < 1.3)))
            | (spinous & (np.abs(aw) > 1.0))
            | (transverse & (np.abs(np.abs(v - 11) - 3.5) < 1.3))
        )
        tis[post & edge] = T.CORTEX
        # Facet joints: an oblique cleft through the column at each disc (SAP in front, IAP behind).
        fj_v = 15 + 0.55 * (aw - pw0)
        joint = column & (np.abs(v - fj_v) < 0.9) & (du > -0.3 * dh) & (du < 0.5 * dh + 10)
        tis[joint] = T.JOINT

        # Bony canal: epidural fat, then discs, sac, ligaments, roots.
        can_c = (self.lam_v + 0.0) / 2
        canal = ((w / (p.sac_width / 2 + 3.5)) ** 2 + ((v - can_c) / (self.lam_v / 2)) ** 2 < 1) & (
            u > -45
        )
        canal |= (aw < p.sac_width / 2 + 2) & (v > 0) & (v < self.lam_v) & (u > -45)
        tis[canal] = T.FAT

        # Neural foramina: inverted tear-drops of fat between the pedicles with the exiting root
        # in their upper part; narrowed from the disc (front, low) and facet (back).
        fu0 = self._foramen_u32[kd]
        hu = self._foramen_hu32[kd] * (1 - 0.25 * fo)
        tu = (u - fu0) / hu  # -1 (bottom, at the disc) .. +1 (top, under the pedicle)
        top_w = 0.55 + 0.45 * np.clip((tu + 1) / 2, 0, 1)  # tear-drop: wider at the top
        low = np.clip((1 - tu) / 2, 0, 1)  # 1 at the disc, 0 at the top
        hv = self.foramen_hv * top_w * (1 - fo * (0.45 + 0.55 * low))
        fv0 = self.foramen_v + fo * 1.2 * (low - 0.5)
        fw = (aw > pw0 - 1) & (aw < pw1 + 6)
        # The healthy outline: a cortical rim around it, and whatever narrowing takes from it
        # filled by dark tissue (facet/ligament hypertrophy), so the loss shows as encroachment.
        hu0 = self._foramen_hu32[kd]
        for pad, tissue in ((1.3, T.CORTEX), (0.0, T.LIGAMENT)):
            t0 = (u - fu0) / (hu0 + pad)
            hv0 = self.foramen_hv * (0.55 + 0.45 * np.clip((t0 + 1) / 2, 0, 1)) + pad
            shape0 = (
                fw
                & labelled
                & (np.abs(t0) < 1)
                & (np.abs(v - self.foramen_v) < hv0 * np.sqrt(np.clip(1 - t0 * t0, 0, 1)))
            )
            tis[shape0 & (column | (tissue == T.LIGAMENT))] = tissue
        foramen = (
            fw
            & labelled
            & (np.abs(tu) < 1)
            & (np.abs(v - fv0) < hv * np.sqrt(np.clip(1 - tu * tu, 0, 1)))
        )
        tis[foramen] = T.FAT
        root_u = fu0 + 0.45 * hu
        rr = 2.3 * (1 - 0.25 * fo)
        exiting = fw & labelled & (((u - root_u) / rr) ** 2 + ((v - fv0 - 0.3) / 2.0) ** 2 < 1)
        tis[exiting] = T.ROOT

        # Discs: annulus with a (degeneration-dependent) nucleus; posterior bulge into the canal
        # and foramen scaled by the narrowing of each level and side.
        bul_u = np.clip(1 - (du / (dh / 2 + 1.5)) ** 2, 0, 1)  # bulge bows out mid-height
        da, db = p.body_width / 2 + 1, p.body_depth / 2 + 1
        qd = np.abs(w / da) ** 3 + np.abs((v + p.body_depth / 2) / db) ** 3
        central = np.clip(1 - (w / (p.sac_width / 2 + 2)) ** 2, 0, 1)
        lateral = np.exp(-0.5 * ((aw - self.recess_w) / 3.0) ** 2)
        foram = np.exp(-0.5 * ((aw - self.foramen_w) / 4.0) ** 2)
        bulge = bul_u * (
            0.6 * p.epi_ant
            + central * (0.6 * sp * p.sac_depth + p.epi_ant * sp)
            + lateral * sa * 4.0
            + foram * fo * (self.foramen_hv * 1.3 + 1.0)
        )
        in_disc = (
            (np.abs(du) < dh / 2 + np.maximum(bul_u * 0.8, 1.6 * np.clip(1 - qd, 0, 1)))
            & (((qd < 1) & (v < 0)) | (v < bulge))
            & (qd < 1.25)
        )
        in_disc &= labelled | (kd == 0)
        degen = np.asarray(p.degeneration, np.float32)[kd]
        nu = (
            (w / (da * 0.55)) ** 2
            + ((v + p.body_depth * 0.45) / (db * 0.5)) ** 2
            + (du / (dh * 0.36 * (1 - 0.4 * degen))) ** 2
        ) < 1
        cleft = np.abs(du) < 0.35 + 0.4 * degen
        tis[in_disc] = T.ANNULUS
        nuc = in_disc & nu & ~(cleft & (degen > 0.35))
        tis[nuc] = (T.NUCLEUS + kd[nuc]).astype(np.uint8)

        # Thecal sac (CSF), narrowed centrally at the disc (spinal) and laterally (subarticular).
        s_c = self._sac_center(g_sp)
        s_b = p.sac_depth / 2 * (1 - g_sp)
        lat_push = g_sa * 0.35 * p.sac_width / 2
        s_a = p.sac_width / 2 * (1 - 0.25 * g_sp) - lat_push
        sac = ((w / s_a) ** 2 + ((v - s_c) / np.maximum(s_b, 0.2)) ** 2 < 1) & (u > -30)
        tis[sac] = T.CSF
        # Ligamentum flavum: thickens at the disc with spinal stenosis, buckling forwards.
        lf_t = 2.0 + 0.4 * g_sp * p.sac_depth
        flavum = (
            canal & (v > self.lam_v - lf_t) & (aw < p.sac_width / 2 + 3) & (np.abs(du) < dh + 4)
        )
        tis[flavum & ~sac] = T.LIGAMENT
        # Lateral recess: fat with the traversing root, closed by facet (SAP) overgrowth.
        rec_a = 3.4 * (1 - 0.85 * g_sa)
        rec_b = 3.0 * (1 - 0.6 * g_sa)
        rec = ((aw - self.recess_w) / np.maximum(rec_a, 0.1)) ** 2 + (
            (v - self.recess_v) / np.maximum(rec_b, 0.1)
        ) ** 2 < 1
        sap = (
            (aw > self.recess_w - 3.4)
            & (aw < pw0 + 2)
            & (v > self.recess_v - 2.5)
            & (v < self.lam_v)
            & ~rec
            & ~sac
            & (np.abs(du) < dh / 2 + 5)
            & (u > -10)
        )
        tis[sap & (g_sa > 0.05)] = T.CORTEX
        tis[rec & (np.abs(du) < dh / 2 + 6) & (u > -30)] = T.FAT
        tr = ((aw - self.recess_w) / (1.7 * (1 - 0.5 * g_sa))) ** 2 + (
            (v - self.recess_v) / 1.5
        ) ** 2 < 1
        tis[tr & (np.abs(du) < dh / 2 + 6) & (u > -30)] = T.ROOT
        # Spinal cord above the conus, cauda equina roots below (posterior, crowded by stenosis).
        cord_r = np.clip((u - self.conus_u) / 15, 0, 1)
        cord = sac & (
            (w / (5.0 * cord_r + 1e-3)) ** 2 + ((v - s_c) / (3.8 * cord_r + 1e-3)) ** 2 < 1
        )
        tis[cord] = T.CORD
        below = sac & (u < self.conus_u)
        for rw, rv in ((-5.0, 0.25), (-2.0, 0.32), (1.0, 0.3), (4.0, 0.22), (-3.5, -0.1), (3, 0)):
            cw = rw * (s_a / (p.sac_width / 2))
            cv = s_c + rv * p.sac_depth * (1 - g_sp)
            tis[below & ((w - cw) ** 2 + (v - cv) ** 2 < 0.8**2)] = T.ROOT

        return tis
