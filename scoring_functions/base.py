"""The scoring-function interface: what a function declares, gets and returns."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from server.config import ModelConfig, ModelKind
from server.errors import (
    InvalidRequestError,
    ServiceError,
    describe_validation_errors,
)

if TYPE_CHECKING:
    from scoring_functions.registry import ScoringFunctionRegistry
    from server.chat import TokenizedConversation
    from server.engine import Generation, ModelEngine, TokenLogits
    from server.protocol import Options

logger = logging.getLogger(__name__)

ALL_MODEL_KINDS = frozenset(ModelKind)
# Conversations with more characters than this are rendered and tokenized in a
# worker thread. Tokenizing 100,000 characters took about 60 ms on one core here.
OFFLOAD_CHARS = 100_000
T = TypeVar("T")


class NoParams(BaseModel):
    """Parameters of a function that takes none."""

    model_config = ConfigDict(extra="forbid")


class UnparseableOutputError(ServiceError):
    """A generative model's output could not be turned into a score (HTTP 422).

    It concerns one conversation, so a batch job records it for that line and
    goes on. It is never reported as a score of 0.
    """

    status_code = 422
    error_type = "unparseable_output_error"


@dataclass
class ScoreResult:
    """Result of a scoring function for one conversation.

    ``logprob`` is a natural-log probability, finite and at most 0; each function
    documents what it is the probability of.
    """

    score: float
    logprob: float
    labels: dict[str, float] | None = None
    steps: list[float] | None = None
    token_logprobs: list[float] | None = None
    detail: dict[str, Any] | None = None


class ScoringContext:
    """The model, conversation and options of one request, with engine calls.

    ``conversation`` is already rendered, tokenized and fitted to the context
    by the request's truncation policy. A function that sends the engine a
    different sequence in its place (a judge prompt) assigns that sequence to
    ``conversation``, so that the response's ``usage`` and ``token_ids`` describe
    what was scored.
    """

    def __init__(
        self,
        request_id: str,
        model: ModelEngine,
        messages: list[dict[str, Any]],
        options: Options,
        truncation: str,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.messages = messages
        self.options = options
        self.truncation = truncation
        self._call_numbers = itertools.count(1)
        self.offload = (
            sum(len(message["content"]) for message in messages) > OFFLOAD_CHARS
        )
        self.conversation: TokenizedConversation | None = None

    @classmethod
    async def create(
        cls,
        request_id: str,
        model: ModelEngine,
        messages: list[dict[str, Any]],
        options: Options,
        truncation: str,
    ) -> ScoringContext:
        """Return a context whose ``conversation`` is prepared."""
        context = cls(request_id, model, messages, options, truncation)
        context.conversation = await context.run_blocking(context.prepare, messages)
        return context

    async def run_blocking(self, function: Callable[..., T], *args: Any) -> T:
        """Call a rendering or tokenizing function.

        For a long conversation the call runs in a worker thread, where the
        tokenizer releases the GIL, so the event loop goes on serving other
        requests meanwhile.
        """
        if self.offload:
            return await asyncio.to_thread(function, *args)
        return function(*args)

    @property
    def response_text(self) -> str:
        """The text of the final (assistant) message that is scored."""
        return self.messages[-1]["content"]

    @property
    def max_tokens(self) -> int:
        """Most tokens one engine request of this model may hold."""
        # A generate request needs room for the one token it produces.
        limit = self.model.max_model_len
        return limit - 1 if self.model.kind == ModelKind.GENERATIVE else limit

    def prepare(self, messages: list[dict[str, Any]]) -> TokenizedConversation:
        """Render, tokenize and fit a conversation ending in the response."""
        from server.chat import fit_to_context

        conversation = self.model.renderer.tokenize(messages)
        if self.model.kind == ModelKind.GENERATIVE:
            # Tokens after the response cannot change its log-probabilities.
            conversation = _cut_after_response(conversation)
        return fit_to_context(
            conversation,
            self.max_tokens,
            self.truncation,
            self.model.renderer.bos_token_id,
        )

    def with_response(self, response: str) -> list[dict[str, Any]]:
        """Return the request's messages with the final message's text replaced."""
        return [*self.messages[:-1], {**self.messages[-1], "content": response}]

    def child(self) -> ScoringContext:
        """Return a context for one part of a combined score.

        The child shares the engine request ids, so they stay unique, but has its
        own ``conversation``, so a part that replaces it does not affect the rest.
        """
        child = object.__new__(ScoringContext)
        child.__dict__.update(self.__dict__)
        return child

    def next_request_id(self) -> str:
        """Return a unique engine request id for this request's next call."""
        return f"{self.request_id}-{next(self._call_numbers)}"

    async def classify(
        self, conversation: TokenizedConversation | None = None
    ) -> list[float]:
        """Return the reward head's raw outputs for a conversation."""
        conversation = conversation or self.conversation
        return await self.model.classify(
            conversation.token_ids, self.next_request_id(), self.options.priority
        )

    async def classify_steps(
        self, conversation: TokenizedConversation, step_tag_id: int
    ) -> TokenLogits:
        """Return the head's raw outputs at each ``step_tag_id`` token, in order."""
        return await self.model.classify_tokens(
            conversation.token_ids,
            self.next_request_id(),
            step_tag_id=step_tag_id,
            priority=self.options.priority,
        )

    async def response_logprobs(
        self, conversation: TokenizedConversation | None = None
    ) -> list[float]:
        """Return the log-probability of each response token given what precedes it."""
        conversation = conversation or self.conversation
        if conversation.response_start < 1:
            raise InvalidRequestError(
                "prompt_with_response: the response is the first token, so it has no "
                "context to be scored against",
                param="prompt_with_response",
            )
        values = await self.model.prompt_logprobs(
            conversation.token_ids, self.next_request_id(), self.options.priority
        )
        return values[conversation.response_start : conversation.response_end]

    async def next_token_logprobs(
        self, token_ids: list[int], candidate_ids: list[int]
    ) -> dict[int, float]:
        """Return log P(candidate | token_ids) for each candidate next token."""
        return await self.model.next_token_logprobs(
            token_ids, candidate_ids, self.next_request_id(), self.options.priority
        )

    async def sample(
        self, token_ids: list[int], max_tokens: int, temperature: float, top_p: float
    ) -> Generation:
        """Generate a continuation of ``token_ids``."""
        return await self.model.sample(
            token_ids,
            self.next_request_id(),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            priority=self.options.priority,
        )


