"""Command line: ``python -m jobs`` scores a JSONL file offline.

The file runs as a job through the same JobManager and ScoringService as in
the server, on one engine started in this process, without HTTP. The job's
record and result files go to the jobs folder, so an interrupted run can be
resumed with ``--resume JOB_ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from jobs.manager import Job, JobManager, check_jobs_folder, describe
from jobs.protocol import JobStatus, Path, PathType, SubmitJobRequest
from jobs.store import JobFiles, JobRecord
from server.cli import (
    add_log_level_argument,
    load_server_config,
    parse_model_spec,
)
from server.config import ModelConfig, ServerConfig
from server.errors import ServiceError, describe_validation_errors

if TYPE_CHECKING:
    from scoring_functions.registry import ScoringFunctionRegistry

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
EXIT_FAILED = 1
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs",
        description="Score a JSONL file of conversations offline, as a batch job "
        "on an engine started in this process. Each line is "
        '{"custom_id": ..., "prompt_with_response": [messages]} or an OpenAI '
        "batch-style request line.",
    )
    parser.add_argument(
        "input", nargs="?", type=FilePath, help="JSONL file to score (UTF-8)."
    )
    parser.add_argument(
        "--resume",
        metavar="JOB_ID",
        help="Resume an unfinished job from the jobs folder instead of scoring INPUT.",
    )
    parser.add_argument(
        "--reward-model",
        help="Id of the model to score with; default: the only configured model.",
    )
    parser.add_argument(
        "--scoring-function",
        help="Scoring function id; default: the model kind's default function.",
    )
    parser.add_argument(
        "--params",
        type=json_object,
        default={},
        help="Scoring function params, as a JSON object; needs --scoring-function.",
    )
    parser.add_argument(
        "--options",
        type=json_object,
        help="Request options for every line that sets none, as a JSON object.",
    )
    parser.add_argument(
        "--metadata",
        type=json_object,
        default={},
        help="Metadata stored with the job, as a JSON object.",
    )
    parser.add_argument(
        "--config", type=FilePath, help="TOML or YAML settings file, as for the server."
    )
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model_spec,
        default=[],
        metavar="SPEC",
        help="A model, as for `python -m server --model`; adds to --config.",
    )
    parser.add_argument(
        "--jobs-dir",
        type=FilePath,
        help="Folder for the job's record and result files; default: jobs.folder "
        "of the settings (data/jobs). A job that a running server holds is "
        "not run here.",
    )
    add_log_level_argument(parser, default="warning")
    return parser


def load_config(args: argparse.Namespace) -> ServerConfig:
    """Return the settings with the jobs folder and input folder of this run."""
    server_args = argparse.Namespace(
        config=args.config, model=args.model, host=None, port=None
    )
    config = load_server_config(server_args)
    jobs = config.jobs
    if args.jobs_dir is not None:
        jobs.folder = args.jobs_dir
    if args.input is not None:
        folder = FilePath(os.path.realpath(args.input)).parent
        jobs.input_folders = [*jobs.input_folders, folder]
    return config


def pick_model(config: ServerConfig, model_id: str | None) -> ModelConfig:
    models = {model.id: model for model in config.models}
    if model_id is None and len(models) == 1:
        return next(iter(models.values()))
    if model_id is None:
        raise ValueError(
            f"--reward-model is required because several models are configured: "
            f"{', '.join(sorted(models))}"
        )
    if model_id not in models:
        raise ValueError(
            f"--reward-model {model_id!r} is not configured; configured models: "
            f"{', '.join(sorted(models))}"
        )
    return models[model_id]


def read_resumed_record(config: ServerConfig, job_id: str) -> JobRecord:
    files = JobFiles(FilePath(config.jobs.folder).resolve() / job_id)
    try:
        return JobRecord.model_validate_json(files.record.read_bytes())
    except FileNotFoundError as error:
        raise ValueError(
            f"--resume: no job {job_id} in {files.folder.parent}; pass the "
            f"--jobs-dir that the job was started with"
        ) from error


class Progress:
    """A tqdm progress bar that follows a job's counts."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(unit="line", desc=JobStatus.VALIDATING.value, file=sys.stderr)
        self.status = JobStatus.VALIDATING

    def update(self, job: Job) -> None:
        record = job.record
        counts = record.request_counts
        if record.status == JobStatus.VALIDATING:
            self.bar.n = counts.total
        else:
            if self.status == JobStatus.VALIDATING:
                self.bar.reset(total=counts.total)
            self.bar.n = counts.completed + counts.failed
            self.bar.set_postfix(failed=counts.failed, refresh=False)
        self.status = record.status
        description = record.status.value
        if record.status == JobStatus.VALIDATING and record.valid_lines is not None:
            description = "waiting for the model"
        self.bar.set_description(description, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def build_checked_registry(
    config: ServerConfig, model_config: ModelConfig
) -> ScoringFunctionRegistry:
    """Load the scoring functions and check the settings before any engine starts.

    Raises ValueError or TypeError for invalid plug-ins, scoring_params or
    jobs folder.
    """
    from scoring_functions.registry import build_registry, check_scoring_params

    registry = build_registry(
        config.scoring_function_modules, config.scoring_function_entry_points
    )
    check_scoring_params(registry, [model_config])
    # JobManager checks it again inside the event loop, where an error would
    # end in a traceback instead of a usage message.
    check_jobs_folder(FilePath(config.jobs.folder).resolve())
    return registry


async def run_job(
    config: ServerConfig,
    model_config: ModelConfig,
    registry: ScoringFunctionRegistry,
    request: SubmitJobRequest | None,
    resume_id: str | None,
    started: list[Job],
) -> Job:
    """Start the engine and the job, and follow the job until it stops."""
    from server.app import start_engine
    from server.engine import ModelEngine, import_engine_libraries
    from server.serving import ScoringService

    engine = ModelEngine(model_config)
    service = ScoringService({engine.id: engine}, registry)
    manager = JobManager(config.jobs, service)
    await manager.start(resume=False)
    progress = None
    starting = None
    try:
        # The input is validated while the engine starts.
        job = manager.resume(resume_id) if resume_id else await manager.submit(request)
        started.append(job)
        await asyncio.to_thread(import_engine_libraries)
        starting = asyncio.create_task(start_engine(engine))
        progress = Progress()
        while not job.task.done():
            progress.update(job)
            await asyncio.wait([job.task], timeout=PROGRESS_INTERVAL_S)
        progress.update(job)
        return job
    finally:
        if progress is not None:
            progress.close()
        await manager.stop()
        if starting is not None:
            # The engine process may still be starting in a worker thread.
            await asyncio.wait([starting])
        engine.shutdown()


def write_line(text: str) -> None:
    """Write one line of the command's output to stdout."""
    sys.stdout.write(text + "\n")


def print_summary(
    job: Job, elapsed_s: float, jobs_dir: FilePath, resumed: bool
) -> None:
    """Print the job's outcome and counts.

    The scoring rate is printed only for a job begun in this run, because a
    resumed job's start time is that of its first run.
    """
    view = describe(job)
    counts = view.request_counts
    done = counts.completed + counts.failed
    write_line(f"job {view.job_id}: {view.status.value}")
    write_line(
        f"lines: {counts.total} total, {counts.completed} completed, "
        f"{counts.failed} failed"
    )
    write_line(f"time: {elapsed_s:.1f} s, with the engine start")
    if not resumed and view.started_at and view.finished_at:
        scoring_s = (view.finished_at - view.started_at).total_seconds()
        rate = done / max(scoring_s, 1e-9)
        write_line(f"scoring: {scoring_s:.1f} s ({rate:.1f} lines/s)")
    write_line(f"success file: {view.success_file_path.value}")
    write_line(f"error file: {view.error_file_path.value}")
    if view.error:
        write_line(f"error: {view.error}")
    if not view.status.finished:
        write_line(
            f"resume with: python -m jobs --resume {view.job_id} --jobs-dir {jobs_dir}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.input is None) == (args.resume is None):
        parser.error("give either INPUT or --resume JOB_ID")
    if args.params and args.scoring_function is None:
        parser.error("--params needs --scoring-function to name the function")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Batch schedulers such as Slurm and Kubernetes stop a run with SIGTERM. It
    # takes the Ctrl-C path, which stops the engine and prints how to resume.
    signal.signal(
        signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT)
    )
    # vLLM would otherwise log to stdout, mixed with the summary. Unconfigured,
    # its loggers go through the root logger set up above, to stderr.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    try:
        config = load_config(args)
        request = None
        if args.resume is not None:
            record = read_resumed_record(config, args.resume)
            model_config = pick_model(config, record.reward_model)
        else:
            model_config = pick_model(config, args.reward_model)
            scoring_function = None
            if args.scoring_function is not None:
                scoring_function = {
                    "name": args.scoring_function,
                    "params": args.params,
                }
            request = SubmitJobRequest(
                reward_model=model_config.id,
                prompt_with_response_path=Path(
                    type=PathType.FILEPATH, value=os.path.realpath(args.input)
                ),
                scoring_function=scoring_function,
                metadata=args.metadata,
                options=args.options,
            )
        registry = build_checked_registry(config, model_config)
    except ValidationError as error:
        # Names each invalid field, such as options.max_tokens, in one line.
        parser.error(describe_validation_errors(error.errors())[1])
    except (ValueError, TypeError, OSError) as error:
        parser.error(str(error))

    started: list[Job] = []
    began = time.monotonic()
    try:
        job = asyncio.run(
            run_job(config, model_config, registry, request, args.resume, started)
        )
    except ServiceError as error:
        parser.error(error.message)
    except KeyboardInterrupt:
        if started:
            print_summary(
                started[0],
                time.monotonic() - began,
                config.jobs.folder,
                args.resume is not None,
            )
        return EXIT_INTERRUPTED
    print_summary(
        job, time.monotonic() - began, config.jobs.folder, args.resume is not None
    )
    if job.record.status == JobStatus.COMPLETED:
        return 0
    return EXIT_FAILED if job.record.status.finished else EXIT_STOPPED
