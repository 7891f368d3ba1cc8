"""Built-in functions for reward models (a classification head on the sequence)."""

from __future__ import annotations

import asyncio
import logging
import math

from pydantic import BaseModel, ConfigDict, Field

from scoring_functions.base import ScoreResult, ScoringContext, ScoringFunction
from scoring_functions.numeric import label_logprobs, log_sigmoid, sigmoid
from server.config import ModelKind
from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

LABEL_DESCRIPTION = (
    "Label (name or index) to score, for multi-label heads; default: the model's "
    "`default_label`, else the last label."
)


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

    label: str | int | None = Field(None, description=LABEL_DESCRIPTION)
    shift: float = Field(
        0.0,
        ge=-1e6,
        le=1e6,
        description="Subtracted from the head output, for example the mean reward "
        "on a reference set.",
    )
    scale: float = Field(
        1.0,
        ge=1e-6,
        le=1e6,
        description="Divides the shifted output, for example the standard deviation "
        "of the reward on a reference set.",
    )


class Raw(ScoringFunction):
    """The reward head's output for one label, optionally normalised."""

    name = "builtin::raw"
    description = (
        "score: (head output of the chosen label - shift) / scale. logprob: "
        "log-sigmoid of a single logit, or log-softmax of the chosen label, of the "
        "output before shift and scale."
    )
    model_kinds = frozenset({ModelKind.REWARD})
    Params = RawParams

    async def compute(self, context: ScoringContext, params: RawParams) -> ScoreResult:
        values = await context.classify()
        labels = context.model.labels
        index = select_label(labels, params.label, context.model.config.default_label)
        normalised = params.shift != 0.0 or params.scale != 1.0
        return ScoreResult(
            score=(values[index] - params.shift) / params.scale,
            logprob=label_logprobs(values)[index],
            labels=dict(zip(labels, values, strict=True)),
            detail={"raw_score": values[index]} if normalised else None,
        )


class LabelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | int | None = Field(None, description=LABEL_DESCRIPTION)


class LabelProbability(ScoringFunction):
    """Probability of one label of the reward head."""

    name = "builtin::label_probability"
    description = (
        "score: probability of the chosen label, sigmoid of a single logit or "
        "softmax across labels. logprob: its natural log. detail.probabilities: "
        "the probability of every label."
    )
    model_kinds = frozenset({ModelKind.REWARD})
    Params = LabelParams

    async def compute(
        self, context: ScoringContext, params: LabelParams
    ) -> ScoreResult:
        values = await context.classify()
        labels = context.model.labels
        index = select_label(labels, params.label, context.model.config.default_label)
        logprobs = label_logprobs(values)
        probabilities = {
            label: math.exp(logprob)
            for label, logprob in zip(labels, logprobs, strict=True)
        }
        return ScoreResult(
            score=math.exp(logprobs[index]),
            logprob=logprobs[index],
            labels=dict(zip(labels, values, strict=True)),
            detail={"probabilities": probabilities},
        )


class PairwiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Field(
        description="Reference response that takes the scored response's place in "
        "the same conversation."
    )
    label: str | int | None = Field(None, description=LABEL_DESCRIPTION)


class Pairwise(ScoringFunction):
    """Bradley-Terry probability that the response beats a reference response."""

    name = "builtin::pairwise"
    description = (
        "score: sigmoid(r - r_ref), the Bradley-Terry probability that the response "
        "is preferred to params.reference, where r and r_ref are the head outputs "
        "of the chosen label for each. logprob: log-sigmoid(r - r_ref). "
        "detail: reward, reference_reward."
    )
    model_kinds = frozenset({ModelKind.REWARD})
    Params = PairwiseParams

    async def compute(
        self, context: ScoringContext, params: PairwiseParams
    ) -> ScoreResult:
        try:
            reference = await context.run_blocking(
                context.prepare, context.with_response(params.reference)
            )
        except InvalidRequestError as error:
            # The reference takes the response's place, so errors about the
            # response concern the reference here.
            message = error.message.removeprefix("prompt_with_response: ")
            message = message.replace("shorten the response", "shorten the reference")
            raise InvalidRequestError(
                f"scoring_function.params.reference: scored in place of the "
                f"response, {message}",
                param="scoring_function.params.reference",
            ) from error
        values, reference_values = await asyncio.gather(
            context.classify(), context.classify(reference)
        )
        labels = context.model.labels
        index = select_label(labels, params.label, context.model.config.default_label)
        margin = values[index] - reference_values[index]
        return ScoreResult(
            score=sigmoid(margin),
            logprob=log_sigmoid(margin),
            labels=dict(zip(labels, values, strict=True)),
            detail={
                "reward": values[index],
                "reference_reward": reference_values[index],
            },
        )
