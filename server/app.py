"""FastAPI application: routes, lifespan and engine start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from jobs.manager import JobManager
from jobs.routes import router as jobs_router
from scoring_functions.registry import (
    ScoringFunctionRegistry,
    build_registry,
    check_scoring_params,
)
from server.config import ModelConfig, ServerConfig
from server.engine import EngineState, ModelEngine, import_engine_libraries
from server.errors import (
    ErrorResponse,
    OrjsonResponse,
    error_response,
    register_error_handlers,
)
from server.limits import BodySizeLimitMiddleware
from server.protocol import (
    ModelCard,
    ModelList,
    RewardModelScoringRequest,
    RewardModelScoringResponse,
    ScoringFunctionCard,
    ScoringFunctionList,
)
from server.serving import ScoringService

logger = logging.getLogger(__name__)

SCORING_PATH = "/reward_model_scoring/"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Invalid request; `error.param` names the field."),
        (404, "Unknown model, scoring function or job."),
        (413, "The request body is larger than max_request_bytes."),
        (422, "A judge's output could not be parsed into a score."),
        (500, "Model output or server error."),
        (503, "Engines are starting or stopped."),
    ]
}


async def start_engine(model: ModelEngine) -> None:
    """Start one engine in a worker thread and warm it up; record failures."""
    try:
        await asyncio.to_thread(model.start)
        await model.warm_up()
    except asyncio.CancelledError:
        raise
    except Exception as error:
        model.state = EngineState.FAILED
        model.error = f"start failed: {error}"
        logger.exception("model %s: engine failed to start", model.id)


# Status that nginx logs for a request whose client went away; it is never sent.
CLIENT_CLOSED_REQUEST = 499


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it when the client disconnects first.

    Cancelling an engine call makes vLLM abort its request, so a client that
    gives up frees its share of the batch. Returns None after a disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    logger.info(
        "%s %s: client disconnected, request cancelled",
        request.method,
        request.url.path,
    )
    return None


def create_app(
    config: ServerConfig,
    engine_factory: Callable[[ModelConfig], ModelEngine] = ModelEngine,
    registry: ScoringFunctionRegistry | None = None,
) -> FastAPI:
    """Build the app; engines start in the background once it runs."""
    models = {model.id: engine_factory(model) for model in config.models}
    if registry is None:
        registry = build_registry(
            config.scoring_function_modules, config.scoring_function_entry_points
        )
    check_scoring_params(registry, config.models)
    service = ScoringService(models, registry)
    job_manager = JobManager(config.jobs, service)
    created = int(time.time())

    async def start_engines() -> None:
        await asyncio.to_thread(import_engine_libraries)
        await asyncio.gather(*(start_engine(model) for model in models.values()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.ensure_future(start_engines())
        app.state.engines_started = starting
        try:
            # Resumed jobs wait until their model is ready.
            await job_manager.start()
            yield
        finally:
            await job_manager.stop()
            starting.cancel()
            for model in models.values():
                try:
                    model.shutdown()
                except Exception:
                    logger.exception("model %s: shutdown failed", model.id)

    app = FastAPI(
        title="Reward Model Service API",
        version="0.1.0",
        description="Scores chat conversations with reward models served by vLLM.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    app.state.service = service
    app.state.config = config
    app.state.job_manager = job_manager
    register_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware,
        paths={SCORING_PATH, SCORING_PATH.rstrip("/")},
        max_bytes=config.max_request_bytes,
    )
    app.include_router(jobs_router)

    @app.post(
        SCORING_PATH,
        response_model=RewardModelScoringResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        summary="Score a prompt-response pair using a reward model",
    )
    # Clients that drop the trailing slash would otherwise get a redirect,
    # which many HTTP clients do not follow for POST.
    @app.post(SCORING_PATH.rstrip("/"), include_in_schema=False)
    async def score_conversation(request: Request, body: RewardModelScoringRequest):
        response = await cancel_on_disconnect(request, service.score(body))
        if response is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return OrjsonResponse(response.model_dump(exclude_none=True))

    @app.get(
        "/health",
        summary="Readiness of every served model",
        responses={503: ERROR_RESPONSES[503]},
    )
    # Load balancers and uptime checks often probe with HEAD.
    @app.head("/health", include_in_schema=False)
    async def health():
        states = {model.id: model.ready for model in models.values()}
        if all(states.values()):
            return {"status": "ok"}
        problems = [
            f"{model.id}: {model.error or model.state.value}"
            for model in models.values()
            if not states[model.id]
        ]
        return error_response(
            503, "service_unavailable", "models not ready: " + "; ".join(problems)
        )

    @app.get("/v1/models", response_model=ModelList, summary="Served models")
    async def list_models():
        cards = [
            ModelCard(
                id=model.id,
                created=created,
                kind=model.kind.value,
                max_model_len=model.max_model_len,
                labels=model.labels,
            )
            for model in models.values()
        ]
        return ModelList(data=cards)

    @app.get(
        "/v1/scoring_functions",
        response_model=ScoringFunctionList,
        summary="Scoring functions with their parameters' JSON Schema",
    )
    async def list_scoring_functions():
        cards = [ScoringFunctionCard(**function.describe()) for function in registry]
        return ScoringFunctionList(data=sorted(cards, key=lambda card: card.id))

    use_error_envelope_in_openapi(app)
    return app


def use_error_envelope_in_openapi(app: FastAPI) -> None:
    """Drop FastAPI's default 422 responses from the OpenAPI document.

    Invalid input gets 400 in the error envelope here, never FastAPI's 422
    HTTPValidationError body.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422")):
                    del responses["422"]
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return schema

    app.openapi = openapi
