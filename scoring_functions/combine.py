"""``weighted_sum``: a weighted combination of other scoring functions."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from scoring_functions.base import (
    ALL_MODEL_KINDS,
    ScoreResult,
    ScoringContext,
    ScoringFunction,
    validate_params,
)
from server.errors import InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from server.config import ModelConfig
    from server.engine import ModelEngine

logger = logging.getLogger(__name__)


# Bounds the engine calls that one request can make.
MAX_PARTS = 16
# Keeps weighted sums of ordinary scores far from float overflow.
MAX_WEIGHT = 1e6


def finite_sum(values: Iterable[float]) -> float | None:
    """Return the exact sum of ``values``, or None when it is not finite."""
    try:
        total = math.fsum(values)
    except OverflowError:
        return None
    return total if math.isfinite(total) else None


class Component(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Id or built-in short name.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="The function's own params."
    )
    weight: float = Field(
        1.0,
        ge=-MAX_WEIGHT,
        le=MAX_WEIGHT,
        description="Multiplies the function's score.",
    )


class WeightedSumParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    functions: list[Component] = Field(
        min_length=1,
        max_length=MAX_PARTS,
        description="The functions to combine, with their weights.",
    )


class WeightedSum(ScoringFunction):
    """Weighted sum of other functions' scores on the same conversation."""

    name = "builtin::weighted_sum"
    description = (
        "score: the sum of weight * score over params.functions. logprob: the sum "
        "of their logprobs, the log-probability that every part's outcome holds "
        "if they are independent. detail.components: each part's id, weight, "
        "score, logprob and detail."
    )
    model_kinds = ALL_MODEL_KINDS
    Params = WeightedSumParams

    async def compute(
        self, context: ScoringContext, params: WeightedSumParams
    ) -> ScoreResult:
        parts = [
            self._resolve(context.model, index, component)
            for index, component in enumerate(params.functions)
        ]
        tasks = [
            asyncio.ensure_future(function.score(context.child(), function_params))
            for function, function_params in parts
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # The first failure decides the response; stop the other parts.
            for task in tasks:
                task.cancel()
            raise

        components = [
            {
                "name": function.name,
                "weight": component.weight,
                "score": result.score,
                "logprob": result.logprob,
                "detail": result.detail,
            }
            for (function, _), component, result in zip(
                parts, params.functions, results, strict=True
            )
        ]
        score = finite_sum(
            component.weight * result.score
            for component, result in zip(params.functions, results, strict=True)
        )
        if score is None:
            raise InvalidRequestError(
                "scoring_function.params.functions: the weighted sum of the parts' "
                "scores overflows a 64-bit float; use smaller weights or scales",
                param="scoring_function.params.functions",
            )
        logprob = finite_sum(min(result.logprob, 0.0) for result in results)
        return ScoreResult(
            score=score,
            # Parts that each report a huge finite stand-in for log 0, such as
            # mismatch_logprob, can overflow together. The sum is then taken
            # as the most negative float, the same kind of stand-in.
            logprob=-sys.float_info.max if logprob is None else logprob,
            detail={"components": components},
        )

    def check_defaults(self, model: ModelConfig, params: WeightedSumParams) -> None:
        for index, component in enumerate(params.functions):
            self._resolve(model, index, component)

    def _resolve(
        self, model: ModelConfig | ModelEngine, index: int, component: Component
    ) -> tuple[ScoringFunction, BaseModel]:
        """Return one part's function and validated params; 400 names the field."""
        param = f"scoring_function.params.functions.{index}"
        try:
            function = self.registry.get(component.name)
        except NotFoundError as error:
            raise InvalidRequestError(
                error.message.replace("scoring_function.name", f"{param}.name"),
                param=f"{param}.name",
            ) from error
        if function.name == self.name:
            # Nesting multiplies the engine calls past MAX_PARTS and adds
            # nothing that weights on one level cannot express.
            raise InvalidRequestError(
                f"{param}.name: weighted_sum cannot contain weighted_sum; list the "
                f"inner functions with multiplied weights instead",
                param=f"{param}.name",
            )
        function.check_model_kind(model, f"{param}.name")
        function_params = validate_params(
            function.Params,
            component.params,
            prefix=("scoring_function", "params", "functions", str(index), "params"),
        )
        return function, function_params
