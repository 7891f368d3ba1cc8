"""Built-in functions on the log-probabilities of a generative model."""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scoring_functions.base import (
    NoParams,
    ScoreResult,
    ScoringContext,
    ScoringFunction,
)
from server.config import ModelKind
from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)


async def response_token_logprobs(context: ScoringContext) -> list[float]:
    """Return the response tokens' log-probabilities; 400 if there are none."""
    if context.conversation.response_tokens == 0:
        raise InvalidRequestError(
            "prompt_with_response: the response has no tokens to score",
            param="prompt_with_response",
        )
    return await context.response_logprobs()


class ResponseLogprobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reduction: Literal["sum", "mean", "min"] = Field(
        "sum",
        description="How to combine the response tokens' log-probabilities: "
        "`sum`, `mean` or `min` (the least likely token).",
    )


class ResponseLogprob(ScoringFunction):
    """Log-probability of the response tokens given the prompt."""

    name = "builtin::response_logprob"
    description = (
        "score: the sum, mean or minimum of the response tokens' log-probabilities. "
        "logprob: their sum, log P(response | prompt)."
    )
    model_kinds = frozenset({ModelKind.GENERATIVE})
    Params = ResponseLogprobParams

    async def compute(
        self, context: ScoringContext, params: ResponseLogprobParams
    ) -> ScoreResult:
        token_logprobs = await response_token_logprobs(context)
        total = math.fsum(token_logprobs)
        if params.reduction == "sum":
            score = total
        elif params.reduction == "mean":
            score = total / len(token_logprobs)
        else:
            score = min(token_logprobs)
        return ScoreResult(
            score=score,
            logprob=total,
            token_logprobs=token_logprobs if context.options.logprobs else None,
        )


class Perplexity(ScoringFunction):
    """Perplexity of the response given the prompt; lower is more likely."""

    name = "builtin::perplexity"
    description = (
        "score: exp(-mean log-probability of the response tokens), at least 1 and "
        "lower for likelier responses. logprob: the sum of the log-probabilities."
    )
    model_kinds = frozenset({ModelKind.GENERATIVE})
    Params = NoParams

    async def compute(self, context: ScoringContext, params: NoParams) -> ScoreResult:
        token_logprobs = await response_token_logprobs(context)
        total = math.fsum(token_logprobs)
        return ScoreResult(
            score=math.exp(-total / len(token_logprobs)),
            logprob=total,
            token_logprobs=token_logprobs if context.options.logprobs else None,
        )
