"""Inference from a run folder: fold models -> per-study probabilities (n, 25, 3).

`Predictor.from_run(run_dir)` reads only the run folder (run.json for the family, model name and
keyword config; fold<k>/model.safetensors for the weights) and averages the fold models'
probabilities. With `tta_flip`, each study is also predicted mirrored left/right and the
mirrored prediction mapped back, which makes the result exactly left/right equivariant.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class Predictions:
    study_ids: np.ndarray  # (n,) int64
    probs: np.ndarray  # (n, 25, 3) float64, rows sum to 1

    def to_submission(self):
        from lsdc.inference.submission import build_submission

        return build_submission(self.study_ids.tolist(), self.probs)


@dataclass
class _Family:
    """How inference feeds one model family from a cache folder."""

    dataset: Callable[[str | Path, Sequence[int] | None], Dataset]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    mirror_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    study_ids: Callable[[Dataset], list[int]]


def _sequence_family() -> _Family:
    from lsdc.data.sequence import SequenceDataset, collate_sequence, mirror_images

    def mirror(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "images": mirror_images(batch["images"])}

    return _Family(
        dataset=lambda cache, ids: SequenceDataset(cache, ids),
        collate=collate_sequence,
        mirror_batch=mirror,
        study_ids=lambda ds: list(ds.study_ids),
    )


# Family name (run.json "task") -> how to feed it. The multitask family adds its entry here.
FAMILIES: dict[str, Callable[[], _Family]] = {"sequence": _sequence_family}


def _strip_split(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "split"}


class Predictor:
    """Fold-averaged predictions of one run folder."""

    def __init__(
        self,
        run_dir: Path,
        info: dict[str, Any],
        models: list[nn.Module],
        device: torch.device,
        tta_flip: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.info = info
        self.models = models
        self.device = device
        self.family = FAMILIES[info["task"]]()
        if tta_flip and self.family.mirror_batch is None:
            raise ValueError(f"{run_dir}: family {info['task']!r} has no left/right mirror")
        self.tta_flip = tta_flip

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        folds: Sequence[int] | None = None,
        device: str = "auto",
        tta_flip: bool = False,
    ) -> Predictor:
        from lsdc.models.registry import build_model
        from lsdc.training.engine import RUN_FILE, load_model_weights

        run_dir = Path(run_dir)
        info_path = run_dir / RUN_FILE
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: not a run folder (no {RUN_FILE})")
        info = json.loads(info_path.read_text())
        if info.get("task") not in FAMILIES:
            raise ValueError(f"{info_path}: unknown model family {info.get('task')!r}")
        wanted = list(info["folds"]) if folds is None else [int(k) for k in folds]
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        models = []
        for k in wanted:
            path = run_dir / f"fold{k}" / info.get("model_file", "model.safetensors")
            if not path.exists():
                raise FileNotFoundError(f"{path}: fold {k} has no trained weights")
            model = build_model(info["model_name"], **info["model_kwargs"])
            models.append(load_model_weights(model, path).to(dev).eval())
        if not models:
            raise ValueError(f"{run_dir}: no folds to predict with")
        return cls(run_dir, info, models, dev, tta_flip=tta_flip)

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A collated batch -> probabilities (B, 25, 3), mean over folds (and the mirror)."""
        from lsdc.data.sequence import mirror_targets

        batch = {k: v.to(self.device) for k, v in batch.items()}
        views = [(batch, False)]
        if self.tta_flip:
            views.append((self.family.mirror_batch(batch), True))
        total = None
        for model in self.models:
            for view, mirrored in views:
                probs = model(view)["logits"].float().softmax(-1)  # (B, 25, 3)
                if mirrored:
                    probs = mirror_targets(probs, dim=1)
                total = probs if total is None else total + probs
        return (total / (len(self.models) * len(views))).cpu()

    def check_cache(self, cache_dir: str | Path) -> None:
        """Refuse a cache made with other preprocessing settings than the training cache."""
        from lsdc.preprocess.cache import StudyCache

        trained = self.info.get("cache_config")
        if trained is None:
            return
        found = StudyCache.open(cache_dir).config
        if _strip_split(found) != _strip_split(trained):
            diff = sorted(
                k
                for k in set(found) | set(trained)
                if k != "split" and found.get(k) != trained.get(k)
            )
            raise ValueError(
                f"{cache_dir}: preprocessed with other settings than the run's training cache "
                f"(differs in {', '.join(diff)}); preprocess with the same configuration"
            )

    def predict_cache(
        self,
        cache_dir: str | Path,
        study_ids: Sequence[int] | None = None,
        *,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> Predictions:
        """Probabilities for every study of a cache (or `study_ids`)."""
        self.check_cache(cache_dir)
        ds = self.family.dataset(cache_dir, study_ids)
        loader = DataLoader(
            ds, batch_size=batch_size, collate_fn=self.family.collate, num_workers=num_workers
        )
        ids, probs = [], []
        for batch in loader:
            ids.append(batch["study_id"].numpy())
            probs.append(self.predict_batch(batch).numpy())
        all_probs = np.concatenate(probs).astype(np.float64)
        all_probs /= all_probs.sum(axis=-1, keepdims=True)
        return Predictions(np.concatenate(ids).astype(np.int64), all_probs)


@dataclass
class SubmissionReport:
    path: Path
    predicted: int  # studies predicted by the model
    filled: list[int]  # listed studies absent from the cache, given the training class prior


def predict_submission(
    run_dir: str | Path,
    cache_dir: str | Path,
    out_csv: str | Path,
    *,
    series_descriptions: str | Path | None = None,
    tta_flip: bool = False,
    device: str = "auto",
) -> SubmissionReport:
    """Run folder + preprocessed cache -> a complete submission CSV (written atomically).

    With `series_descriptions`, every study it lists gets 25 rows: a study the cache lacks
    (its preprocessing failed, see the cache's errors.jsonl) gets the class prior of the run's
    training labels and is named in the report, so the submission stays valid and nothing is
    hidden.
    """
    from lsdc.fileio import load_npz
    from lsdc.inference.submission import build_submission, write_submission
    from lsdc.io.tables import read_series_descriptions
    from lsdc.training.engine import class_prior

    predictor = Predictor.from_run(run_dir, device=device, tta_flip=tta_flip)
    preds = predictor.predict_cache(cache_dir)
    ids, probs = preds.study_ids.tolist(), preds.probs
    filled: list[int] = []
    if series_descriptions is not None:
        listed = sorted(set(read_series_descriptions(series_descriptions)["study_id"].tolist()))
        cached = set(ids)
        filled = [s for s in listed if s not in cached]
        if filled:
            arrays, _ = load_npz(Path(run_dir) / "oof.npz")
            prior = class_prior(arrays["labels"])
            ids = ids + filled
            probs = np.concatenate([probs, np.broadcast_to(prior, (len(filled), *prior.shape))])
    path = write_submission(build_submission(ids, probs), out_csv)
    return SubmissionReport(Path(path), len(preds.study_ids), filled)
