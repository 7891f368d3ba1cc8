"""Job records on disk: one folder per job, with its record written atomically.

A job folder ``<jobs folder>/<job_id>/`` contains:

- ``job.json``: the ``JobRecord``, replaced atomically on every change;
- ``job.lock``: locked by the process that runs the job;
- ``input.jsonl``: the submitted text of a ``raw_bytes`` input;
- ``plan.jsonl``: one entry per non-blank input line, written while the job is
  ``validating``: the validated request, or the error that rejected the line;
- ``success.jsonl`` and ``errors.jsonl``: the result rows.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path as FilePath
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from jobs.protocol import JobStatus, Path, RequestCounts
from server.protocol import Options, ScoringFunction

logger = logging.getLogger(__name__)

RECORD_MODE = 0o644

RECORD_NAME = "job.json"
JOB_ID_PATTERN = re.compile(r"^job-[0-9a-f]{32}$")


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


class JobRecord(BaseModel):
    """The persisted state of a job."""

    job_id: str
    created: datetime
    status: JobStatus
    reward_model: str
    scoring_function: ScoringFunction | None = None
    options: Options | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # For raw_bytes the value is empty: the text is in the job's input.jsonl.
    input: Path
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    # Valid lines in the plan; set when validation ends.
    valid_lines: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class JobFiles:
    """Paths of one job's files."""

    folder: FilePath

    @property
    def record(self) -> FilePath:
        return self.folder / RECORD_NAME

    @property
    def lock(self) -> FilePath:
        return self.folder / "job.lock"

    @property
    def input(self) -> FilePath:
        return self.folder / "input.jsonl"

    @property
    def plan(self) -> FilePath:
        return self.folder / "plan.jsonl"

    @property
    def success(self) -> FilePath:
        return self.folder / "success.jsonl"

    @property
    def errors(self) -> FilePath:
        return self.folder / "errors.jsonl"


def fsync_folder(folder: FilePath) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: FilePath, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file.

    The data is written to a temporary file in the same folder, synced, and
    renamed over ``path``, so a crash never leaves a partial file.
    """
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        # mkstemp creates the file readable by its owner only. The record gets
        # the same permissions as the job's other files.
        os.fchmod(descriptor, RECORD_MODE)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        FilePath(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def lock_job(files: JobFiles) -> int | None:
    """Lock the job for this process and return the lock's file descriptor.

    Returns None when another process holds the lock. Closing the descriptor,
    or the end of the process, releases it.
    """
    descriptor = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def save_record(files: JobFiles, record: JobRecord) -> None:
    write_atomic(files.record, record.model_dump_json(indent=2).encode("utf-8"))


def load_records(root: FilePath) -> list[tuple[JobFiles, JobRecord]]:
    """Load every job under ``root``; skip and log folders without a valid record."""
    jobs = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not JOB_ID_PATTERN.match(folder.name):
            continue
        files = JobFiles(folder)
        for stale in folder.glob(f".{RECORD_NAME}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            record = JobRecord.model_validate_json(files.record.read_bytes())
        except (OSError, ValidationError) as error:
            logger.error("job folder %s skipped: unreadable record: %s", folder, error)
            continue
        if record.job_id != folder.name:
            logger.error(
                "job folder %s skipped: its record is for job %s",
                folder,
                record.job_id,
            )
            continue
        jobs.append((files, record))
    return jobs
