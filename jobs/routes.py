"""HTTP routes of batch jobs, under ``/reward_model_scoring/submit_job``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from jobs.manager import Job, JobManager, describe
from jobs.protocol import (
    BatchRewardModelScoringJob,
    JobList,
    JobStatus,
    SubmitJobRequest,
)
from jobs.results import complete_rows_end
from server.errors import ErrorResponse, NotFoundError

logger = logging.getLogger(__name__)

ERROR_DESCRIPTIONS = {
    400: "Invalid request; `error.param` names the field.",
    404: "Unknown model, scoring function or job.",
    409: "The job's status does not allow the request.",
    413: "The `raw_bytes` input is larger than the server allows.",
    503: "The job's model failed to start or stopped.",
}


def job_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return the OpenAPI responses of the given error statuses."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


DOWNLOAD_CHUNK_BYTES = 1 << 20

JobId = Annotated[str, Query(description="Id of the job, as returned by submit_job.")]

router = APIRouter(prefix="/reward_model_scoring/submit_job", tags=["jobs"])


def job_manager(request: Request) -> JobManager:
    return request.app.state.job_manager


def job_view(request: Request, job: Job) -> BatchRewardModelScoringJob:
    def file_url(kind: str) -> str:
        url = request.url_for("get_job_file")
        return str(url.include_query_params(job_id=job.job_id, file=kind))

    return describe(job, file_url)


@router.post(
    "/",
    response_model=BatchRewardModelScoringJob,
    responses=job_errors(400, 404, 413, 503),
    summary="Batch scoring using reward models",
)
async def submit_job(body: SubmitJobRequest, request: Request):
    """Submit a JSONL file of conversations to score in the background."""
    job = await job_manager(request).submit(body)
    return job_view(request, job)


@router.get(
    "/job_status",
    response_model=BatchRewardModelScoringJob,
    responses=job_errors(400, 404),
    summary="Get status for an already submitted job",
)
async def job_status(request: Request, job_id: JobId):
    return job_view(request, job_manager(request).get(job_id))


@router.post(
    "/cancel_job",
    response_model=BatchRewardModelScoringJob,
    responses=job_errors(400, 404, 409),
    summary="Cancel a job; the rows it wrote are kept",
)
async def cancel_job(request: Request, job_id: JobId):
    job = await job_manager(request).cancel(job_id)
    return job_view(request, job)


@router.get(
    "/list_jobs",
    response_model=JobList,
    responses=job_errors(400, 404),
    summary="List jobs, newest first",
)
async def list_jobs(
    request: Request,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="Maximum jobs to return.")
    ] = 20,
    after: Annotated[
        str | None, Query(description="Return the jobs listed after this job id.")
    ] = None,
    status: Annotated[
        JobStatus | None, Query(description="Only jobs in this status.")
    ] = None,
):
    jobs, has_more = job_manager(request).list(limit, after, status)
    return JobList(data=[job_view(request, job) for job in jobs], has_more=has_more)


@router.get(
    "/job_file",
    name="get_job_file",
    response_class=StreamingResponse,
    responses={
        **job_errors(400, 404),
        200: {"content": {"application/jsonl": {}}, "description": "JSONL rows."},
    },
    summary="Download a job's success or error file",
)
async def get_job_file(
    request: Request,
    job_id: JobId,
    file: Annotated[
        Literal["success", "error"], Query(description="Which result file.")
    ],
):
    """Serve the complete rows that the file has now.

    While the job runs, the file grows as rows are written. The response ends
    at the last complete row at the time of the request, so its length matches
    its Content-Length header.
    """
    job = job_manager(request).get(job_id)
    path = job.files.success if file == "success" else job.files.errors
    try:
        source = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise NotFoundError(
            f"file: the {file} file of job {job_id} is missing from {path.parent}",
            param="file",
        ) from None
    try:
        length = complete_rows_end(source, os.fstat(source.fileno()).st_size)
    except OSError:
        source.close()
        raise
    source.seek(0)
    return StreamingResponse(
        read_prefix(source, length),
        media_type="application/jsonl",
        headers={
            "content-length": str(length),
            "content-disposition": f'attachment; filename="{job_id}-{file}.jsonl"',
        },
    )


def read_prefix(source: BinaryIO, length: int) -> Iterator[bytes]:
    """Yield the first ``length`` bytes of ``source`` in chunks, then close it."""
    with source:
        remaining = length
        while remaining > 0:
            chunk = source.read(min(DOWNLOAD_CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
