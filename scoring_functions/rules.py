"""Rule-based functions for verifiable rewards: no model output is used.

They compare the response text with a reference in params and work with a
served model of any kind, which only renders the conversation for ``usage``.
``score`` is 1.0 for a match and 0.0 otherwise. ``logprob`` is 0.0 for a match
and ``mismatch_logprob`` otherwise, a finite stand-in for log 0 (JSON has no
infinity).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator

from scoring_functions.base import (
    ALL_MODEL_KINDS,
    ScoreResult,
    ScoringContext,
    ScoringFunction,
)
from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_MISMATCH_LOGPROB = -20.0
# Bounds the time a user's pattern may take on one response, because some
# patterns backtrack exponentially.
PATTERN_TIMEOUT_S = 1.0


class RuleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ignore_case: bool = Field(False, description="Compare case-insensitively.")
    mismatch_logprob: float = Field(
        DEFAULT_MISMATCH_LOGPROB,
        le=0.0,
        description="`logprob` reported when the rule does not match, a finite "
        "stand-in for log 0.",
    )


class ReferenceParams(RuleParams):
    reference: str | list[str] = Field(
        description="Reference text, or a list of accepted references."
    )

    @field_validator("reference")
    @classmethod
    def _check_reference(cls, reference: str | list[str]) -> str | list[str]:
        if isinstance(reference, list) and not reference:
            raise ValueError("the list of references is empty")
        return reference

    def references(self) -> list[str]:
        return [self.reference] if isinstance(self.reference, str) else self.reference


def rule_result(
    matched: bool, params: RuleParams, detail: dict | None = None
) -> ScoreResult:
    return ScoreResult(
        score=1.0 if matched else 0.0,
        logprob=0.0 if matched else params.mismatch_logprob,
        detail=detail,
    )


class ExactMatchParams(ReferenceParams):
    strip: bool = Field(
        True, description="Ignore whitespace at both ends of response and reference."
    )


class ExactMatch(ScoringFunction):
    """1 when the response equals a reference."""

    name = "builtin::exact_match"
    description = (
        "score: 1.0 when the response equals params.reference (or one of a list), "
        "else 0.0. logprob: 0.0 on a match, else params.mismatch_logprob."
    )
    model_kinds = ALL_MODEL_KINDS
    Params = ExactMatchParams

    async def compute(
        self, context: ScoringContext, params: ExactMatchParams
    ) -> ScoreResult:
        def normalise(text: str) -> str:
            text = text.strip() if params.strip else text
            return text.casefold() if params.ignore_case else text

        response = normalise(context.response_text)
        matched = next(
            (ref for ref in params.references() if normalise(ref) == response), None
        )
        return rule_result(matched is not None, params, {"matched": matched})


class ContainsParams(ReferenceParams):
    require: Literal["any", "all"] = Field(
        "any",
        description="Whether one (`any`) or every (`all`) reference must occur.",
    )


class Contains(ScoringFunction):
    """1 when the response contains the reference text."""

    name = "builtin::contains"
    description = (
        "score: 1.0 when the response contains params.reference (any or all of a "
        "list), else 0.0. logprob: 0.0 on a match, else params.mismatch_logprob. "
        "detail.found: the references found."
    )
    model_kinds = ALL_MODEL_KINDS
    Params = ContainsParams

    async def compute(
        self, context: ScoringContext, params: ContainsParams
    ) -> ScoreResult:
        response = context.response_text
        if params.ignore_case:
            response = response.casefold()
        found = [
            ref
            for ref in params.references()
            if (ref.casefold() if params.ignore_case else ref) in response
        ]
        if params.require == "all":
            matched = len(found) == len(params.references())
        else:
            matched = bool(found)
        return rule_result(matched, params, {"found": found})


class RegexMatchParams(RuleParams):
    pattern: str = Field(description="Regular expression (Python `re` syntax).")
    mode: Literal["search", "fullmatch"] = Field(
        "search",
        description="`search`: the pattern matches anywhere in the response. "
        "`fullmatch`: it matches the whole response.",
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, pattern: str) -> str:
        try:
            regex.compile(pattern)
        except regex.error as error:
            raise ValueError(f"invalid regular expression: {error}") from error
        return pattern


def match_pattern(response: str, params: RegexMatchParams) -> str | None:
    """Return the matched text, or None; 400 when matching takes too long."""
    flags = regex.IGNORECASE if params.ignore_case else 0
    match_function = regex.search if params.mode == "search" else regex.fullmatch
    try:
        match = match_function(
            params.pattern,
            response,
            flags=flags,
            timeout=PATTERN_TIMEOUT_S,
            concurrent=True,
        )
    except TimeoutError as error:
        raise InvalidRequestError(
            f"scoring_function.params.pattern: matching timed out after "
            f"{PATTERN_TIMEOUT_S} s; use a pattern that does not backtrack",
            param="scoring_function.params.pattern",
        ) from error
    return None if match is None else match.group(0)


class RegexMatch(ScoringFunction):
    """1 when a regular expression matches the response."""

    name = "builtin::regex_match"
    description = (
        "score: 1.0 when params.pattern matches the response (anywhere, or the "
        "whole response with mode fullmatch), else 0.0. logprob: 0.0 on a match, "
        "else params.mismatch_logprob. detail.match: the matched text."
    )
    model_kinds = ALL_MODEL_KINDS
    Params = RegexMatchParams

    async def compute(
        self, context: ScoringContext, params: RegexMatchParams
    ) -> ScoreResult:
        # In a worker thread, so a slow pattern does not block the event loop.
        matched = await asyncio.to_thread(match_pattern, context.response_text, params)
        return rule_result(matched is not None, params, {"match": matched})
