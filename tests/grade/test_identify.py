"""Series identification from headers: vendors' spellings, timing, skips, elimination and the
choice between several candidates, each with its reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from lsdc.grade.discover import FoundFile, FoundSeries, FoundStudy
from lsdc.grade.identify import contrast_from_text, contrast_from_timing, identify_study

SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
COR = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _series(
    uid: str,
    description: str,
    orientation=SAG,  # noqa: ANN001
    *,
    n: int = 10,
    z0: float = 0.0,
    number: int | None = None,
    **kw,  # noqa: ANN003
) -> FoundSeries:
    normal_axis = 0 if orientation == SAG else 2
    files = []
    for i in range(n):
        pos = [0.0, 0.0, 0.0]
        pos[normal_axis] = z0 + 4.0 * i
        files.append(
            FoundFile(
                path=Path(f"/x/{uid}/{i}"),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                sop_instance_uid=f"{uid}.{i}",
                study_uid="1.2.3",
                series_uid=uid,
                modality="MR",
                study_id="7",
                patient_id="P",
                series_number=number,
                description=description,
                protocol="",
                image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
                echo_time=None,
                repetition_time=None,
                inversion_time=None,
                scanning_sequence="SE",
                orientation=orientation,
                position=tuple(pos),
                pixel_spacing=(0.7, 0.7),
                instance_number=i + 1,
                rows=256,
                cols=256,
            )
        )
    if kw:
        files = [replace(f, **kw) for f in files]
    return FoundSeries(uid, files)


def _study(*series: FoundSeries) -> FoundStudy:
    return FoundStudy("1.2.3", {s.uid: s for s in series})


def _types(ident) -> dict[str, tuple[str | None, bool]]:  # noqa: ANN001
    return {c.series.uid: (c.series_type, c.used) for c in ident.choices}


@pytest.mark.parametrize(
    ("text", "contrast"),
    [
        ("SAG T1 TSE", "T1"),
        ("t1_tse_sag", "T1"),
        ("T1W_TSE SAG", "T1"),
        ("Sag T1 FSE", "T1"),
        ("SAG T2 TSE", "T2"),
        ("t2_tse_sag", "T2"),
        ("SAG T2 FRFSE", "T2"),
        ("Sag STIR", "STIR"),
        ("t2_tirm_sag", "STIR"),
        ("AX T2 FSE", "T2"),
        ("t2_tse_tra", "T2"),
        ("Sagittal T2/STIR", "STIR"),
        ("T2* MEDIC ax", None),
        ("SAG T1 + T2", None),
        ("DWI b800", None),
    ],
)
def test_contrast_from_vendor_spellings(text: str, contrast: str | None) -> None:
    assert contrast_from_text(text) == contrast


def test_contrast_from_timing() -> None:
    s = _series("a", "", echo_time=10.0, repetition_time=550.0)
    assert contrast_from_timing(s) == "T1"
    s = _series("a", "", echo_time=100.0, repetition_time=4000.0)
    assert contrast_from_timing(s) == "T2"
    timing = {"echo_time": 50.0, "repetition_time": 4000.0, "inversion_time": 160.0}
    s = _series("a", "", scanning_sequence="IR", **timing)
    assert contrast_from_timing(s) == "STIR"
    assert contrast_from_timing(_series("a", "")) is None


def test_a_vendor_study_is_identified_and_each_choice_says_why() -> None:
    ident = identify_study(
        _study(
            _series("loc", "3-pl T2* FGRE Loc", number=1, n=3),
            _series("t1", "t1_tse_sag", number=2, echo_time=9.0, repetition_time=600.0),
            _series("stir", "t2_tirm_sag", number=3),
            _series("ax", "t2_tse_tra", AX, number=4),
            _series("cor", "COR T2", COR, number=5),
            _series("mpr", "SAG T2 MPR", number=6, image_type=("DERIVED", "SECONDARY")),
        )
    )
    assert _types(ident) == {
        "loc": (None, False),
        "t1": (SAGITTAL_T1, True),
        "stir": (SAGITTAL_T2, True),
        "ax": (AXIAL_T2, True),
        "cor": (None, False),
        "mpr": (None, False),
    }
    reasons = {c.series.uid: c.reason for c in ident.choices}
    assert "localiser" in reasons["loc"]
    assert "coronal" in reasons["cor"]
    assert "derived" in reasons["mpr"]
    assert "TE 9 / TR 600 agrees" in reasons["t1"]
    assert ident.missing == []


def test_non_mr_and_mixed_planes_are_skipped() -> None:
    mixed = _series("mix", "scan", n=2)
    mixed = FoundSeries("mix", [mixed.files[0], replace(mixed.files[1], orientation=AX)])
    ident = identify_study(_study(_series("ct", "SAG T1", modality="CT"), mixed))
    reasons = {c.series.uid: c.reason for c in ident.choices}
    assert "modality CT" in reasons["ct"] and "several planes" in reasons["mix"]
    assert not any(c.used for c in ident.choices)


def test_timing_types_a_series_its_description_does_not() -> None:
    ident = identify_study(
        _study(
            _series("a", "SAG", echo_time=12.0, repetition_time=500.0),
            _series("b", "SAG", echo_time=110.0, repetition_time=3500.0),
        )
    )
    assert _types(ident) == {"a": (SAGITTAL_T1, True), "b": (SAGITTAL_T2, True)}


def test_elimination_types_the_silent_sagittal_series() -> None:
    ident = identify_study(_study(_series("a", "SAG T1 TSE"), _series("b", "spine sag")))
    assert _types(ident)["b"] == (SAGITTAL_T2, True)
    assert "elimination" in next(c.reason for c in ident.choices if c.series.uid == "b")


def test_headers_that_disagree_are_not_trusted() -> None:
    # Described T1 but timed as a T2: neither is believed; with no other sagittal to settle
    # it, the series is skipped and says so.
    ident = identify_study(_study(_series("a", "SAG T1", echo_time=100.0, repetition_time=4000.0)))
    (choice,) = ident.choices
    assert not choice.used and "disagree" in choice.reason
    assert ident.missing == [SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2]


def test_axial_blocks_and_angled_stacks_are_merged_and_a_repeat_is_not() -> None:
    tilted = (1.0, 0.0, 0.0, 0.0, 0.94, 0.34)  # a per-disc stack, 20 degrees off
    angled = identify_study(
        _study(_series("ax1", "AX T2", AX, n=10), _series("ax2", "AX T2", tilted, n=10))
    )
    assert _types(angled) == {"ax1": (AXIAL_T2, True), "ax2": (AXIAL_T2, True)}
    blocks = identify_study(
        _study(
            _series("ax1", "AX T2 L1-L3", AX, n=10, z0=0.0, number=4),
            _series("ax2", "AX T2 L4-S1", AX, n=10, z0=100.0, number=5),
        )
    )
    assert _types(blocks) == {"ax1": (AXIAL_T2, True), "ax2": (AXIAL_T2, True)}
    repeat = identify_study(
        _study(
            _series("ax1", "AX T2", AX, n=10, number=4),
            _series("ax2", "AX T2", AX, n=14, number=7),
        )
    )
    assert _types(repeat) == {"ax1": (AXIAL_T2, False), "ax2": (AXIAL_T2, True)}
    used = next(c for c in repeat.choices if c.used)
    assert "most slices (14)" in used.reason


def test_of_two_sagittal_t1_the_larger_is_used() -> None:
    ident = identify_study(
        _study(_series("s1", "SAG T1", n=11, number=2), _series("s2", "SAG T1", n=15, number=9))
    )
    assert _types(ident) == {"s1": (SAGITTAL_T1, False), "s2": (SAGITTAL_T1, True)}
