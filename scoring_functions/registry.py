"""Registry of scoring functions by namespaced id.

Built-in functions have ids ``builtin::<name>`` and can also be called by the
short ``<name>``. Third-party functions register under their own namespace.
"""

from __future__ import annotations

import logging

from scoring_functions.base import ScoringFunction
from server.errors import NotFoundError

logger = logging.getLogger(__name__)

BUILTIN_NAMESPACE = "builtin"


class ScoringFunctionRegistry:
    """Scoring functions by id, rejecting duplicates."""

    def __init__(self) -> None:
        self._functions: dict[str, ScoringFunction] = {}

    def register(self, function_class: type[ScoringFunction]) -> None:
        name = function_class.name
        if "::" not in name:
            raise ValueError(
                f"scoring function id {name!r} needs a namespace, such as "
                f"'mypackage::{name}'"
            )
        if name in self._functions:
            raise ValueError(f"scoring function {name!r} is already registered")
        self._functions[name] = function_class()

    def get(self, name: str) -> ScoringFunction:
        """Return the function with this id, or the built-in with this short name."""
        function = self._functions.get(name) or self._functions.get(
            f"{BUILTIN_NAMESPACE}::{name}"
        )
        if function is None:
            raise NotFoundError(
                f"scoring_function.name: unknown scoring function {name!r}; "
                f"available: {', '.join(sorted(self._functions))}",
                param="scoring_function.name",
            )
        return function

    def __iter__(self):
        return iter(self._functions.values())

    def names(self) -> list[str]:
        return sorted(self._functions)


def default_registry() -> ScoringFunctionRegistry:
    """Return a registry holding the built-in functions."""
    from scoring_functions.builtin import BUILTIN_FUNCTIONS

    registry = ScoringFunctionRegistry()
    for function_class in BUILTIN_FUNCTIONS:
        registry.register(function_class)
    return registry
