"""Model files of one series type: skops for scikit-learn, XGBoost JSON, and an index.

Persistence and trust boundary: scikit-learn models are saved with skops and loaded with an
explicit list of trusted types (skops' default-trusted scikit-learn/numpy types plus
`TRUSTED_SKOPS_TYPES`); a file asking for any other type is refused before anything is
constructed. XGBoost models are saved as XGBoost JSON. Nothing in a run folder is unpickled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.fileio import atomic_write_json
from lsdc.preprocess.slice_relevance.models import SeriesTypeModels

# Types beyond skops' default-trusted set (scikit-learn estimators, numpy and builtins) that the
# model files of this package contain. A file asking for any other type is refused at load time.
TRUSTED_SKOPS_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    # The SVM's study-grouped calibration splitter (a parameter, holds only n_splits).
    "sklearn.model_selection._split.GroupKFold",
)


# Packages that importing skops pulls in for nothing: `skops.io` lists scikit-learn's estimators
# with `sklearn.utils.all_estimators`, whose package walk imports scikit-learn's array-API
# adapters for torch and dask, and with them torch and dask themselves: about 2.7 s of a 3.5 s
# import, paid by every preprocessing worker that loads a relevance run. Nothing in those
# adapters is an estimator, so the list (the trusted types) is the same without them.
_SKOPS_NEEDLESS_IMPORTS = frozenset({"torch", "dask"})


class _RefuseImports:
    """A `sys.meta_path` finder under which importing the named packages raises ImportError,
    as if they were not installed. (Not a None entry in `sys.modules`: array-API helpers take
    any entry there for the imported package and look up its attributes.)"""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is not imported while skops loads")


def _skops_io() -> Any:
    """`skops.io`, imported without torch and dask where neither is imported yet."""
    if "skops.io" not in sys.modules:
        import sklearn.utils  # noqa: F401 - imported as usual; only skops' walk runs refused

        refused = frozenset(m for m in _SKOPS_NEEDLESS_IMPORTS if m not in sys.modules)
        # The walk skips a package whose import raises ImportError (it imports the adapters
        # only to list their modules); the finder goes right after.
        finder = _RefuseImports(refused)
        sys.meta_path.insert(0, finder)
        try:
            import skops.io  # noqa: F401
        finally:
            sys.meta_path.remove(finder)
    import skops.io as sio

    return sio


def save_models(m: SeriesTypeModels, folder: str | Path) -> Path:
    """Write one series type's models: skops for scikit-learn, JSON for XGBoost, plus index."""
    sio = _skops_io()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, model in m.models.items():
        if name == "xgboost":
            # The extension picks XGBoost's format: keep ".json" on the temporary file too.
            tmp = folder / f".{name}.tmp.json"
            model.save_model(tmp)
            tmp.replace(folder / f"{name}.json")
            files[name] = f"{name}.json"
        else:
            from lsdc.fileio import atomic_write_bytes

            atomic_write_bytes(folder / f"{name}.skops", sio.dumps(model))
            files[name] = f"{name}.skops"
    atomic_write_json(
        folder / "models.json",
        {
            "series_type": m.series_type,
            "tasks": list(m.tasks),
            "classes": m.classes.tolist(),
            "files": files,
            "weights": m.weights,
        },
    )
    return folder


def load_skops(path: str | Path) -> Any:
    """Load a skops file whose types are all in `TRUSTED_SKOPS_TYPES`; refuse anything else."""
    sio = _skops_io()

    data = Path(path).read_bytes()
    untrusted = sio.get_untrusted_types(data=data)
    unknown = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if unknown:
        raise ValueError(f"{path}: refuses to load untrusted types {unknown}")
    return sio.loads(data, trusted=[t for t in untrusted if t in TRUSTED_SKOPS_TYPES])


def load_models(folder: str | Path, *, voting_only: bool = False) -> SeriesTypeModels:
    """Inverse of `save_models`. `voting_only` loads only the members whose vote weight is not
    0: all that `SeriesTypeModels.ensemble_proba` runs, with the same bits (a weight-0 member
    adds exactly 0.0 to the vote and to its total). Inference wants that: the vote usually
    gives the RandomForest weight 0, and its file is most of a run's load time."""
    folder = Path(folder)
    index = json.loads((folder / "models.json").read_text())
    weights = {k: float(v) for k, v in index["weights"].items()}
    models = {}
    for name, file in index["files"].items():
        if voting_only and weights[name] == 0:
            continue
        if name == "xgboost":
            from xgboost import XGBClassifier

            model = XGBClassifier()
            model.load_model(folder / file)
        else:
            model = load_skops(folder / file)
        models[name] = model
    return SeriesTypeModels(
        series_type=index["series_type"],
        tasks=tuple(index["tasks"]),
        classes=np.asarray(index["classes"], dtype=np.int64),
        models=models,
        weights=weights,
    )
