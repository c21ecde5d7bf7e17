"""The configuration of a slice-relevance run."""

from __future__ import annotations

from dataclasses import dataclass, field

from lsdc.preprocess.slice_relevance.features import FeatureConfig
from lsdc.preprocess.slice_relevance.models import ModelConfig


@dataclass
class SliceRelevanceConfig:
    """`lsdc train slice-relevance` configuration."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    folds: int = 5
    seed: int = 0
    max_studies: int = 0  # 0 = every study with coordinates; else the first N (sorted ids)
    # Vote weights fitted on out-of-fold probabilities (likelihood of the labelled slices), on a
    # grid of steps 1 / vote_steps over the simplex (`vote.fit_vote_weights`); 0 = equal weights.
    vote_steps: int = 10
