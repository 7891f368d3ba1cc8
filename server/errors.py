"""Service exceptions and the one JSON error envelope every response uses.

Every error response has the body
``{"error": {"message": str, "type": str, "param": str | None, "code": int}}``.
``ServiceError`` subclasses carry their HTTP status; ``register_error_handlers``
maps them, request validation errors, HTTP errors, dead engines and anything
unexpected onto that envelope. A 500 never carries internals.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# FastAPI's detail for a body that its JSON parser failed on.
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
# Location prefixes that FastAPI puts before the field in validation errors.
REQUEST_PARTS = frozenset({"body", "query", "path", "header", "cookie"})


class OrjsonResponse(JSONResponse):
    """JSON response serialized with orjson instead of the standard library."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ServiceError(Exception):
    """Base of the errors that the service reports to clients."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ServiceError):
    """The request body or a parameter is invalid (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class NotFoundError(ServiceError):
    """A named model, scoring function or job does not exist (HTTP 404)."""

    status_code = 404
    error_type = "not_found_error"


class ServiceUnavailableError(ServiceError):
    """The engines are starting, stopping or dead (HTTP 503)."""

    status_code = 503
    error_type = "service_unavailable"


class ModelOutputError(ServiceError):
    """The model returned a value that is not a finite number (HTTP 500).

    The message names the model and the value, so it is safe to show.
    """

    status_code = 500
    error_type = "model_output_error"


class ErrorDetail(BaseModel):
    """Error message, error class, offending request field and HTTP status."""

    message: str
    type: str = Field(description="Error class, such as `invalid_request_error`.")
    param: str | None = Field(None, description="Request field that caused it.")
    code: int = Field(description="HTTP status code.")


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: ErrorDetail


def error_body(
    status_code: int, error_type: str, message: str, param: str | None = None
) -> dict[str, Any]:
    """Build the error envelope as a plain dict."""
    return {
        "error": {
            "message": message,
            "type": error_type,
            "param": param,
            "code": status_code,
        }
    }


def error_response(
    status_code: int, error_type: str, message: str, param: str | None = None
) -> OrjsonResponse:
    """Build an error response in the envelope."""
    return OrjsonResponse(
        error_body(status_code, error_type, message, param), status_code=status_code
    )


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's type, such as "str" or
    # "list[TextPart]", into the location of errors inside a union.
    return isinstance(part, str) and (
        "[" in part or part in {"str", "int", "float", "bool", "dict", "list"}
    )


def describe_validation_error(
    error: dict[str, Any], prefix: tuple[str, ...] = ()
) -> tuple[str, str]:
    """Return the dotted field path and a message for one pydantic error."""
    if error.get("type") == "json_invalid":
        position = error.get("loc", ("body", "?"))[-1]
        reason = error.get("ctx", {}).get("error", "invalid JSON")
        return (
            "",
            f"the request body is not valid JSON: {reason} at character {position}",
        )
    location = [*prefix] + [
        str(part) for part in error.get("loc", ()) if not _is_union_tag(part)
    ]
    param = ".".join(location)
    message = error.get("msg", "invalid value")
    if error.get("type") == "extra_forbidden":
        message = "unknown field; check its spelling against the API docs"
    return param, f"{param or 'body'}: {message}"


def describe_validation_errors(
    errors: list[dict[str, Any]], prefix: tuple[str, ...] = ()
) -> tuple[str | None, str]:
    """Return the first invalid field and one message for all pydantic errors.

    ``prefix`` is prepended to each location, for models nested by hand.
    """
    details: dict[str, list[str]] = {}
    for item in errors:
        param, text = describe_validation_error(item, prefix)
        details.setdefault(param, [])
        if text not in details[param]:
            details[param].append(text)
    message = "; ".join(" or ".join(texts) for texts in details.values())
    return next(iter(details), None) or None, message or "invalid request body"


def _status_type(status_code: int) -> str:
    return {
        400: "invalid_request_error",
        404: "not_found_error",
        405: "method_not_allowed",
        413: "request_too_large",
        503: "service_unavailable",
    }.get(
        status_code, "invalid_request_error" if status_code < 500 else "internal_error"
    )


async def _handle_service_error(request: Request, error: ServiceError):
    if error.status_code == 503:
        logger.warning("%s %s: %s", request.method, request.url.path, error.message)
    elif error.status_code >= 500:
        logger.error(
            "%s %s failed: %s", request.method, request.url.path, error.message
        )
    return error_response(
        error.status_code, error.error_type, error.message, error.param
    )


async def _handle_validation_error(request: Request, error: RequestValidationError):
    # FastAPI starts each location with the part of the request, such as
    # "body" or "query". The param names the field alone.
    errors = [
        {**item, "loc": item["loc"][1:]}
        if item.get("loc") and item["loc"][0] in REQUEST_PARTS
        else item
        for item in error.errors()
    ]
    param, message = describe_validation_errors(errors)
    return error_response(400, "invalid_request_error", message, param)


async def _handle_http_error(request: Request, error: StarletteHTTPException):
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 400 and message == FASTAPI_BODY_PARSE_ERROR:
        # FastAPI returns this detail when the JSON parser itself fails, as
        # on nesting deeper than Python's recursion limit.
        message = (
            "the request body could not be parsed as JSON; check that it is "
            "valid JSON without extremely deep nesting"
        )
    return error_response(error.status_code, _status_type(error.status_code), message)


def _unexpected_error_response(method: str, path: str, error: Exception):
    # Imported here so that the module loads without vLLM installed.
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError):
        logger.error("%s %s failed: engine is dead", method, path)
        return error_response(
            503,
            "service_unavailable",
            "the model engine stopped; restart the server",
        )
    logger.error("%s %s failed", method, path, exc_info=error)
    return error_response(500, "internal_error", "internal server error")


async def _handle_unexpected_error(request: Request, error: Exception):
    return _unexpected_error_response(request.method, request.url.path, error)


class UnexpectedErrorMiddleware:
    """Turn an unexpected exception into the 500 (or dead-engine 503) envelope.

    Starlette's own handler for ``Exception`` sends the response and then
    re-raises, which makes uvicorn close the keep-alive connection, so the
    client's next request on it fails. Catching here keeps the connection.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_and_track(message: dict) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception as error:
            if response_started:
                raise
            response = _unexpected_error_response(
                scope.get("method", ""), scope.get("path", ""), error
            )
            await response(scope, receive, send)


def register_error_handlers(app: FastAPI) -> None:
    """Send every error through the one envelope."""
    app.add_exception_handler(ServiceError, _handle_service_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_middleware(UnexpectedErrorMiddleware)
    # Errors raised outside the middleware stack still get the envelope.
    app.add_exception_handler(Exception, _handle_unexpected_error)
