"""Check where a job's input may come from, and open it for streaming.

Local files (``filepath`` and ``file://`` URIs) must resolve, after following
``..`` and symbolic links, to a file inside one of ``jobs.input_folders``.
Other URI schemes are read through fsspec, and only when ``jobs.uri_schemes``
enables them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path as FilePath
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from jobs.errors import JobFailure
from jobs.protocol import Path, PathType
from jobs.store import JobFiles
from server.config import JobsConfig
from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

PARAM = "prompt_with_response_path.value"


class InputLocator:
    """Checks job inputs against the configured folders and URI schemes."""

    def __init__(self, config: JobsConfig) -> None:
        self.config = config
        # Resolved once, so that a symbolic link among the allowed folders
        # themselves is compared by its target.
        self.folders = [os.path.realpath(folder) for folder in config.input_folders]

    def check(self, path: Path) -> None:
        """Raise InvalidRequestError (HTTP 400) unless the input may be read."""
        if path.type == PathType.FILEPATH:
            check_regular_file(self.local_path(path.value), path.value)
        elif path.type == PathType.URI:
            scheme = self.uri_scheme(path.value)
            if scheme == "file":
                local = self.local_path(file_uri_path(path.value))
                check_regular_file(local, path.value)
            else:
                check_fsspec_scheme(scheme)

    def local_path(self, value: str) -> str:
        """Return the resolved path of a local input; 400 unless it is allowed."""
        if not self.folders:
            raise InvalidRequestError(
                "prompt_with_response_path: this server reads no local files "
                "because its jobs.input_folders setting is empty; send the input "
                "as raw_bytes",
                param=PARAM,
            )
        if "\0" in value or not os.path.isabs(value):
            raise InvalidRequestError(
                f"{PARAM}: {value!r} is not an absolute path", param=PARAM
            )
        resolved = os.path.realpath(value)
        if not self.is_allowed(resolved):
            raise InvalidRequestError(
                f"{PARAM}: {value!r} is outside the allowed input folders "
                f"({', '.join(self.folders)}), after resolving '..' and symbolic "
                f"links; copy the file into one of them",
                param=PARAM,
            )
        return resolved

    def is_allowed(self, resolved: str) -> bool:
        return any(
            resolved == folder or resolved.startswith(folder.rstrip(os.sep) + os.sep)
            for folder in self.folders
        )

    def uri_scheme(self, uri: str) -> str:
        """Return the URI's scheme; 400 unless it is ``file`` or enabled."""
        scheme = urlsplit(uri).scheme.lower()
        if not scheme:
            raise InvalidRequestError(
                f"{PARAM}: {uri!r} is not a URI; write it as scheme://location, "
                f"for example file:///data/input.jsonl",
                param=PARAM,
            )
        if scheme != "file" and scheme not in self.config.uri_schemes:
            enabled = ", ".join(["file", *self.config.uri_schemes])
            raise InvalidRequestError(
                f"{PARAM}: URI scheme {scheme!r} is not enabled on this server "
                f"(enabled: {enabled}); an operator can add it to jobs.uri_schemes",
                param=PARAM,
            )
        return scheme

    @contextmanager
    def open(self, path: Path, files: JobFiles) -> Iterator[BinaryIO]:
        """Open the input for binary reading; raise JobFailure when it cannot be."""
        if path.type == PathType.RAW_BYTES:
            with open_local_file(str(files.input)) as file:
                yield file
            return
        try:
            if path.type == PathType.FILEPATH:
                location = self.local_path(path.value)
            elif self.uri_scheme(path.value) == "file":
                location = self.local_path(file_uri_path(path.value))
            else:
                location = None
        except InvalidRequestError as error:
            # The configuration changed since the job was submitted.
            raise JobFailure(error.message) from error
        if location is None:
            with open_remote_file(path.value) as file:
                yield file
            return
        with open_local_file(location, self.is_allowed) as file:
            yield file


def file_uri_path(uri: str) -> str:
    """Return the local path of a ``file://`` URI; 400 for another host."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequestError(
            f"{PARAM}: file URI {uri!r} names host {parts.netloc!r}; only local "
            f"files (file:///path) can be read",
            param=PARAM,
        )
    return unquote(parts.path)


def check_regular_file(resolved: str, value: str) -> None:
    """Raise InvalidRequestError unless ``resolved`` is a readable regular file.

    The job opens the file again when it runs, so a file removed after the
    submission still makes the job fail with the reason.
    """
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise InvalidRequestError(
            f"{PARAM}: {value!r} does not exist", param=PARAM
        ) from None
    except OSError as error:
        raise InvalidRequestError(
            f"{PARAM}: cannot read {value!r}: {error.strerror}", param=PARAM
        ) from None
    if not stat.S_ISREG(mode):
        raise InvalidRequestError(
            f"{PARAM}: {value!r} is not a regular file", param=PARAM
        )
    if not os.access(resolved, os.R_OK):
        raise InvalidRequestError(
            f"{PARAM}: {value!r} is not readable by the server", param=PARAM
        )


def check_fsspec_scheme(scheme: str) -> None:
    """Raise InvalidRequestError unless fsspec can read this scheme here."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as error:
        raise InvalidRequestError(
            f"{PARAM}: this server cannot read {scheme}:// URIs: {error}",
            param=PARAM,
        ) from error


@contextmanager
def open_local_file(location: str, is_allowed=None) -> Iterator[BinaryIO]:
    """Open a regular file; raise JobFailure with the reason when that fails.

    With ``is_allowed``, the path of the opened file is checked again, so that
    a symbolic link swapped in after the submission is still rejected.
    """
    try:
        if not stat.S_ISREG(os.stat(location).st_mode):
            raise JobFailure(f"cannot read input {location}: not a regular file")
        file = open(location, "rb")  # noqa: SIM115
    except FileNotFoundError as error:
        raise JobFailure(f"cannot read input {location}: file not found") from error
    except OSError as error:
        raise JobFailure(f"cannot read input {location}: {error}") from error
    with file:
        if is_allowed is not None:
            opened = opened_path(file)
            if opened is not None and not is_allowed(opened):
                raise JobFailure(
                    f"cannot read input {location}: it now resolves to {opened}, "
                    f"outside the allowed input folders"
                )
        yield file


def opened_path(file: BinaryIO) -> str | None:
    """Return the path that the kernel reports for an open file, where it can."""
    link = FilePath(f"/proc/self/fd/{file.fileno()}")
    try:
        return os.readlink(link)
    except OSError:
        return None


@contextmanager
def open_remote_file(uri: str) -> Iterator[BinaryIO]:
    """Open a URI through fsspec; raise JobFailure with the reason on failure."""
    import fsspec

    try:
        file = fsspec.open(uri, "rb").open()
    except Exception as error:
        # fsspec backends raise their own exception types.
        raise JobFailure(f"cannot read input {uri}: {error}") from error
    with file:
        yield file
