"""The job manager: submits, schedules, persists, resumes and cancels jobs.

A job's states are ``validating`` (reading and checking the input, then
waiting for its model and for a run slot), ``running``, and then
``completed``, ``failed`` or ``cancelled``. Each change is saved to the job's
record before the job goes on. After a restart, every job that was not
finished starts again. A ``validating`` job validates its input again, and a
``running`` job resumes after the last row it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path as FilePath

from jobs.errors import InputTooLargeError, JobFailure, JobInterrupted, JobStateError
from jobs.inputs import InputLocator
from jobs.plan import LineDefaults, PlanSummary, build_plan
from jobs.protocol import (
    BatchRewardModelScoringJob,
    JobStatus,
    Path,
    PathType,
    RequestCounts,
    SubmitJobRequest,
)
from jobs.results import ResultWriter, recover_row_count
from jobs.runner import EngineLoad, PlanRunner
from jobs.store import (
    JobFiles,
    JobRecord,
    load_records,
    lock_job,
    new_job_id,
    save_record,
)
from server.config import JobsConfig
from server.engine import EngineState
from server.errors import NotFoundError
from server.serving import ScoringService

logger = logging.getLogger(__name__)

MODEL_POLL_S = 0.5
CHECKPOINT_INTERVAL_S = 2.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class Job:
    """A job's record and files, with the state of its run in this process."""

    record: JobRecord
    files: JobFiles
    task: asyncio.Task | None = None
    cancel_requested: bool = False
    # Another process holds the job's lock and runs it.
    run_elsewhere: bool = False
    # Set to stop the validation thread.
    stop_validation: threading.Event = field(default_factory=threading.Event)
    save_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def job_id(self) -> str:
        return self.record.job_id


def check_jobs_folder(root: FilePath) -> None:
    """Raise ValueError unless ``root`` is, or can become, a writable folder.

    The folder itself is created by the first submission.
    """
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"jobs.folder: {existing} is not a folder, so {root} cannot hold jobs"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"jobs.folder: {existing} is not writable by this server")


