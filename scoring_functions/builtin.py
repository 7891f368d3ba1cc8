"""Built-in scoring functions."""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scoring_functions.base import ScoreResult, ScoringContext, ScoringFunction
from server.config import ModelKind
from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def log_sigmoid(value: float) -> float:
    """Return log(sigmoid(value)) without overflow."""
    if value >= 0:
        return -math.log1p(math.exp(-value))
    return value - math.log1p(math.exp(value))


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def select_label(
    labels: list[str], requested: str | int | None, default: str | int | None
) -> int:
    """Return the index of the requested label, the default, or the last label."""
    choice = requested if requested is not None else default
    if choice is None:
        return len(labels) - 1
    if isinstance(choice, int):
        if 0 <= choice < len(labels):
            return choice
    elif choice in labels:
        return labels.index(choice)
    raise InvalidRequestError(
        f"scoring_function.params.label: {choice!r} is not a label of this model; "
        f"use a name from {labels} or an index from 0 to {len(labels) - 1}",
        param="scoring_function.params.label",
    )


class RawParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | int | None = Field(
        None,
        description="Label (name or index) to report for multi-label heads; "
        "default: the model's `default_label`, else the last label.",
    )


class Raw(ScoringFunction):
    """The reward head's raw output for one label."""

    name = "builtin::raw"
    description = (
        "score: the raw head output (logit) of the chosen label. logprob: "
        "log-sigmoid of a single logit, or log-softmax of the chosen label."
    )
    model_kinds = frozenset({ModelKind.REWARD})
    Params = RawParams

    async def score(self, context: ScoringContext, params: RawParams) -> ScoreResult:
        values = await context.classify()
        labels = context.model.labels
        index = select_label(labels, params.label, context.model.config.default_label)
        if len(values) == 1:
            logprob = log_sigmoid(values[0])
        else:
            logprob = log_softmax(values)[index]
        return ScoreResult(
            score=values[index],
            logprob=logprob,
            labels=dict(zip(labels, values, strict=True)),
        )


class ResponseLogprobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reduction: Literal["sum", "mean"] = Field(
        "sum", description="How to combine the response tokens' log-probabilities."
    )


class ResponseLogprob(ScoringFunction):
    """Log-probability of the response tokens given the prompt."""

    name = "builtin::response_logprob"
    description = (
        "score: the sum or mean of the response tokens' log-probabilities. "
        "logprob: their sum."
    )
    model_kinds = frozenset({ModelKind.GENERATIVE})
    Params = ResponseLogprobParams

    async def score(
        self, context: ScoringContext, params: ResponseLogprobParams
    ) -> ScoreResult:
        if context.conversation.response_tokens == 0:
            raise InvalidRequestError(
                "prompt_with_response: the response has no tokens to score",
                param="prompt_with_response",
            )
        token_logprobs = await context.response_logprobs()
        total = math.fsum(token_logprobs)
        score = total if params.reduction == "sum" else total / len(token_logprobs)
        return ScoreResult(
            score=score,
            logprob=total,
            token_logprobs=token_logprobs if context.options.logprobs else None,
        )


BUILTIN_FUNCTIONS: list[type[ScoringFunction]] = [Raw, ResponseLogprob]

DEFAULT_FUNCTIONS = {
    ModelKind.REWARD: Raw.name,
    ModelKind.GENERATIVE: ResponseLogprob.name,
}
