"""Errors of the job API, and the exceptions that stop a job.

Jobs have three tiers of errors. A submission that cannot become a job is
rejected with a ``ServiceError`` (HTTP 4xx or 503). A job that cannot go on
raises ``JobFailure`` and ends ``failed``. A line that cannot be scored becomes
a row of the job's error file, and the job goes on. Besides these,
``JobInterrupted`` stops a job whose engine died, without finishing it, so
that it resumes when the server restarts.
"""

from __future__ import annotations

import logging

from server.errors import ServiceError

logger = logging.getLogger(__name__)


class JobStateError(ServiceError):
    """The job's status does not allow the request, such as cancelling a
    completed job (HTTP 409)."""

    status_code = 409
    error_type = "conflict_error"


class InputTooLargeError(ServiceError):
    """A ``raw_bytes`` input is larger than the configured maximum (HTTP 413)."""

    status_code = 413
    error_type = "request_too_large"


class JobFailure(Exception):
    """Ends a job as ``failed``; the message is shown as the job's ``error``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobInterrupted(Exception):
    """Stops a job that cannot go on until the server restarts, such as when
    its model's engine died. The job keeps its status and resumes on restart."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
