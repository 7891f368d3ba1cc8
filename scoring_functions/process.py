"""``process_reward``: per-step rewards from a process reward model."""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scoring_functions.base import ScoreResult, ScoringContext, ScoringFunction
from scoring_functions.judge import single_token_id
from scoring_functions.numeric import label_logprobs, logsumexp
from scoring_functions.reward import select_label
from server.config import ModelKind
from server.errors import InvalidRequestError, ModelOutputError

logger = logging.getLogger(__name__)


class ProcessRewardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step_tag: str | None = Field(
        None,
        min_length=1,
        description="The model's step tag, a single token placed after each step, "
        "such as `<extra_0>` for Qwen2.5-Math-PRM. Usually set once in the model's "
        "`scoring_params`.",
    )
    separator: str = Field(
        "\n\n",
        min_length=1,
        description="Text that separates steps in the response; whitespace around "
        "steps and empty steps are dropped.",
    )
    aggregation: Literal["min", "mean", "last", "product"] = Field(
        "min", description="How the step probabilities combine into `score`."
    )
    label: str | int | None = Field(
        None,
        description="Label (name or index) whose probability is a step's value; "
        "default: the model's `default_label`, else the last label (the positive "
        "one for Qwen2.5-Math-PRM).",
    )


def split_steps(response: str, separator: str) -> list[str]:
    """Split a response into stripped, non-empty steps."""
    return [step.strip() for step in response.split(separator) if step.strip()]


def aggregate_logprobs(step_logprobs: list[float], aggregation: str) -> float:
    """Return the log of the aggregated step probabilities."""
    if aggregation == "min":
        return min(step_logprobs)
    if aggregation == "last":
        return step_logprobs[-1]
    if aggregation == "product":
        return math.fsum(step_logprobs)
    return logsumexp(step_logprobs) - math.log(len(step_logprobs))


class ProcessReward(ScoringFunction):
    """Scores each step of the response with a process reward model."""

    name = "builtin::process_reward"
    description = (
        "The response is split at params.separator and the step tag is placed "
        "after each step. steps: each step's probability of the chosen label "
        "(softmax across the head's labels at the step tag). score: their min, "
        "mean, last or product. logprob: the natural log of score."
    )
    model_kinds = frozenset({ModelKind.PROCESS_REWARD})
    Params = ProcessRewardParams

    async def compute(
        self, context: ScoringContext, params: ProcessRewardParams
    ) -> ScoreResult:
        if params.step_tag is None:
            raise InvalidRequestError(
                f"scoring_function.params.step_tag: missing; set it in the request "
                f"or in the scoring_params of model {context.model.id}",
                param="scoring_function.params.step_tag",
            )
        tokenizer = context.model.renderer.tokenizer
        tag_id = single_token_id(tokenizer, params.step_tag, "step_tag")
        steps = split_steps(context.response_text, params.separator)
        if not steps:
            raise InvalidRequestError(
                "prompt_with_response: the response has no steps to score",
                param="prompt_with_response",
            )
        if any(params.step_tag in step for step in steps):
            raise InvalidRequestError(
                f"prompt_with_response: the response contains the step tag "
                f"{params.step_tag!r}, which may only mark the end of a step",
                param="prompt_with_response",
            )
        tagged = "".join(step + params.step_tag for step in steps)
        context.conversation = await context.run_blocking(
            context.prepare, context.with_response(tagged)
        )

        step_logits = await self._step_logits(context, tag_id, len(steps))
        labels = context.model.labels
        index = select_label(labels, params.label, context.model.config.default_label)
        step_logprobs = [label_logprobs(row)[index] for row in step_logits]
        logprob = aggregate_logprobs(step_logprobs, params.aggregation)
        return ScoreResult(
            score=math.exp(logprob),
            logprob=logprob,
            steps=[math.exp(value) for value in step_logprobs],
            detail={"step_logits": step_logits},
        )

    async def _step_logits(
        self, context: ScoringContext, tag_id: int, step_count: int
    ) -> list[list[float]]:
        """Return the head outputs at the response's step tags, one row per step."""
        conversation = context.conversation
        positions = [i for i, t in enumerate(conversation.token_ids) if t == tag_id]
        outputs = await context.classify_steps(conversation, tag_id)
        if len(outputs.rows) != len(positions):
            raise ModelOutputError(
                f"model {context.model.id} returned {len(outputs.rows)} step rows "
                f"for {len(positions)} step tags (request {context.request_id}); "
                f"check that it is served with step pooling"
            )
        # Step tags that the prompt itself contains also get rows; only the
        # response's own count.
        rows = [
            row
            for row, position in zip(outputs.rows, positions, strict=True)
            if position >= conversation.response_start
        ]
        if len(rows) != step_count:
            raise InvalidRequestError(
                f"prompt_with_response: {step_count} steps were tagged but "
                f"{len(rows)} step tags follow the response start, so the chat "
                f"template changes the response",
                param="prompt_with_response",
            )
        return rows
