"""Run a job's plan through the scoring service with bounded in-flight work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path as FilePath
from typing import Any, BinaryIO

import orjson
from pydantic import ValidationError

from jobs.errors import JobFailure, JobInterrupted
from jobs.protocol import RequestCounts
from jobs.results import ResultWriter
from server.engine import ModelEngine
from server.errors import ServiceError, ServiceUnavailableError
from server.protocol import RewardModelScoringRequest
from server.serving import ScoringService

logger = logging.getLogger(__name__)

PLAN_READ_LINES = 512
# How often a job held back by other requests checks whether they are gone.
BUSY_CHECK_S = 0.02


def error_row(
    custom_id: str | None,
    line: int,
    error_type: str,
    message: str,
    param: str | None = None,
) -> bytes:
    row = {
        "custom_id": custom_id,
        "line": line,
        "error": {"type": error_type, "message": message, "param": param},
    }
    return orjson.dumps(row) + b"\n"


def is_engine_dead(error: Exception) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError)


def read_lines(file: BinaryIO, count: int) -> list[bytes]:
    lines = []
    for _ in range(count):
        line = file.readline()
        if not line:
            break
        lines.append(line)
    return lines


async def read_plan(path: FilePath, start: int) -> AsyncIterator[tuple[int, bytes]]:
    """Yield ``(index, entry)`` for plan entries from ``start`` on, read in a thread."""
    with open(path, "rb") as file:
        index = 0
        while lines := await asyncio.to_thread(read_lines, file, PLAN_READ_LINES):
            for line in lines:
                if index >= start:
                    yield index, line
                index += 1


class EngineLoad:
    """Tells whether an engine serves requests other than job lines.

    vLLM's ``AsyncLLM.get_num_unfinished_requests`` counts every request in the
    engine. Those that job lines do not account for are taken to be
    interactive. A line counts from the start of its scoring to its end,
    rendering included, so the estimate errs toward finding no other request.
    An engine stays busy for ``cooldown_s`` after other requests were last
    seen, so that jobs do not fill it again between two interactive requests.
    """

    def __init__(self, cooldown_s: float) -> None:
        self.cooldown_s = cooldown_s
        self.job_lines: Counter[str] = Counter()
        self.busy_until: dict[str, float] = {}

    def other_requests(self, model: ModelEngine) -> int:
        count = getattr(model.engine, "get_num_unfinished_requests", None)
        if count is None:
            return 0
        return count() - self.job_lines[model.id]

    def busy(self, model: ModelEngine) -> bool:
        now = time.monotonic()
        if self.other_requests(model) > 0:
            self.busy_until[model.id] = now + self.cooldown_s
            return True
        return now < self.busy_until.get(model.id, 0.0)


class PlanRunner:
    """Scores plan entries and writes their rows in plan order.

    At most ``max_in_flight`` entries are being scored or waiting to be
    written at a time, so a slow line holds back at most that many others.
    While the engine has requests other than job lines, the job sends no more
    than ``busy_in_flight`` lines to it, so that those requests wait behind
    few job lines.
    """

    def __init__(
        self,
        job_id: str,
        service: ScoringService,
        model: ModelEngine | None,
        writer: ResultWriter,
        counts: RequestCounts,
        load: EngineLoad,
        max_in_flight: int,
        busy_in_flight: int,
        priority: int,
    ) -> None:
        self.job_id = job_id
        self.service = service
        self.model = model
        self.writer = writer
        self.counts = counts
        self.load = load
        self.max_in_flight = max_in_flight
        self.busy_in_flight = busy_in_flight
        self.priority = priority
        self.next_write = 0
        self.window = asyncio.Semaphore(max_in_flight)
        self.finished: dict[int, tuple[bool, bytes]] = {}
        self.failure: JobFailure | JobInterrupted | None = None
        self.scoring = 0
        self.line_scored = asyncio.Event()

    async def run(self, plan_path: FilePath, start: int) -> None:
        """Score the plan entries from index ``start`` on.

        Raises JobInterrupted when the model becomes unavailable and
        JobFailure when results cannot be written. When cancelled, it cancels
        the lines in flight and re-raises. The result files always contain the
        rows of a plan prefix.
        """
        self.next_write = start
        tasks: set[asyncio.Task] = set()
        watcher = None
        if self.model is not None:
            watcher = asyncio.create_task(self.watch_load(self.model))
        try:
            async with aclosing(read_plan(plan_path, start)) as entries:
                async for index, raw in entries:
                    await self.window.acquire()
                    if self.failure is not None:
                        break
                    entry = orjson.loads(raw)
                    if "error" in entry:
                        error = entry["error"]
                        row = error_row(
                            entry["custom_id"],
                            entry["line"],
                            error["type"],
                            error["message"],
                            error.get("param"),
                        )
                        self.finish(index, False, row)
                        continue
                    await self.wait_for_turn()
                    # Counted from here, so that lines started in one burst
                    # count before their tasks run.
                    self.scoring += 1
                    self.load.job_lines[self.model.id] += 1
                    task = asyncio.create_task(self.run_entry(index, entry))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(self.line_done)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            pending = set(tasks)
            if watcher is not None:
                pending.add(watcher)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self.failure is not None:
            raise self.failure

    async def watch_load(self, model: ModelEngine) -> None:
        """Check the engine for other requests while the job runs.

        Checking only when lines finish would miss an interactive request that
        runs in the same engine step as job lines, because it finishes with
        them.
        """
        while True:
            self.load.busy(model)
            await asyncio.sleep(BUSY_CHECK_S)

    async def wait_for_turn(self) -> None:
        """Wait while other requests use the engine and enough lines are in it."""
        while self.scoring >= self.busy_in_flight and self.load.busy(self.model):
            self.line_scored.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.line_scored.wait(), BUSY_CHECK_S)

    def line_done(self, task: asyncio.Task) -> None:
        self.scoring -= 1
        self.load.job_lines[self.model.id] -= 1
        self.line_scored.set()

    async def run_entry(self, index: int, entry: dict[str, Any]) -> None:
        try:
            succeeded, row = await self.score(entry)
            self.finish(index, succeeded, row)
        except (JobFailure, JobInterrupted) as failure:
            self.failure = self.failure or failure
            # Lets the reading loop wake up and see the failure.
            self.window.release()
        except Exception as error:
            # A bug here must end the job rather than leave its reading loop
            # waiting for a window slot that is never released.
            logger.exception("job %s: plan entry %d failed", self.job_id, index)
            self.failure = self.failure or JobFailure(f"internal error: {error}")
            self.window.release()

    async def score(self, entry: dict[str, Any]) -> tuple[bool, bytes]:
        """Score one plan entry and return its row.

        Raises JobInterrupted when the model is unavailable, because no later
        line could be scored either.
        """
        custom_id, line = entry["custom_id"], entry["line"]
        request_id = f"{self.job_id}-{line}"
        try:
            request = RewardModelScoringRequest.model_validate(entry["request"])
            request.options.priority = self.priority
            response = await self.service.score(request, request_id=request_id)
        except ServiceUnavailableError as error:
            raise JobInterrupted(f"line {line}: {error.message}") from error
        except ServiceError as error:
            row = error_row(
                custom_id, line, error.error_type, error.message, error.param
            )
            return False, row
        except ValidationError as error:
            # Only when a plan from an older server version no longer validates.
            return False, error_row(
                custom_id, line, "invalid_request_error", str(error)
            )
        except Exception as error:
            if is_engine_dead(error):
                raise JobInterrupted(
                    f"line {line}: the model engine stopped; restart the server "
                    f"to resume the job"
                ) from error
            logger.exception(
                "job %s: line %d (request %s) failed", self.job_id, line, request_id
            )
            message = (
                f"internal error while scoring this line; the server log has the "
                f"details under request {request_id}"
            )
            return False, error_row(custom_id, line, "internal_error", message)
        row = {"custom_id": custom_id, **response.model_dump(exclude_none=True)}
        return True, orjson.dumps(row) + b"\n"

    def finish(self, index: int, succeeded: bool, row: bytes) -> None:
        """Record a finished entry and write every row that is next in plan order."""
        self.finished[index] = (succeeded, row)
        batch = []
        while self.next_write in self.finished:
            batch.append(self.finished.pop(self.next_write))
            self.next_write += 1
        if not batch:
            return
        try:
            self.writer.write(batch)
        except OSError as error:
            raise JobFailure(f"writing result rows failed: {error}") from error
        for succeeded_row, _ in batch:
            if succeeded_row:
                self.counts.completed += 1
            else:
                self.counts.failed += 1
            self.window.release()
