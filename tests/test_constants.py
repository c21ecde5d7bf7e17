import pytest

from lsdc import constants as C


def test_targets_are_the_25_train_columns_in_file_order():
    assert len(C.TARGETS) == 25
    assert C.TARGETS[0] == "spinal_canal_stenosis_l1_l2"
    assert C.TARGETS[5] == "left_neural_foraminal_narrowing_l1_l2"
    assert C.TARGETS[-1] == "right_subarticular_stenosis_l5_s1"


@pytest.mark.parametrize("condition", C.CONDITIONS)
def test_condition_title_round_trip(condition):
    title = C.condition_to_title(condition)
    assert title[0].isupper() and "_" not in title
    assert C.condition_from_title(title) == condition
    assert C.condition_from_title(f"  {title.upper()} ") == condition


def test_known_title_spellings():
    assert C.condition_to_title("left_neural_foraminal_narrowing") == (
        "Left Neural Foraminal Narrowing"
    )
    assert C.level_to_title("l5_s1") == "L5/S1"
    assert C.level_from_title("L1/L2") == "l1_l2"


def test_unknown_strings_raise():
    with pytest.raises(ValueError, match="unknown condition"):
        C.condition_from_title("Spinal Stenosis")
    with pytest.raises(ValueError, match="unknown level"):
        C.level_from_title("L6/S1")


def test_row_id_round_trip_for_every_target():
    for condition in C.CONDITIONS:
        for level in C.LEVELS:
            rid = C.make_row_id(4003253, condition, level)
            assert rid == f"4003253_{condition}_{level}"
            assert C.parse_row_id(rid) == (4003253, condition, level)


@pytest.mark.parametrize(
    "bad", ["abc_spinal_canal_stenosis_l1_l2", "1_spinal_canal_stenosis_l9_l2", "1_foo_l1_l2", "1"]
)
def test_parse_row_id_rejects_malformed(bad):
    with pytest.raises(ValueError, match="malformed row_id"):
        C.parse_row_id(bad)


def test_condition_series_mapping_follows_the_labelling_protocol():
    assert C.CONDITION_SERIES["spinal_canal_stenosis"] == C.SAGITTAL_T2
    assert C.CONDITION_SERIES["left_neural_foraminal_narrowing"] == C.SAGITTAL_T1
    assert C.CONDITION_SERIES["right_subarticular_stenosis"] == C.AXIAL_T2


def test_mirror_swaps_sides_and_is_an_involution():
    assert (
        C.mirror_target("left_subarticular_stenosis_l4_l5") == "right_subarticular_stenosis_l4_l5"
    )
    assert C.mirror_target("spinal_canal_stenosis_l1_l2") == "spinal_canal_stenosis_l1_l2"
    for t in C.TARGETS:
        assert C.mirror_target(C.mirror_target(t)) == t
    assert sorted(C.mirror_target(t) for t in C.TARGETS) == sorted(C.TARGETS)
