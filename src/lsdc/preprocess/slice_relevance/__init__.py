"""Slice relevance: which slice of a series shows a condition best (DESIGN §4, multitask step 1).

Input: studies (`Study`) and, for training, the coordinate table, whose instance numbers mark the
slice a radiologist labelled. Output: for every series and *task* (a condition on sagittal series;
a level on axial series, shared by left and right subarticular stenosis) the sorted slice index
with the highest relevance.

- Features per slice (`slice_features`): HOG, LBP histograms, GLCM properties of a quantised
  image, intensity statistics, a coarse thumbnail, the slice's position in the stack (patient
  axis, mm and rank), and series context (z-scores within the series and differences to both
  neighbours). Computed on the region of interest: `sagittal_roi` on sagittal series, a centred
  box on axial ones (the fitted axial ROI is an *output* of training, so it cannot be an input).
- One multi-class model per series type: class 0 = "not a labelled slice", class k = task k. The
  slice predicted for task k is the argmax over the series' slices of P(class k).
- Base models RandomForest, SVM (Nystroem kernel approximation + linear SVM, Platt-scaled on
  study-grouped folds), MLP, XGBoost, each fitted in time at most linear in the slices
  (`models.ModelConfig`); the ensemble is their weighted soft vote, the weights fitted on
  out-of-fold probabilities (`vote`).
- Study-wise cross-validation gives exact and +-1-slice accuracy per series type for each base
  model, the ensemble (voting with weights fitted on the other folds) and the middle-slice
  baseline.

Files: `tasks` (names), `features`, `models` (members and vote), `vote` (fitted weights),
`persist` (model files), `cv` (labelled series, cross-validation, final fits), `train` (the
run), `predict` (inference from a run folder).

Persistence and trust boundary: scikit-learn models are saved with skops and loaded with an
explicit list of trusted types (skops' default-trusted scikit-learn/numpy types plus
`TRUSTED_SKOPS_TYPES`); a file asking for any other type is refused before anything is
constructed. XGBoost models are saved as XGBoost JSON. Nothing in a run folder is unpickled, so
loading one runs no code of its author; what remains to trust is the skops and XGBoost parsers
and the listed scikit-learn classes.
"""

# The public names of the package, importable from here as before the split.
from lsdc.preprocess.slice_relevance.config import SliceRelevanceConfig
from lsdc.preprocess.slice_relevance.cv import (
    OOF_SLICE_COLUMNS,
    OOF_SLICES_FILE,
    CrossValidation,
    LabelledSeries,
    accuracy_table,
    cross_validate,
    fit_all,
    format_table,
    labelled_series,
)
from lsdc.preprocess.slice_relevance.features import (
    FEATURE_PIPELINE,
    FeatureConfig,
    SeriesFeatures,
    compute_features,
    dataset_descriptions,
    feature_names,
    feature_window,
    load_cached_features,
    normalise_volume,
    series_features,
    slice_features,
)
from lsdc.preprocess.slice_relevance.models import (
    ModelConfig,
    SeriesTypeModels,
    fit_member,
    fit_series_type,
    soft_vote,
)
from lsdc.preprocess.slice_relevance.persist import (
    TRUSTED_SKOPS_TYPES,
    load_models,
    load_skops,
    save_models,
)
from lsdc.preprocess.slice_relevance.predict import (
    SlicePrediction,
    load_axial_roi,
    load_oof_slices,
    predict_slices,
    run_models,
    run_models_initializer,
)
from lsdc.preprocess.slice_relevance.tasks import (
    BASELINE,
    ENSEMBLE,
    MODEL_NAMES,
    middle_slice,
    series_slug,
    task_of,
    tasks_for,
)
from lsdc.preprocess.slice_relevance.train import (
    SliceRelevanceReport,
    fit_axial_roi_from_points,
    format_weights,
    train_slice_relevance,
)
from lsdc.preprocess.slice_relevance.vote import VoteSeries, fit_vote_weights, weight_grid

__all__ = [
    "CrossValidation",
    "VoteSeries",
    "fit_vote_weights",
    "format_weights",
    "soft_vote",
    "weight_grid",
    "BASELINE",
    "ENSEMBLE",
    "FEATURE_PIPELINE",
    "MODEL_NAMES",
    "OOF_SLICES_FILE",
    "OOF_SLICE_COLUMNS",
    "TRUSTED_SKOPS_TYPES",
    "FeatureConfig",
    "LabelledSeries",
    "ModelConfig",
    "SeriesFeatures",
    "SeriesTypeModels",
    "SlicePrediction",
    "SliceRelevanceConfig",
    "SliceRelevanceReport",
    "accuracy_table",
    "compute_features",
    "cross_validate",
    "dataset_descriptions",
    "feature_names",
    "feature_window",
    "fit_all",
    "fit_axial_roi_from_points",
    "fit_member",
    "fit_series_type",
    "format_table",
    "labelled_series",
    "load_axial_roi",
    "load_cached_features",
    "load_models",
    "load_oof_slices",
    "load_skops",
    "middle_slice",
    "normalise_volume",
    "predict_slices",
    "run_models",
    "run_models_initializer",
    "save_models",
    "series_features",
    "series_slug",
    "slice_features",
    "task_of",
    "tasks_for",
    "train_slice_relevance",
]
