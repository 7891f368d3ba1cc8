"""Pluggable functions that turn engine outputs into scores."""

from scoring_functions.base import (
    NoParams,
    ScoreResult,
    ScoringContext,
    ScoringFunction,
    UnparseableOutputError,
)
from scoring_functions.registry import (
    ENTRY_POINT_GROUP,
    ScoringFunctionRegistry,
    build_registry,
    default_registry,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "NoParams",
    "ScoreResult",
    "ScoringContext",
    "ScoringFunction",
    "ScoringFunctionRegistry",
    "UnparseableOutputError",
    "build_registry",
    "default_registry",
]