class JobManager:
    """Runs batch jobs through a ScoringService and keeps their records."""

    def __init__(self, config: JobsConfig, service: ScoringService) -> None:
        self.config = config
        self.service = service
        self.root = FilePath(config.folder).resolve()
        check_jobs_folder(self.root)
        self.locator = InputLocator(config)
        self.jobs: dict[str, Job] = {}
        self.run_slots = asyncio.Semaphore(config.max_running_jobs)
        self.validation_slots = asyncio.Semaphore(config.max_running_jobs)
        self.load = EngineLoad(config.busy_cooldown_s)
        self.started = False

    async def start(self, resume: bool = True) -> None:
        """Load the records in the jobs folder and, with ``resume``, resume
        unfinished jobs.

        The folder is created by the first submission, not here.
        """
        loaded = []
        if self.root.is_dir():
            loaded = await asyncio.to_thread(load_records, self.root)
        unfinished = []
        for files, record in loaded:
            job = Job(record, files)
            self.jobs[job.job_id] = job
            if not record.status.finished:
                unfinished.append(job)
        if not resume:
            unfinished = []
        unfinished.sort(key=lambda job: job.record.created)
        for job in unfinished:
            self.resume(job.job_id)
        self.started = True
        logger.info(
            "jobs: %d loaded from %s, %d resumed",
            len(loaded),
            self.root,
            len(unfinished),
        )

    def resume(self, job_id: str) -> Job:
        """Start a loaded job that has not finished; JobStateError if it has."""
        job = self.get(job_id)
        if job.record.status.finished:
            raise JobStateError(
                f"job_id: job {job_id} is already {job.record.status.value}",
                param="job_id",
            )
        if job.task is None or job.task.done():
            logger.info("job %s: resuming (status %s)", job_id, job.record.status.value)
            self.launch(job)
        return job

    async def stop(self) -> None:
        """Stop running jobs; they keep their status and resume on restart."""
        stopping = [
            job
            for job in self.jobs.values()
            if job.task is not None and not job.task.done()
        ]
        for job in stopping:
            job.task.cancel()
        if stopping:
            await asyncio.wait([job.task for job in stopping])
        for job in stopping:
            if job.record.status.finished:
                continue
            # The record's counts are otherwise saved every few seconds.
            try:
                await self.save(job)
            except OSError as error:
                logger.error("job %s: saving its record failed: %s", job.job_id, error)
            counts = job.record.request_counts
            logger.info(
                "job %s: stopped with %d of %d lines written; it resumes when "
                "the server restarts",
                job.job_id,
                counts.completed + counts.failed,
                counts.total,
            )
        self.started = False

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job_id: no job {job_id!r}", param="job_id")
        return job

    def list(
        self, limit: int, after: str | None = None, status: JobStatus | None = None
    ) -> tuple[list[Job], bool]:
        """Return up to ``limit`` jobs, newest first, after job ``after``."""
        jobs = sorted(
            self.jobs.values(),
            key=lambda job: (job.record.created, job.job_id),
            reverse=True,
        )
        if after is not None:
            cursor = self.jobs.get(after)
            if cursor is None:
                raise NotFoundError(f"after: no job {after!r}", param="after")
            jobs = jobs[jobs.index(cursor) + 1 :]
        if status is not None:
            jobs = [job for job in jobs if job.record.status == status]
        return jobs[:limit], len(jobs) > limit

    async def submit(self, request: SubmitJobRequest) -> Job:
        """Check the request, store the job and start it.

        Raises NotFoundError for an unknown model or scoring function, and
        InvalidRequestError or InputTooLargeError for an input that cannot be
        used. Problems inside the input make the job fail or become error rows.
        """
        self.check_scoring(request)
        source = request.prompt_with_response_path
        data = None
        if source.type == PathType.RAW_BYTES:
            data = source.value.encode("utf-8")
            if len(data) > self.config.max_raw_bytes:
                raise InputTooLargeError(
                    f"prompt_with_response_path.value: the input is {len(data)} "
                    f"bytes, more than this server's jobs.max_raw_bytes "
                    f"({self.config.max_raw_bytes}); send a filepath or uri instead",
                    param="prompt_with_response_path.value",
                )
            source = Path(type=PathType.RAW_BYTES, value="")
        else:
            self.locator.check(source)

        job_id = new_job_id()
        files = JobFiles(self.root / job_id)
        record = JobRecord(
            job_id=job_id,
            created=utc_now(),
            status=JobStatus.VALIDATING,
            reward_model=request.reward_model,
            scoring_function=request.scoring_function,
            options=request.options,
            metadata=request.metadata,
            input=source,
        )
        await asyncio.to_thread(create_job_files, files, data)
        job = Job(record, files)
        await self.save(job)
        self.jobs[job_id] = job
        logger.info(
            "job %s: submitted (model %s, input %s)",
            job_id,
            record.reward_model,
            source.type.value,
        )
        self.launch(job)
        return job

    def check_scoring(self, request: SubmitJobRequest) -> None:
        """Raise unless the job's model and scoring function can work together."""
        model = self.service.find_model(request.reward_model)
        if model.state != EngineState.STARTING:
            # Raises ServiceUnavailableError (HTTP 503) for a failed engine.
            model.check_ready()
        self.service.resolve_function(model, request.scoring_function)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished; keep the rows it wrote.

        Cancelling a cancelled job returns it unchanged. Raises JobStateError
        for a completed or failed job.
        """
        job = self.get(job_id)
        status = job.record.status
        if status == JobStatus.CANCELLED:
            return job
        if status.finished:
            raise JobStateError(
                f"job_id: job {job_id} is already {status.value}; only validating "
                f"or running jobs can be cancelled",
                param="job_id",
            )
        if job.run_elsewhere:
            raise JobStateError(
                f"job_id: job {job_id} is run by another process that uses the "
                f"same jobs folder; cancel it there",
                param="job_id",
            )
        job.cancel_requested = True
        job.stop_validation.set()
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.wait([job.task])
        if not job.record.status.finished:
            # The job had stopped on its own (JobInterrupted or a stopped manager).
            await self.finish(job, JobStatus.CANCELLED, "cancelled by request")
        return job

    async def wait(self, job_id: str) -> Job:
        """Return the job once it has finished or stopped until a restart."""
        job = self.get(job_id)
        if job.task is not None:
            await asyncio.wait([job.task])
        return job

    def launch(self, job: Job) -> None:
        job.task = asyncio.create_task(self.run_job(job), name=f"job-{job.job_id}")

    async def run_job(self, job: Job) -> None:
        """Take the job through its states, holding the job's lock."""
        lock = await asyncio.to_thread(lock_job, job.files)
        if lock is None:
            job.run_elsewhere = True
            logger.warning(
                "job %s: skipped, because another process has locked %s",
                job.job_id,
                job.files.lock,
            )
            return
        try:
            await self.advance(job)
        finally:
            os.close(lock)

    async def advance(self, job: Job) -> None:
        """Take the job from its current status to a final one, saving each step."""
        try:
            if job.record.status == JobStatus.VALIDATING:
                async with self.validation_slots:
                    summary = await self.validate(job)
                if summary.valid == 0:
                    await self.write_rejected_lines(job)
                    message = (
                        f"the input contains no valid line ({summary.total} non-blank "
                        f"lines); the error file lists why each one was rejected"
                    )
                    if summary.total == 0:
                        message = "the input contains no lines"
                    await self.finish(job, JobStatus.FAILED, message)
                    return
            await self.wait_for_model(job)
            async with self.run_slots:
                await self.run(job)
            await self.finish(job, JobStatus.COMPLETED)
        except asyncio.CancelledError:
            if not job.cancel_requested:
                # The manager is stopping: the job resumes on restart.
                raise
            await self.finish(job, JobStatus.CANCELLED, "cancelled by request")
        except JobFailure as failure:
            await self.finish(job, JobStatus.FAILED, failure.message)
        except JobInterrupted as interruption:
            logger.error(
                "job %s: stopped until the server restarts: %s",
                job.job_id,
                interruption.message,
            )
            job.record.error = interruption.message
            await self.save(job)
        except Exception as error:
            logger.exception("job %s: failed with an unexpected error", job.job_id)
            await self.finish(job, JobStatus.FAILED, f"internal error: {error}")

    async def validate(self, job: Job) -> PlanSummary:
        """Validate the input into the plan; blocking work runs in a thread."""
        record = job.record
        record.request_counts = RequestCounts()
        defaults = LineDefaults(
            reward_model=record.reward_model,
            scoring_function=(
                record.scoring_function.model_dump()
                if record.scoring_function
                else None
            ),
            options=(
                record.options.model_dump(exclude_none=True) if record.options else None
            ),
        )

        def on_line(summary: PlanSummary) -> None:
            record.request_counts.total = summary.total

        def validate_input() -> PlanSummary:
            # Results of an earlier, interrupted run of this job are dropped.
            for path in (job.files.success, job.files.errors):
                path.write_bytes(b"")
            with (
                self.locator.open(record.input, job.files) as source,
                open(job.files.plan, "wb") as plan,
            ):
                summary = build_plan(
                    source,
                    plan,
                    defaults,
                    self.config.max_line_bytes,
                    job.stop_validation,
                    on_line,
                )
                plan.flush()
                os.fsync(plan.fileno())
            return summary

        future = asyncio.ensure_future(asyncio.to_thread(validate_input))
        try:
            summary = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.stop_validation.set()
            await asyncio.wait([future])
            raise
        record.request_counts.total = summary.total
        record.valid_lines = summary.valid
        await self.save(job)
        logger.info(
            "job %s: validated %d lines, %d valid",
            job.job_id,
            summary.total,
            summary.valid,
        )
        return summary

    async def wait_for_model(self, job: Job) -> None:
        """Wait until the job's model is ready.

        Raises JobFailure when the model is no longer configured, and
        JobInterrupted when its engine failed or stopped.
        """
        model_id = job.record.reward_model
        model = self.service.models.get(model_id)
        if model is None:
            raise JobFailure(
                f"model {model_id} is no longer served; served models: "
                f"{', '.join(sorted(self.service.models))}"
            )
        while not model.ready:
            if model.state != EngineState.STARTING:
                raise JobInterrupted(
                    f"model {model_id} is unavailable "
                    f"({model.error or model.state.value})"
                )
            await asyncio.sleep(MODEL_POLL_S)

    async def run(self, job: Job) -> None:
        """Run the job's plan from the first line without a row."""
        record = job.record
        files = job.files
        written = await asyncio.to_thread(count_written_rows, files)
        record.request_counts.completed, record.request_counts.failed = written
        resumed = record.status == JobStatus.RUNNING
        record.status = JobStatus.RUNNING
        record.started_at = record.started_at or utc_now()
        record.error = None
        await self.save(job)
        start = sum(written)
        if resumed:
            logger.info("job %s: resuming at plan entry %d", job.job_id, start)
        else:
            logger.info("job %s: running", job.job_id)

        writer = await asyncio.to_thread(ResultWriter, files.success, files.errors)
        runner = PlanRunner(
            job.job_id,
            self.service,
            self.service.models[record.reward_model],
            writer,
            record.request_counts,
            self.load,
            self.config.max_in_flight_per_job,
            self.config.max_in_flight_per_job_when_busy,
            self.config.priority,
        )
        checkpoint = asyncio.create_task(self.checkpoint(job, writer))
        try:
            await runner.run(files.plan, start)
        finally:
            checkpoint.cancel()
            await asyncio.wait([checkpoint])
            await asyncio.to_thread(close_writer, writer)

    async def checkpoint(self, job: Job, writer: ResultWriter) -> None:
        """Sync the result files and save the counts every few seconds."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            await asyncio.to_thread(writer.sync)
            await self.save(job)

    async def write_rejected_lines(self, job: Job) -> None:
        """Write the error rows of a plan that has no valid line."""
        writer = await asyncio.to_thread(
            ResultWriter, job.files.success, job.files.errors
        )
        # The plan has only errors, so the runner scores nothing.
        runner = PlanRunner(
            job.job_id,
            self.service,
            None,
            writer,
            job.record.request_counts,
            self.load,
            max_in_flight=1,
            busy_in_flight=1,
            priority=self.config.priority,
        )
        try:
            await runner.run(job.files.plan, 0)
        finally:
            await asyncio.to_thread(close_writer, writer)

    async def finish(
        self, job: Job, status: JobStatus, error: str | None = None
    ) -> None:
        record = job.record
        record.status = status
        record.finished_at = utc_now()
        record.error = error
        await self.save(job)
        counts = record.request_counts
        logger.info(
            "job %s: %s (%d lines: %d completed, %d failed)%s",
            job.job_id,
            status.value,
            counts.total,
            counts.completed,
            counts.failed,
            f": {error}" if error else "",
        )

    async def save(self, job: Job) -> None:
        """Write the job's record atomically; saves of one job never overlap."""
        async with job.save_lock:
            snapshot = job.record.model_copy(deep=True)
            await asyncio.to_thread(save_record, job.files, snapshot)


