"""Score one request: resolve the model and function, run it, build the response."""

from __future__ import annotations

import logging
import math
import uuid

from pydantic import BaseModel

from scoring_functions.base import (
    ScoreResult,
    ScoringContext,
    ScoringFunction,
    validate_params,
)
from scoring_functions.builtin import DEFAULT_FUNCTIONS
from scoring_functions.registry import ScoringFunctionRegistry
from server.engine import ModelEngine
from server.errors import (
    InvalidRequestError,
    ModelOutputError,
    NotFoundError,
)
from server.protocol import (
    RewardModelScoringRequest,
    RewardModelScoringResponse,
    Usage,
)
from server.protocol import ScoringFunction as ScoringFunctionSpec

logger = logging.getLogger(__name__)


def new_request_id() -> str:
    return f"rms-{uuid.uuid4().hex}"


class ScoringService:
    """Scores conversations with the served models."""

    def __init__(
        self, models: dict[str, ModelEngine], registry: ScoringFunctionRegistry
    ) -> None:
        self.models = models
        self.registry = registry

    def find_model(self, model_id: str) -> ModelEngine:
        """Return a served model, ready or not; 404 names the served ids."""
        model = self.models.get(model_id)
        if model is None:
            raise NotFoundError(
                f"reward_model: unknown model {model_id!r}; served models: "
                f"{', '.join(sorted(self.models))}",
                param="reward_model",
            )
        return model

    def get_model(self, model_id: str) -> ModelEngine:
        """Return a ready model; 404 names the served ids, 503 if not ready."""
        model = self.find_model(model_id)
        model.check_ready()
        return model

    def resolve_function(
        self, model: ModelEngine, spec: ScoringFunctionSpec | None
    ) -> tuple[ScoringFunction, BaseModel]:
        """Return the function a request names (or the kind's default) and its params.

        The model's configured ``scoring_params`` fill the params that the
        request leaves out. Raises NotFoundError for an unknown function and
        InvalidRequestError for one that does not suit the model's kind or for
        invalid params.
        """
        function = self.registry.get(
            spec.name if spec else DEFAULT_FUNCTIONS[model.kind]
        )
        function.check_model_kind(model, "scoring_function.name")
        defaults = function.model_defaults(model.config.scoring_params)
        params = {**defaults, **(spec.params if spec else {})}
        return function, validate_params(function.Params, params)

    async def score(
        self,
        request: RewardModelScoringRequest,
        request_id: str | None = None,
    ) -> RewardModelScoringResponse:
        """Score the request's final assistant message."""
        request_id = request_id or new_request_id()
        messages = request.prompt_with_response
        if messages[-1].role != "assistant":
            raise InvalidRequestError(
                f"prompt_with_response: the last message must be the assistant "
                f"response to score, but its role is {messages[-1].role!r}",
                param="prompt_with_response",
            )

        model = self.get_model(request.reward_model)
        function, params = self.resolve_function(model, request.scoring_function)

        options = request.options
        truncation = options.truncation or model.config.truncation
        context = await ScoringContext.create(
            request_id,
            model,
            [message.to_template_dict() for message in messages],
            options,
            truncation,
        )
        result = await function.score(context, params)
        check_result(result, model.id, request_id)

        conversation = context.conversation
        return RewardModelScoringResponse(
            id=request_id,
            score=result.score,
            logprob=min(result.logprob, 0.0),
            reward_model=model.id,
            scoring_function=function.name,
            labels=result.labels,
            steps=result.steps,
            token_logprobs=result.token_logprobs,
            detail=result.detail,
            usage=Usage(
                prompt_tokens=len(conversation.token_ids),
                response_tokens=conversation.response_tokens,
                truncated_tokens=conversation.truncated_tokens,
            ),
            token_ids=conversation.token_ids if options.return_token_ids else None,
            response_start=(
                conversation.response_start if options.return_token_ids else None
            ),
        )


def check_result(result: ScoreResult, model_id: str, request_id: str) -> None:
    """Raise ModelOutputError when a score or logprob is not a finite number."""
    values = [("score", result.score), ("logprob", result.logprob)]
    values += [(f"labels.{k}", v) for k, v in (result.labels or {}).items()]
    values += [("steps", v) for v in result.steps or []]
    for name, value in values:
        if not math.isfinite(value):
            raise ModelOutputError(
                f"model {model_id} produced a non-finite {name} ({value}) for "
                f"request {request_id}"
            )
