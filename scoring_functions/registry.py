"""Registry of scoring functions by namespaced id, and plug-in discovery.

Built-in functions have ids ``builtin::<name>`` and can also be called by the
short ``<name>``. Third-party functions register under their own namespace,
from the ``reward_model_service.scoring_functions`` entry-point group of
installed packages or from modules named in the server configuration.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import re
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from scoring_functions.base import ScoringFunction, parse_params
from server.config import ModelConfig, ModelKind
from server.errors import (
    InvalidRequestError,
    NotFoundError,
    describe_validation_errors,
)

logger = logging.getLogger(__name__)

BUILTIN_NAMESPACE = "builtin"
ENTRY_POINT_GROUP = "reward_model_service.scoring_functions"
# Module attribute that lists a plug-in module's scoring functions.
MODULE_ATTRIBUTE = "SCORING_FUNCTIONS"
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+::[A-Za-z0-9_.-]+$")


class ScoringFunctionRegistry:
    """Scoring functions by id, rejecting duplicates."""

    def __init__(self) -> None:
        self._functions: dict[str, ScoringFunction] = {}
        self._sources: dict[str, str] = {}

    def register(
        self, function_class: type[ScoringFunction], source: str = BUILTIN_NAMESPACE
    ) -> None:
        """Instantiate and add a function; ValueError names a bad or repeated id.

        ``source`` names where the class came from, for error messages.
        """
        check_function_class(function_class, source)
        name = function_class.name
        namespace = name.partition("::")[0]
        if namespace == BUILTIN_NAMESPACE and source != BUILTIN_NAMESPACE:
            raise ValueError(
                f"scoring function {name!r} from {source}: the namespace "
                f"{BUILTIN_NAMESPACE!r} is reserved for built-in functions; use "
                f"your package's name"
            )
        if name in self._functions:
            raise ValueError(
                f"scoring function {name!r} from {source} is already registered "
                f"by {self._sources[name]}; give one of them another id or load "
                f"it only once"
            )
        function = function_class()
        function.registry = self
        self._functions[name] = function
        self._sources[name] = source

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

    def source(self, name: str) -> str:
        """Return where the function with this id was registered from."""
        return self._sources[name]

    def __iter__(self) -> Iterator[ScoringFunction]:
        return iter(self._functions.values())

    def __contains__(self, name: str) -> bool:
        return name in self._functions

    def names(self) -> list[str]:
        return sorted(self._functions)


def check_function_class(function_class: Any, source: str) -> None:
    """Raise TypeError or ValueError unless this is a usable ScoringFunction."""
    if not (
        inspect.isclass(function_class) and issubclass(function_class, ScoringFunction)
    ):
        raise TypeError(
            f"{source}: {function_class!r} is not a ScoringFunction subclass"
        )
    label = f"{source}: {function_class.__qualname__}"
    if inspect.isabstract(function_class):
        raise TypeError(f"{label} does not implement compute()")
    name = getattr(function_class, "name", None)
    if not isinstance(name, str) or not ID_PATTERN.match(name):
        raise ValueError(
            f"{label}: the id {name!r} must be 'namespace::name' with letters, "
            f"digits, '_', '.' or '-' on each side, such as 'mypackage::length'"
        )
    kinds = getattr(function_class, "model_kinds", None)
    if (
        not isinstance(kinds, frozenset)
        or not kinds
        or not all(isinstance(kind, ModelKind) for kind in kinds)
    ):
        raise ValueError(
            f"{label}: model_kinds must be a non-empty frozenset of ModelKind"
        )
    params = function_class.Params
    if not (inspect.isclass(params) and issubclass(params, BaseModel)):
        raise TypeError(f"{label}: Params must be a pydantic BaseModel subclass")


def functions_in(value: Any, source: str) -> list[type[ScoringFunction]]:
    """Return the function classes that a plug-in object provides.

    The object is a ScoringFunction subclass, a list of them, or a module with a
    ``SCORING_FUNCTIONS`` list.
    """
    if isinstance(value, ModuleType):
        if not hasattr(value, MODULE_ATTRIBUTE):
            raise ValueError(
                f"{source}: module {value.__name__} has no {MODULE_ATTRIBUTE} list; "
                f"add one or name the class as 'module:ClassName'"
            )
        value = getattr(value, MODULE_ATTRIBUTE)
    if inspect.isclass(value):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(
        f"{source}: expected a ScoringFunction subclass, a list of them or a "
        f"module, got {value!r}"
    )


def load_reference(reference: str) -> Any:
    """Import ``module`` or ``module:attribute`` (entry-point syntax)."""
    module_name, _, attribute = reference.partition(":")
    try:
        value = importlib.import_module(module_name.strip())
    except ImportError as error:
        raise ValueError(
            f"scoring_function_modules: cannot import {module_name!r}: {error}"
        ) from error
    except Exception as error:
        # A plug-in's own code failed while it was imported.
        raise ValueError(
            f"scoring_function_modules: importing {module_name!r} raised "
            f"{type(error).__name__}: {error}"
        ) from error
    for part in filter(None, attribute.strip().split(".")):
        try:
            value = getattr(value, part)
        except AttributeError as error:
            raise ValueError(
                f"scoring_function_modules: {reference!r} has no attribute {part!r}"
            ) from error
    return value


def register_entry_points(registry: ScoringFunctionRegistry) -> None:
    """Register the functions of every entry point in ENTRY_POINT_GROUP."""
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry_point in sorted(entry_points, key=lambda item: item.name):
        package = entry_point.dist.name if entry_point.dist else "unknown package"
        source = f"entry point {entry_point.name!r} ({entry_point.value}, {package})"
        try:
            value = entry_point.load()
        except Exception as error:
            raise ValueError(f"{source} failed to load: {error!r}") from error
        for function_class in functions_in(value, source):
            registry.register(function_class, source)
        logger.info("registered scoring functions from %s", source)


def register_modules(registry: ScoringFunctionRegistry, references: list[str]) -> None:
    """Register the functions of each ``module`` or ``module:attribute``."""
    for reference in references:
        source = f"scoring_function_modules entry {reference!r}"
        for function_class in functions_in(load_reference(reference), source):
            registry.register(function_class, source)
        logger.info("registered scoring functions from %s", source)


def default_registry() -> ScoringFunctionRegistry:
    """Return a registry holding the built-in functions."""
    from scoring_functions.builtin import BUILTIN_FUNCTIONS

    registry = ScoringFunctionRegistry()
    for function_class in BUILTIN_FUNCTIONS:
        registry.register(function_class)
    return registry


def build_registry(
    modules: list[str] | None = None, entry_points: bool = True
) -> ScoringFunctionRegistry:
    """Return the built-ins plus the plug-ins from entry points and ``modules``.

    Raises ValueError or TypeError naming the plug-in when one fails to load,
    is invalid, or repeats an id.
    """
    registry = default_registry()
    if entry_points:
        register_entry_points(registry)
    register_modules(registry, modules or [])
    return registry


def check_scoring_params(
    registry: ScoringFunctionRegistry, models: list[ModelConfig]
) -> None:
    """Raise ValueError when a model's ``scoring_params`` cannot apply.

    Each key must name a registered function that the model's kind can use, and
    the values must be valid params. Required params may be missing, because
    requests supply them.
    """
    for model in models:
        seen: dict[str, str] = {}
        for key, defaults in model.scoring_params.items():
            where = f"model {model.id}: scoring_params.{key}"
            try:
                function = registry.get(key)
            except NotFoundError as error:
                raise ValueError(
                    f"{where}: unknown scoring function; available: "
                    f"{', '.join(registry.names())}"
                ) from error
            if function.name in seen:
                raise ValueError(
                    f"{where}: {function.name} already has defaults under "
                    f"{seen[function.name]!r}"
                )
            seen[function.name] = key
            if model.kind not in function.model_kinds:
                raise ValueError(
                    f"{where}: {function.name} does not apply to "
                    f"{model.kind.value} models"
                )
            _check_defaults(function, model, defaults, where)


def _check_defaults(
    function: ScoringFunction,
    model: ModelConfig,
    defaults: dict[str, Any],
    where: str,
) -> None:
    try:
        params = parse_params(function.Params, defaults)
    except TypeError as error:
        raise ValueError(f"{where}: params must be JSON values: {error}") from error
    except ValidationError as error:
        errors = [item for item in error.errors() if item["type"] != "missing"]
        if errors:
            _, message = describe_validation_errors(errors)
            raise ValueError(f"{where}: {message}") from error
        # Required params are left to requests, so nothing more can be checked.
        return
    try:
        function.check_defaults(model, params)
    except InvalidRequestError as error:
        message = error.message.replace("scoring_function.params.", "")
        raise ValueError(f"{where}: {message}") from error
