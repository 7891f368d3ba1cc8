"""The scoring-function interface: what a function declares, gets and returns."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from server.config import ModelKind
from server.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.chat import TokenizedConversation
    from server.engine import ModelEngine
    from server.protocol import Options

logger = logging.getLogger(__name__)


class NoParams(BaseModel):
    """Parameters of a function that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ScoreResult:
    """What a scoring function returns for one conversation."""

    score: float
    logprob: float
    labels: dict[str, float] | None = None
    steps: list[float] | None = None
    token_logprobs: list[float] | None = None
    detail: dict[str, Any] | None = None


class ScoringContext:
    """The model, conversation and options of one request, with engine calls.

    ``conversation`` is already rendered, tokenized and fitted to the context
    by the request's truncation policy.
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
        self._calls = 0
        self.conversation = self.prepare(messages)

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

    def next_request_id(self) -> str:
        """Return a unique engine request id for this request's next call."""
        self._calls += 1
        return f"{self.request_id}-{self._calls}"

    async def classify(
        self, conversation: TokenizedConversation | None = None
    ) -> list[float]:
        """Return the reward head's raw outputs for a conversation."""
        conversation = conversation or self.conversation
        return await self.model.classify(
            conversation.token_ids, self.next_request_id(), self.options.priority
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


def _cut_after_response(conversation: TokenizedConversation) -> TokenizedConversation:
    from dataclasses import replace

    return replace(
        conversation, token_ids=conversation.token_ids[: conversation.response_end]
    )


class ScoringFunction(ABC):
    """Base class of scoring functions.

    Subclasses set ``name``, ``model_kinds`` and ``Params`` (a pydantic model
    validated from the request's ``scoring_function.params``), and implement
    ``score``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    model_kinds: ClassVar[frozenset[ModelKind]]
    Params: ClassVar[type[BaseModel]] = NoParams

    @abstractmethod
    async def score(self, context: ScoringContext, params: BaseModel) -> ScoreResult:
        """Score ``context.conversation`` and return the result."""
