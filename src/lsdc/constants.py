"""The RSNA 2024 LSDC data contract: every target, severity, series type and row-id spelling.

Nothing else in the package spells these strings; import them from here.
"""

from __future__ import annotations

from typing import Final

CONDITIONS: Final[tuple[str, ...]] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS: Final[tuple[str, ...]] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")

# The 25 columns of train.csv, in file order (condition-major).
TARGETS: Final[tuple[str, ...]] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)

SEVERITIES: Final[tuple[str, ...]] = ("Normal/Mild", "Moderate", "Severe")
SEVERITY_INDEX: Final[dict[str, int]] = {s: i for i, s in enumerate(SEVERITIES)}
# Submission probability columns, in the order of SEVERITIES.
PROB_COLUMNS: Final[tuple[str, ...]] = ("normal_mild", "moderate", "severe")
# Official sample weights of the metric, by severity index.
SEVERITY_WEIGHTS: Final[tuple[float, ...]] = (1.0, 2.0, 4.0)

SAGITTAL_T1: Final = "Sagittal T1"
SAGITTAL_T2: Final = "Sagittal T2/STIR"
AXIAL_T2: Final = "Axial T2"
SERIES_TYPES: Final[tuple[str, ...]] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)

# Which series type each condition is labelled on.
CONDITION_SERIES: Final[dict[str, str]] = {
    "spinal_canal_stenosis": SAGITTAL_T2,
    "left_neural_foraminal_narrowing": SAGITTAL_T1,
    "right_neural_foraminal_narrowing": SAGITTAL_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}

# Metric groups: left and right are pooled.
CONDITION_GROUP: Final[dict[str, str]] = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
METRIC_GROUPS: Final[tuple[str, ...]] = ("spinal", "foraminal", "subarticular")

# Horizontal flips swap these (patient left <-> right).
MIRROR_CONDITION: Final[dict[str, str]] = {
    "spinal_canal_stenosis": "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing": "right_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing": "left_neural_foraminal_narrowing",
    "left_subarticular_stenosis": "right_subarticular_stenosis",
    "right_subarticular_stenosis": "left_subarticular_stenosis",
}


def condition_to_title(condition: str) -> str:
    """`left_neural_foraminal_narrowing` -> `Left Neural Foraminal Narrowing`."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    return " ".join(w.capitalize() for w in condition.split("_"))


def condition_from_title(title: str) -> str:
    """`Left Neural Foraminal Narrowing` -> `left_neural_foraminal_narrowing`."""
    snake = "_".join(title.strip().lower().split())
    if snake not in CONDITIONS:
        raise ValueError(f"unknown condition {title!r}")
    return snake


def level_to_title(level: str) -> str:
    """`l4_l5` -> `L4/L5`."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    return level.upper().replace("_", "/")


def level_from_title(title: str) -> str:
    """`L4/L5` -> `l4_l5`."""
    snake = title.strip().lower().replace("/", "_")
    if snake not in LEVELS:
        raise ValueError(f"unknown level {title!r}")
    return snake


def make_row_id(study_id: int, condition: str, level: str) -> str:
    """`<study_id>_<condition>_<level>`, the submission's row id."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    return f"{int(study_id)}_{condition}_{level}"


def parse_row_id(row_id: str) -> tuple[int, str, str]:
    """Inverse of `make_row_id`: `(study_id, condition, level)`."""
    head, _, rest = row_id.partition("_")
    if not head.isdigit() or len(rest) < len("l1_l2") + 2:
        raise ValueError(f"malformed row_id {row_id!r}")
    condition, level = rest[: -len("_l1_l2")], rest[-len("l1_l2") :]
    if condition not in CONDITIONS or level not in LEVELS:
        raise ValueError(f"malformed row_id {row_id!r}")
    return int(head), condition, level


def mirror_target(target: str) -> str:
    """The target a horizontal (left/right) flip maps `target` onto."""
    for c in CONDITIONS:
        if target.startswith(c + "_"):
            return MIRROR_CONDITION[c] + target[len(c) :]
    raise ValueError(f"unknown target {target!r}")
