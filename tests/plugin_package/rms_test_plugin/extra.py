"""Scoring functions that a server loads by naming this module in its config."""

from __future__ import annotations

import logging

from scoring_functions import NoParams, ScoreResult, ScoringContext, ScoringFunction
from server.config import ModelKind

logger = logging.getLogger(__name__)


class WordCount(ScoringFunction):
    """Number of whitespace-separated words in the response."""

    name = "rms_test_plugin::word_count"
    description = "score: the number of words in the response. logprob: 0.0."
    model_kinds = frozenset(ModelKind)
    Params = NoParams

    async def compute(self, context: ScoringContext, params: NoParams) -> ScoreResult:
        return ScoreResult(score=float(len(context.response_text.split())), logprob=0.0)


SCORING_FUNCTIONS = [WordCount]
