"""Shared pieces of the model benchmarks. The scoring on the phantom's held-out truth (models,
class prior and oracle on the same rows) lives in `lsdc.evaluation`, shared with the demo's
report; it is re-exported here for the benchmark scripts."""

from __future__ import annotations

from lsdc.evaluation import heldout_scores, narrowing_table, oracle_probs, ratio

__all__ = ["heldout_scores", "narrowing_table", "oracle_probs", "ratio"]
