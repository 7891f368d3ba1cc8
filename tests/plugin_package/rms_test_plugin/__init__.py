"""A third-party scoring function, registered through an entry point."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scoring_functions import ScoreResult, ScoringContext, ScoringFunction
from server.config import ModelKind

logger = logging.getLogger(__name__)


class ResponseLengthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unit: Literal["tokens", "characters"] = Field(
        "tokens", description="What to count in the response."
    )


class ResponseLength(ScoringFunction):
    """Length of the response; it needs no model output."""

    name = "rms_test_plugin::response_length"
    description = (
        "score: the number of response tokens or characters. logprob: 0.0, "
        "because a count is certain."
    )
    model_kinds = frozenset(ModelKind)
    Params = ResponseLengthParams

    async def compute(
        self, context: ScoringContext, params: ResponseLengthParams
    ) -> ScoreResult:
        if params.unit == "tokens":
            length = context.conversation.response_tokens
        else:
            length = len(context.response_text)
        return ScoreResult(score=float(length), logprob=0.0)
