"""Pluggable functions that turn engine outputs into scores."""

from scoring_functions.base import (
    NoParams,
    ScoreResult,
    ScoringContext,
    ScoringFunction,
)
from scoring_functions.registry import ScoringFunctionRegistry, default_registry

__all__ = [
    "NoParams",
    "ScoreResult",
    "ScoringContext",
    "ScoringFunction",
    "ScoringFunctionRegistry",
    "default_registry",
]
