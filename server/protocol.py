"""Wire models of the scoring API.

Schema names follow the API specification (``Message``, ``Options``,
``ScoringFunction``); fields beyond the specification are marked as extensions
in their descriptions.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


def check_encodable(text: str) -> str:
    """Reject text that cannot be UTF-8 encoded, such as a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"contains an unpaired surrogate ({text[error.start]!r} at character "
            f"{error.start}); send valid Unicode text"
        ) from error
    return text


# Message text that the tokenizer can encode.
Text = Annotated[str, AfterValidator(check_encodable)]


class TextPart(BaseModel):
    """One text part of a message's content, as in OpenAI's chat API."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    """A chat message, as in OpenAI-style chat completion APIs."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] = Field(
        description="Text, or a list of text parts that are joined with newlines."
    )
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Return the content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        """Return the message as the dict that chat templates expect."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        return message


class Options(BaseModel):
    """Per-request options.

    Strict, like scoring-function params: ``"5"`` is not a number and ``true``
    is not a priority. An integer is accepted where a float is expected.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    logprobs: bool = Field(
        False,
        description="Generative models: also return `token_logprobs`, the "
        "log-probability of each response token. Reward models return no extra "
        "output because `logprob` is in every response.",
    )
    max_tokens: int | None = Field(
        None, ge=1, le=32768, description="Generation limit for generating scorers."
    )
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="Sampling temperature for generating scorers.",
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus sampling for generating scorers."
    )
    truncation: Literal["left", "error"] | None = Field(
        None,
        description="Extension. Policy for a conversation longer than the context: "
        "`left` drops the oldest prompt tokens and keeps the whole response, "
        "`error` rejects it with 400. Default: the model's configured policy.",
    )
    return_token_ids: bool = Field(
        False,
        description="Extension. Return the token ids sent to the engine and where "
        "the response starts in them.",
    )
    priority: int = Field(
        0,
        ge=-1000,
        le=1000,
        description="Extension. vLLM scheduling priority; lower runs first.",
    )


class ScoringFunction(BaseModel):
    """Name and params of the function that turns engine output into a score."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class RewardModelScoringRequest(BaseModel):
    """Body of ``POST /reward_model_scoring/``."""

    model_config = ConfigDict(extra="forbid")

    prompt_with_response: list[Message] = Field(
        min_length=1,
        description="Prompt and response joined as a list of messages; the last "
        "message is the assistant response being scored.",
    )
    reward_model: str = Field(description="Id of a served model (see /v1/models).")
    scoring_function: ScoringFunction | None = Field(
        None, description="Default: the model kind's default function."
    )
    options: Options = Field(default_factory=Options)


class Usage(BaseModel):
    """Token counts of one scored conversation."""

    prompt_tokens: int = Field(description="Tokens sent to the engine.")
    response_tokens: int = Field(description="Tokens of the scored response.")
    truncated_tokens: int = Field(description="Prompt tokens dropped to fit.")


class RewardModelScoringResponse(BaseModel):
    """Result of ``POST /reward_model_scoring/``."""

    id: str
    logprob: float = Field(
        description="Natural-log probability that the model gives to what it "
        "scored: the summed log-probability of the response tokens for a "
        "generative model; log-sigmoid of a single logit, or log-softmax of the "
        "reported label, for a reward head. Finite and at most 0."
    )
    score: float = Field(description="The scoring function's output.")
    reward_model: str = Field(description="Extension. The model that scored.")
    scoring_function: str = Field(description="Extension. The function used.")
    labels: dict[str, float] | None = Field(
        None, description="Extension. Raw head output per label, for reward heads."
    )
    steps: list[float] | None = Field(
        None, description="Extension. Per-step values, for step-wise scorers."
    )
    token_logprobs: list[float] | None = Field(
        None, description="Extension. Per-token log-probabilities of the response."
    )
    detail: dict[str, Any] | None = Field(
        None, description="Extension. Function-specific values."
    )
    usage: Usage
    token_ids: list[int] | None = Field(
        None, description="Extension. Token ids sent to the engine."
    )
    response_start: int | None = Field(
        None, description="Extension. Index in `token_ids` where the response starts."
    )


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reward-model-service"
    kind: str = Field(
        description="Extension. `reward`, `generative` or `process_reward`."
    )
    max_model_len: int | None = Field(None, description="Extension.")
    labels: list[str] | None = Field(None, description="Extension. Head labels.")


class ModelList(BaseModel):
    """Body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ScoringFunctionCard(BaseModel):
    """One entry of ``GET /v1/scoring_functions``."""

    id: str = Field(
        description="Namespaced id. Built-ins can also be called by the part "
        "after `builtin::`."
    )
    object: Literal["scoring_function"] = "scoring_function"
    description: str = Field(description="What `score` and `logprob` mean.")
    model_kinds: list[str] = Field(description="Model kinds the function can use.")
    parameters: dict[str, Any] = Field(
        description="JSON Schema of `scoring_function.params`, with defaults."
    )


class ScoringFunctionList(BaseModel):
    """Body of ``GET /v1/scoring_functions``."""

    object: Literal["list"] = "list"
    data: list[ScoringFunctionCard]
