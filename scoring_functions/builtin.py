"""The built-in scoring functions and each model kind's default."""

from __future__ import annotations

import logging

from scoring_functions.base import ScoringFunction
from scoring_functions.combine import WeightedSum
from scoring_functions.generative import Perplexity, ResponseLogprob
from scoring_functions.judge import LlmJudge
from scoring_functions.process import ProcessReward
from scoring_functions.reward import LabelProbability, Pairwise, Raw
from scoring_functions.rules import Contains, ExactMatch, RegexMatch
from server.config import ModelKind

logger = logging.getLogger(__name__)

BUILTIN_FUNCTIONS: list[type[ScoringFunction]] = [
    Raw,
    LabelProbability,
    Pairwise,
    ResponseLogprob,
    Perplexity,
    LlmJudge,
    ProcessReward,
    ExactMatch,
    RegexMatch,
    Contains,
    WeightedSum,
]

DEFAULT_FUNCTIONS = {
    ModelKind.REWARD: Raw.name,
    ModelKind.GENERATIVE: ResponseLogprob.name,
    ModelKind.PROCESS_REWARD: ProcessReward.name,
}