def _cut_after_response(conversation: TokenizedConversation) -> TokenizedConversation:
    return replace(
        conversation, token_ids=conversation.token_ids[: conversation.response_end]
    )


class ScoringFunction(ABC):
    """Base class of scoring functions.

    Subclasses set ``name`` (a namespaced id such as ``acme::length``),
    ``model_kinds`` (the kinds of served model it can use) and ``Params`` (a
    pydantic model validated from the request's ``scoring_function.params``),
    and implement ``compute``. Callers use ``score``, which first fills in the
    model's configured defaults (``scoring_params``).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    model_kinds: ClassVar[frozenset[ModelKind]]
    Params: ClassVar[type[BaseModel]] = NoParams

    # The registry that contains this function, set when it is registered; lets a
    # function call other functions.
    registry: ScoringFunctionRegistry | None = None

    @property
    def short_name(self) -> str:
        """The id without its namespace."""
        return self.name.partition("::")[2]

    async def score(self, context: ScoringContext, params: BaseModel) -> ScoreResult:
        """Score ``context.conversation`` with the model's defaults filled in."""
        params = self.apply_model_defaults(context.model.config.scoring_params, params)
        return await self.compute(context, params)

    @abstractmethod
    async def compute(self, context: ScoringContext, params: BaseModel) -> ScoreResult:
        """Score ``context.conversation`` and return the result."""

    def check_model_kind(self, model: ModelEngine | ModelConfig, param: str) -> None:
        """Raise InvalidRequestError unless ``model`` is of a kind this function uses.

        The error names ``param``.
        """
        if model.kind in self.model_kinds:
            return
        kinds = " or ".join(sorted(kind.value for kind in self.model_kinds))
        raise InvalidRequestError(
            f"{param}: {self.name} needs a {kinds} model, but {model.id} is a "
            f"{model.kind.value} model",
            param=param,
        )

    def check_defaults(self, model: ModelConfig, params: BaseModel) -> None:
        """Check a model's default params at start-up, beyond their schema.

        Raises InvalidRequestError. Functions that use other functions, such as
        weighted_sum, check them here. The default checks nothing.
        """
        return None

    def model_defaults(self, scoring_params: dict[str, dict[str, Any]]) -> dict:
        """Return this function's entry of a model's ``scoring_params``."""
        return scoring_params.get(self.name) or scoring_params.get(self.short_name, {})

    def apply_model_defaults(
        self, scoring_params: dict[str, dict[str, Any]], params: BaseModel
    ) -> BaseModel:
        """Fill the parameters that the request left unset from the model's config."""
        defaults = self.model_defaults(scoring_params)
        if not defaults:
            return params
        explicit = params.model_dump(mode="json", include=params.model_fields_set)
        return validate_params(self.Params, {**defaults, **explicit})

    def describe(self) -> dict[str, Any]:
        """Return the id, kinds, description and params JSON Schema of the function."""
        return {
            "id": self.name,
            "description": self.description,
            "model_kinds": sorted(kind.value for kind in self.model_kinds),
            "parameters": self.Params.model_json_schema(),
        }


def parse_params(params_model: type[BaseModel], params: dict[str, Any]) -> BaseModel:
    """Validate params as strict JSON; raise pydantic's ValidationError.

    Strict, so that ``"1"`` is not taken for a number nor ``true`` for a
    label index. Params that are not JSON, such as a mapping with integer
    keys from a YAML file, raise TypeError.
    """
    return params_model.model_validate_json(orjson.dumps(params), strict=True)


def validate_params(
    params_model: type[BaseModel],
    params: dict[str, Any],
    prefix: tuple[str, ...] = ("scoring_function", "params"),
) -> BaseModel:
    """Validate params; InvalidRequestError names the first invalid parameter."""
    check_finite_numbers(params, prefix)
    try:
        return parse_params(params_model, params)
    except ValidationError as error:
        param, message = describe_validation_errors(error.errors(), prefix=prefix)
        raise InvalidRequestError(message, param=param) from error


def check_finite_numbers(value: Any, location: tuple[str, ...]) -> None:
    """Raise InvalidRequestError for a NaN or infinite number anywhere in ``value``.

    Python's JSON parser accepts ``NaN`` and ``Infinity``, and pydantic's float
    fields accept them too, but no parameter has a use for them.
    """
    if isinstance(value, float) and not math.isfinite(value):
        param = ".".join(location)
        raise InvalidRequestError(
            f"{param}: must be a finite number, got {value}", param=param
        )
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite_numbers(item, (*location, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_finite_numbers(item, (*location, str(index)))
