"""``llm_judge``: a generative model judges the response from a judge prompt."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scoring_functions.base import (
    ScoreResult,
    ScoringContext,
    ScoringFunction,
    UnparseableOutputError,
)
from scoring_functions.numeric import log_sigmoid, sigmoid
from server.chat import (
    ConversationRenderer,
    TokenizedConversation,
    check_prompt_template,
)
from server.config import DEFAULT_JUDGE_TEMPLATE, ModelKind
from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_RATING_TEMPLATE = (
    "Here is a conversation between a user and an assistant.\n\n"
    "{conversation}\n\n"
    "Here is the assistant's final answer:\n{response}\n\n"
    "Rate how correct and helpful the final answer is on a scale from 1 to 10. "
    "Reply with the number only."
)
# The first number in the output, because small judges seldom keep to a format.
DEFAULT_RATING_PATTERN = r"(\d+(?:\.\d+)?)"
# Generation settings when the request's options leave them unset. Greedy
# decoding makes the rating reproducible.
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0
# Bounds the time a user's pattern may take on one output, because some
# patterns backtrack exponentially.
PATTERN_TIMEOUT_S = 1.0
# How much of an unparseable output an error message quotes.
QUOTED_OUTPUT_CHARS = 200


def check_judge_template(template: str) -> str:
    """Check a judge template: {response} once, {conversation} any number of times."""
    return check_prompt_template(template)


class LlmJudgeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["yes_no", "rating"] = Field(
        "yes_no",
        description="`yes_no`: compare the next-token probabilities of yes_token "
        "and no_token. `rating`: generate with the request's options "
        "(max_tokens, temperature, top_p) and parse a rating with `pattern`.",
    )
    template: str | None = Field(
        None,
        description="Judge prompt, sent as one user message, with `{conversation}` "
        "(the prompt messages as `Role: content` paragraphs) and `{response}` "
        "placeholders; write literal braces as `{{` and `}}`. Default: a built-in "
        "yes/no question or rating request.",
    )
    yes_token: str = Field(
        "Yes", min_length=1, description="yes_no: the token that means yes."
    )
    no_token: str = Field(
        "No", min_length=1, description="yes_no: the token that means no."
    )
    pattern: str = Field(
        DEFAULT_RATING_PATTERN,
        description="rating: regular expression whose first group captures the "
        "rating as a number; the first match in the output counts.",
    )
    min_rating: float = Field(
        1.0, ge=-1e12, le=1e12, description="rating: the lowest rating, score 0."
    )
    max_rating: float = Field(
        10.0, ge=-1e12, le=1e12, description="rating: the highest rating, score 1."
    )

    @field_validator("template")
    @classmethod
    def _check_template(cls, template: str | None) -> str | None:
        return None if template is None else check_judge_template(template)

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, pattern: str) -> str:
        try:
            compiled = regex.compile(pattern)
        except regex.error as error:
            raise ValueError(f"invalid regular expression: {error}") from error
        if compiled.groups < 1:
            raise ValueError("the pattern needs a group that captures the rating")
        return pattern

    @model_validator(mode="after")
    def _check_ranges(self) -> LlmJudgeParams:
        if self.max_rating <= self.min_rating:
            raise ValueError("max_rating must be greater than min_rating")
        if self.yes_token == self.no_token:
            raise ValueError("yes_token and no_token must differ")
        return self


def single_token_id(tokenizer, text: str, param: str) -> int:
    """Return the id of the one token that ``text`` encodes to; 400 otherwise."""
    # The Rust tokenizer, where there is one, is called directly: transformers'
    # encode may reconfigure it, which fails while a worker thread tokenizes.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        token_ids = backend.encode(text, add_special_tokens=False).ids
    else:
        token_ids = tokenizer.encode(text, add_special_tokens=False)
    if len(token_ids) != 1:
        raise InvalidRequestError(
            f"scoring_function.params.{param}: {text!r} is {len(token_ids)} tokens "
            f"for this model's tokenizer, but must be exactly one",
            param=f"scoring_function.params.{param}",
        )
    return token_ids[0]


def render_judge_prompt(
    context: ScoringContext, template: str, limit: int
) -> TokenizedConversation:
    """Render the judge prompt as one user turn followed by the assistant prefix.

    When it is longer than ``limit`` tokens and the truncation policy is
    ``left``, the oldest prompt messages leave the transcript until it fits, so
    the instructions and the response are always sent whole.
    """
    model = context.model
    renderer = ConversationRenderer(
        model.renderer.tokenizer,
        chat_template=model.renderer.chat_template,
        judge_template=template,
    )
    messages = context.messages
    full = renderer.tokenize(messages)
    if len(full.token_ids) <= limit:
        return full
    if context.truncation == "error":
        raise InvalidRequestError(
            f"prompt_with_response: the judge prompt has {len(full.token_ids)} "
            f"tokens, more than the {limit} that fit in the model's context; "
            f'shorten the conversation or send options.truncation="left"',
            param="prompt_with_response",
        )
    # Dropping more messages never lengthens the prompt, so a binary search
    # finds the fewest dropped messages in O(log n) renderings.
    fitting = None
    low, high = 1, len(messages) - 1
    while low <= high:
        middle = (low + high) // 2
        candidate = renderer.tokenize(messages[middle:])
        if len(candidate.token_ids) <= limit:
            fitting, high = candidate, middle - 1
        else:
            low = middle + 1
    if fitting is not None:
        return TokenizedConversation(
            fitting.token_ids,
            fitting.response_start,
            fitting.response_end,
            truncated_tokens=len(full.token_ids) - len(fitting.token_ids),
        )
    judged = renderer.tokenize(messages[-1:])
    raise InvalidRequestError(
        f"prompt_with_response: the judge prompt with the response alone has "
        f"{len(judged.token_ids)} tokens, more than the {limit} that fit in the "
        f"model's context; shorten the response or the judge template",
        param="prompt_with_response",
    )


def parse_rating(output: str, params: LlmJudgeParams) -> float:
    """Return the first rating in ``output``; UnparseableOutputError if none."""
    try:
        match = regex.search(
            params.pattern, output, timeout=PATTERN_TIMEOUT_S, concurrent=True
        )
    except TimeoutError as error:
        raise InvalidRequestError(
            f"scoring_function.params.pattern: matching timed out after "
            f"{PATTERN_TIMEOUT_S} s; use a pattern that does not backtrack",
            param="scoring_function.params.pattern",
        ) from error
    quoted = output[:QUOTED_OUTPUT_CHARS]
    if match is None or match.group(1) is None:
        raise UnparseableOutputError(
            f"llm_judge: the judge output does not match the rating pattern "
            f"{params.pattern!r}; output: {quoted!r}"
        )
    try:
        rating = float(match.group(1))
    except ValueError as error:
        raise UnparseableOutputError(
            f"llm_judge: the rating {match.group(1)!r} captured from the judge "
            f"output is not a number; output: {quoted!r}"
        ) from error
    if not params.min_rating <= rating <= params.max_rating:
        raise UnparseableOutputError(
            f"llm_judge: the rating {rating:g} is outside the range "
            f"{params.min_rating:g} to {params.max_rating:g}; output: {quoted!r}"
        )
    return rating


class LlmJudge(ScoringFunction):
    """A generative model judges the response: yes/no probability or a rating."""

    name = "builtin::llm_judge"
    description = (
        "yes_no: score is P(yes) / (P(yes) + P(no)) for the judge's next token, "
        "and logprob its natural log. rating: score is (rating - min_rating) / "
        "(max_rating - min_rating) for the first rating parsed from the generated "
        "output, and logprob is the log-probability of that output under the "
        "unscaled model; output without a rating is an error "
        "(unparseable_output_error, HTTP 422), never a score of 0."
    )
    model_kinds = frozenset({ModelKind.GENERATIVE})
    Params = LlmJudgeParams

    async def compute(
        self, context: ScoringContext, params: LlmJudgeParams
    ) -> ScoreResult:
        if params.method == "yes_no":
            return await self._yes_no(context, params)
        return await self._rating(context, params)

    async def _yes_no(
        self, context: ScoringContext, params: LlmJudgeParams
    ) -> ScoreResult:
        tokenizer = context.model.renderer.tokenizer
        yes_id = single_token_id(tokenizer, params.yes_token, "yes_token")
        no_id = single_token_id(tokenizer, params.no_token, "no_token")
        template = params.template or DEFAULT_JUDGE_TEMPLATE
        context.conversation = await context.run_blocking(
            render_judge_prompt, context, template, context.model.max_model_len - 1
        )
        logprobs = await context.next_token_logprobs(
            context.conversation.token_ids, [yes_id, no_id]
        )
        margin = logprobs[yes_id] - logprobs[no_id]
        return ScoreResult(
            score=sigmoid(margin),
            logprob=log_sigmoid(margin),
            detail={"yes_logprob": logprobs[yes_id], "no_logprob": logprobs[no_id]},
        )

    async def _rating(
        self, context: ScoringContext, params: LlmJudgeParams
    ) -> ScoreResult:
        options = context.options
        max_tokens = options.max_tokens or DEFAULT_MAX_TOKENS
        max_model_len = context.model.max_model_len
        if max_tokens >= max_model_len:
            raise InvalidRequestError(
                f"options.max_tokens: {max_tokens} leaves no room for the judge "
                f"prompt in the model's context of {max_model_len} tokens",
                param="options.max_tokens",
            )
        template = params.template or DEFAULT_RATING_TEMPLATE
        context.conversation = await context.run_blocking(
            render_judge_prompt, context, template, max_model_len - max_tokens
        )

        generation = await context.sample(
            context.conversation.token_ids,
            max_tokens=max_tokens,
            temperature=(
                DEFAULT_TEMPERATURE
                if options.temperature is None
                else options.temperature
            ),
            top_p=options.top_p or DEFAULT_TOP_P,
        )
        rating = await asyncio.to_thread(parse_rating, generation.text, params)

        span = params.max_rating - params.min_rating
        detail = {
            "rating": rating,
            "output": generation.text,
            "finish_reason": generation.finish_reason,
        }
        if options.logprobs:
            detail["output_logprobs"] = generation.logprobs
        return ScoreResult(
            score=(rating - params.min_rating) / span,
            logprob=sum(generation.logprobs),
            detail=detail,
        )