def create_job_files(files: JobFiles, raw_input: bytes | None) -> None:
    files.folder.mkdir(parents=True)
    if raw_input is not None:
        with open(files.input, "wb") as file:
            file.write(raw_input)
            file.flush()
            os.fsync(file.fileno())
    for path in (files.success, files.errors):
        path.touch()


def count_written_rows(files: JobFiles) -> tuple[int, int]:
    return recover_row_count(files.success), recover_row_count(files.errors)


def close_writer(writer: ResultWriter) -> None:
    writer.sync()
    writer.close()


def describe(
    job: Job, file_url: Callable[[str], str] | None = None
) -> BatchRewardModelScoringJob:
    """Return the job as the API shows it; ``file_url`` maps success or error to
    the URL that serves that file."""
    record = job.record
    files = job.files
    input_path = record.input
    if input_path.type == PathType.RAW_BYTES:
        input_path = Path(type=PathType.FILEPATH, value=str(files.input))
    return BatchRewardModelScoringJob(
        job_id=record.job_id,
        created=record.created,
        status=record.status,
        input_file_path=input_path,
        success_file_path=Path(type=PathType.FILEPATH, value=str(files.success)),
        error_file_path=Path(type=PathType.FILEPATH, value=str(files.errors)),
        metadata=record.metadata,
        request_counts=record.request_counts.model_copy(),
        reward_model=record.reward_model,
        scoring_function=record.scoring_function,
        started_at=record.started_at,
        finished_at=record.finished_at,
        error=record.error,
        success_file_url=file_url("success") if file_url else None,
        error_file_url=file_url("error") if file_url else None,
    )
