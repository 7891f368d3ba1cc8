"""Wire models of the batch job API and of the lines of a job's input file.

Schema names follow the API specification (``Path``,
``BatchRewardModelScoringJob``); fields beyond it are marked as extensions in
their descriptions.
"""

from __future__ import annotations

import enum
import logging
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol import Options, ScoringFunction

logger = logging.getLogger(__name__)


class PathType(enum.StrEnum):
    RAW_BYTES = "raw_bytes"
    FILEPATH = "filepath"
    URI = "uri"


class Path(BaseModel):
    """A JSONL file: its text, a file on the server, or a URI."""

    model_config = ConfigDict(extra="forbid")

    type: PathType = Field(
        description="`raw_bytes`: `value` is the JSONL text itself, as a JSON "
        "string (not base64); the server stores it as UTF-8. `filepath`: a file "
        "on the server under a configured input folder. `uri`: `file://` under an "
        "input folder, or a scheme enabled in the server's configuration."
    )
    value: str = Field(description="The text, path or URI.")


class SubmitJobRequest(BaseModel):
    """Body of ``POST /reward_model_scoring/submit_job/``."""

    model_config = ConfigDict(extra="forbid")

    reward_model: str = Field(description="Id of a served model (see /v1/models).")
    prompt_with_response_path: Path = Field(
        description="JSONL input: each line is an object with `custom_id` and "
        "`prompt_with_response`, or an OpenAI batch-style request line."
    )
    scoring_function: ScoringFunction | None = Field(
        None, description="Default: the model kind's default function."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Metadata to carry forward in the job."
    )
    options: Options | None = Field(
        None,
        description="Extension. Options for every line that has none of its own. "
        "`priority` is ignored: jobs run at the server's job priority.",
    )


class JobStatus(enum.StrEnum):
    VALIDATING = "validating"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class RequestCounts(BaseModel):
    """Line counts of a job."""

    total: int = Field(
        0,
        description="Non-blank input lines; final once the job leaves "
        "`validating`, lines read so far before that.",
    )
    completed: int = Field(0, description="Rows in the success file.")
    failed: int = Field(0, description="Rows in the error file.")


class BatchRewardModelScoringJob(BaseModel):
    """A batch scoring job as the status, submit, cancel and list routes return it."""

    job_id: str
    created: datetime
    status: JobStatus
    input_file_path: Path = Field(
        description="The submitted input; for `raw_bytes`, the stored copy."
    )
    success_file_path: Path = Field(description="JSONL rows of the scored lines.")
    error_file_path: Path = Field(description="JSONL rows of the failed lines.")
    metadata: dict[str, Any] = Field(
        description="Metadata carried forward from the job submission."
    )
    request_counts: RequestCounts = Field(description="Extension.")
    reward_model: str = Field(description="Extension.")
    scoring_function: ScoringFunction | None = Field(None, description="Extension.")
    started_at: datetime | None = Field(
        None, description="Extension. When the job started running."
    )
    finished_at: datetime | None = Field(
        None, description="Extension. When the job completed, failed or was cancelled."
    )
    error: str | None = Field(
        None, description="Extension. Why the job failed or was cancelled."
    )
    success_file_url: str | None = Field(
        None, description="Extension. URL that serves the success file over HTTP."
    )
    error_file_url: str | None = Field(
        None, description="Extension. URL that serves the error file over HTTP."
    )


class JobList(BaseModel):
    """Body of ``GET /reward_model_scoring/submit_job/list_jobs``."""

    object: Literal["list"] = "list"
    data: list[BatchRewardModelScoringJob]
    has_more: bool = Field(description="More jobs follow the last one listed.")


class BatchRequestLine(BaseModel):
    """An input line in the OpenAI batch format; ``body`` is a scoring request."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: Literal["/reward_model_scoring/", "/reward_model_scoring"]
    body: dict[str, Any]
