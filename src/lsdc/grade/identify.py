"""Which series of a study is the Sagittal T1, the Sagittal T2/STIR and the Axial T2, from the
headers first, then from the image where the headers say nothing or disagree.

- Skipped by their headers: non-MR series, localisers and scouts, derived or secondary images
  (reformats, MIPs, maps), series whose files disagree on the plane, coronal series.
- The plane comes from ImageOrientationPatient (geometry, never the description).
- The contrast: keywords of SeriesDescription and ProtocolName across vendors' spellings (T1,
  T2, STIR, TIRM, ...), and the timing: EchoTime, RepetitionTime, InversionTime and a
  ScanningSequence of IR. When they disagree or say nothing: by elimination between the
  study's two sagittal series; a lone axial acquisition is taken as the T2. Otherwise the
  series is skipped, named, with why. (An image fallback, the skew of the intensity along the
  vertebral column, did not tell the phantom's T1 from its T2 and is not used.)
- Several candidates for one type: axial stacks at other levels or angles (blocks, per-disc
  stacks) are all used, as the competition's tables list them (the readers merge them); of a
  repeat (same angle, 90% the same ground), and of several sagittal series of one type, the
  one with more slices, then the larger field of view, then the later series is used.
Every choice is written down with its reason (`SeriesChoice.reason`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES
from lsdc.geometry import orientation_label, positions_along_normal, slice_normal
from lsdc.grade.discover import FoundSeries, FoundStudy

_LOCALISER = re.compile(
    r"\b(LOC|LOCALI[SZ]ER|SCOUT|SURVEY|3 ?PL(ANE)?|TRI ?PILOT|PLAN(NING)?|CAL(IBRATION)?|"
    r"ASSET|SENSE ?REF|COIL ?SURVEY)\b"
)
_DERIVED_WORDS = re.compile(r"\b(MPR|MIP|REFORMAT\w*|RECON|ADC|TRACE|SUB(TRACTION)?|MYELO)\b")
_STIR = re.compile(r"STIR|TIRM|T2 ?FS\b|FAT ?SAT|\bFS\b|SPAIR|DIXON W|\bIR\b")
_T1 = re.compile(r"T1(?!\d)")
_T2 = re.compile(r"T2(?![*\d])|T2W")
_GRE_T2STAR = re.compile(r"T2\*|T2 ?STAR|MEDIC|MERGE|\bFFE\b")
_SAG, _AX = re.compile(r"\bSAG"), re.compile(r"\b(AX|AXIAL|TRA|TRANS)")


@dataclass(frozen=True)
class SeriesChoice:
    """What identification made of one series."""

    series: FoundSeries
    series_type: str | None  # the type it was identified as; None when skipped
    used: bool
    reason: str


@dataclass
class Identification:
    choices: list[SeriesChoice] = field(default_factory=list)

    def used(self, series_type: str) -> list[FoundSeries]:
        return [c.series for c in self.choices if c.used and c.series_type == series_type]

    @property
    def missing(self) -> list[str]:
        return [t for t in SERIES_TYPES if not self.used(t)]


def _words(text: str) -> str:
    """Upper case, `_`/`-`/`.` as spaces, so that `t1_tse_sag` reads as `T1 TSE SAG`."""
    return re.sub(r"[_\-.,/()]+", " ", text.upper()).strip()


def _skip_reason(series: FoundSeries) -> str | None:
    f = series.first
    text = _words(f"{f.description} {f.protocol}")
    if f.modality and f.modality != "MR":
        return f"modality {f.modality}, not MR"
    if "LOCALIZER" in f.image_type or _LOCALISER.search(text):
        return "a localiser or scout (by its description or ImageType)"
    if {"DERIVED", "SECONDARY"} & set(f.image_type):
        return f"derived images (ImageType {'/'.join(f.image_type)})"
    if _DERIVED_WORDS.search(text):
        return f"a derived series by its description ({f.description!r})"
    return None


def series_plane(series: FoundSeries) -> str | None:
    """'sagittal', 'coronal' or 'axial' from ImageOrientationPatient; 'mixed' when its files
    disagree; None when no file has one."""
    labels = set()
    for f in series.files:
        if f.orientation is not None:
            try:
                labels.add(orientation_label(f.orientation))
            except ValueError:
                continue
    if not labels:
        return None
    return labels.pop() if len(labels) == 1 else "mixed"


def contrast_from_text(text: str) -> str | None:
    """'T1', 'T2' or 'STIR' named by a description or protocol; None when it names none or
    names T1 and T2 both."""
    w = _words(text)
    if _GRE_T2STAR.search(w):
        return None
    if _STIR.search(w) and not _T1.search(w):
        return "STIR"
    t1, t2 = bool(_T1.search(w)), bool(_T2.search(w))
    if t1 != t2:
        return "T1" if t1 else "T2"
    return None


def contrast_from_timing(series: FoundSeries) -> str | None:
    """'T1', 'T2' or 'STIR' from EchoTime / RepetitionTime / InversionTime (ms); None when
    they are absent or in between."""
    f = series.first
    te, tr, ti = f.echo_time, f.repetition_time, f.inversion_time
    inversion = "IR" in f.scanning_sequence.split("\\") or (ti is not None and ti > 0)
    if inversion and ti is not None and 80 <= ti <= 300:
        return "STIR"
    if inversion and ti is not None and ti > 300:
        return None  # FLAIR-type inversion: T1 or T2 by other means
    if te is None or tr is None:
        return None
    if te <= 30 and tr <= 1200:
        return "T1"
    if te >= 60 and tr >= 1800:
        return "T2"
    return None


def _type_of(plane: str, contrast: str) -> str | None:
    if plane == "sagittal":
        return SAGITTAL_T1 if contrast == "T1" else SAGITTAL_T2
    return AXIAL_T2 if contrast in ("T2", "STIR") else None


@dataclass(eq=False)  # keyed by identity in `_choose`
class _Candidate:
    series: FoundSeries
    plane: str
    contrast: str | None
    how: str


def _header_contrast(series: FoundSeries) -> tuple[str | None, str]:
    f = series.first
    named = [
        (contrast_from_text(t), label)
        for t, label in ((f.description, "SeriesDescription"), (f.protocol, "ProtocolName"))
        if t
    ]
    said = {c for c, _ in named if c is not None}
    timing = contrast_from_timing(series)
    times = (
        f"TE {f.echo_time:g} / TR {f.repetition_time:g}"
        if f.echo_time is not None and f.repetition_time is not None
        else "no TE/TR"
    ) + (f" / TI {f.inversion_time:g}" if f.inversion_time else "")
    # T2 and STIR are one family for the sagittal type; T1 against either is a conflict.
    families = {"T1" if c == "T1" else "T2" for c in said | ({timing} if timing else set())}
    if len(families) > 1:
        return None, f"headers disagree ({f.description!r}, {times} -> {timing or 'unknown'})"
    if said:
        contrast = timing if timing == "STIR" else sorted(said)[0]
        where = " and ".join(label for c, label in named if c is not None)
        agree = f", {times} agrees" if timing else f", {times}"
        return contrast, f"{where} {f.description or f.protocol!r} says {contrast}{agree}"
    if timing:
        return timing, f"{times} says {timing} (no contrast in its description)"
    return None, f"no contrast in its description ({f.description!r}) or timing ({times})"


def identify_study(study: FoundStudy) -> Identification:
    """Type every series of `study`, choose those the models read, and say why for each."""
    out = Identification()
    candidates: list[_Candidate] = []
    order = sorted(
        study.series.values(),
        key=lambda s: s.first.series_number if s.first.series_number is not None else 1 << 30,
    )
    for s in order:
        reason = _skip_reason(s)
        plane = series_plane(s) if reason is None else None
        if reason is None and plane is None:
            reason = "no ImageOrientationPatient"
        elif reason is None and plane == "mixed":
            reason = "its images lie in several planes (a localiser?)"
        elif reason is None and plane == "coronal":
            reason = "a coronal series (lsdc reads sagittal and axial series)"
        if reason is not None:
            out.choices.append(SeriesChoice(s, None, False, f"skipped: {reason}"))
            continue
        contrast, how = _header_contrast(s)
        candidates.append(_Candidate(s, str(plane), contrast, how))

    # The headers' silence, settled by elimination.
    sag = [c for c in candidates if c.plane == "sagittal"]
    unknown = [c for c in sag if c.contrast is None]
    if len(sag) == 2 and len(unknown) == 1:
        known = next(c for c in sag if c.contrast is not None)
        other = "T2" if known.contrast == "T1" else "T1"
        c = unknown[0]
        c.contrast = other
        c.how = f"{c.how}; by elimination, the study's other sagittal is {known.contrast}"
    for c in candidates:
        if c.plane == "axial" and c.contrast is None:
            ax = [a for a in candidates if a.plane == "axial"]
            if all(a.contrast is None for a in ax):
                c.contrast = "T2"
                c.how = f"{c.how}; the study's only axial acquisition, taken as T2"

    by_type: dict[str, list[_Candidate]] = {}
    for c in candidates:
        t = _type_of(c.plane, c.contrast) if c.contrast else None
        if t is None:
            why = f"axial {c.contrast} (lsdc reads axial T2)" if c.contrast else "contrast unknown"
            out.choices.append(SeriesChoice(c.series, None, False, f"skipped: {why}; {c.how}"))
            continue
        by_type.setdefault(t, []).append(c)
    for t, cands in by_type.items():
        used = _choose(t, cands)
        for c in cands:
            ok = c in used
            note = used[c] if ok else _beaten(c, used)
            out.choices.append(SeriesChoice(c.series, t, ok, f"{c.how}; {note}"))
    rank = {id(s): i for i, s in enumerate(order)}
    out.choices.sort(key=lambda ch: rank[id(ch.series)])
    return out


def _extent(s: FoundSeries) -> tuple[float, float]:
    f = s.first
    pos = np.array([g.position for g in s.files if g.position is not None], np.float64)
    if f.orientation is None or not len(pos):
        return (0.0, 0.0)
    d = positions_along_normal(pos, f.orientation)
    return float(d.min()), float(d.max())


def _size(s: FoundSeries) -> tuple[int, float, int]:
    f = s.first
    fov = f.rows * f.cols * (f.pixel_spacing[0] * f.pixel_spacing[1] if f.pixel_spacing else 1)
    return (len(s.files), fov, f.series_number or 0)


def _choose(series_type: str, cands: list[_Candidate]) -> dict[_Candidate, str]:
    """The candidates used, each with why."""
    ranked = sorted(cands, key=lambda c: _size(c.series), reverse=True)
    best = ranked[0]
    if len(cands) == 1:
        return {best: "used"}
    if series_type == AXIAL_T2:
        # Axial stacks at other levels or angles (blocks, per-disc stacks) are all used: the
        # readers merge them and pick each level's slice, as for the competition's tables. Only
        # a repeat (same angle, same ground) gives way to the larger one.
        kept = [best]
        for c in ranked[1:]:
            if not any(_repeats(c.series, k.series) for k in kept):
                kept.append(c)
        if len(kept) > 1:
            note = f"used: one of {len(kept)} axial stacks at other levels or angles (merged)"
            return {c: note for c in kept}
    n, fov, _ = _size(best.series)
    return {best: f"used: most slices ({n}) and field of view of the {len(cands)} {series_type}"}


def _repeats(a: FoundSeries, b: FoundSeries) -> bool:
    """Whether `a` covers what `b` covers at the same angle: a repeat, not another block."""
    oa, ob = a.first.orientation, b.first.orientation
    if oa is None or ob is None:
        return False
    cos = abs(float(slice_normal(oa) @ slice_normal(ob)))
    return cos > np.cos(np.radians(3.0)) and _overlap(_extent(a), _extent(b)) >= 0.9


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Overlap of two ranges as a share of the shorter one."""
    inter = min(a[1], b[1]) - max(a[0], b[0])
    shorter = min(a[1] - a[0], b[1] - b[0])
    if shorter <= 0:
        return 1.0 if inter >= 0 else 0.0
    return max(0.0, inter) / shorter


def _beaten(c: _Candidate, used: dict[_Candidate, str]) -> str:
    n = len(c.series.files)
    return f"not used: another {c.plane} series of this type was chosen ({n} slices)"
