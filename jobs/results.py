"""Append result rows to a job's success and error files, in plan order.

Rows are written in plan order, one ``write`` per run of rows that go to the
same file, so the rows written so far are always the results of the first N
plan entries. When the process dies, only the last row written can be cut
off. ``recover_row_count`` removes such a partial row, and the counts of both
files add up to N, so a resumed job starts at plan entry N.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path as FilePath
from typing import BinaryIO

logger = logging.getLogger(__name__)

TAIL_READ_BYTES = 1 << 16


def complete_rows_end(file: BinaryIO, size: int) -> int:
    """Return the offset just after the last newline in the first ``size``
    bytes of ``file``, or 0 when there is none."""
    end = size
    while end > 0:
        start = max(0, end - TAIL_READ_BYTES)
        file.seek(start)
        newline = file.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def recover_row_count(path: FilePath) -> int:
    """Truncate a partial last row of ``path`` and return the complete rows.

    NOTE: this relies on the kernel having every row written before the
    process died. After a power loss, one file may lose rows that the other
    kept, and a resumed job may then repeat or skip lines.
    """
    if not path.exists():
        return 0
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        end = complete_rows_end(file, size)
        if end < size:
            logger.warning(
                "%s: removing %d bytes of a partially written last row",
                path,
                size - end,
            )
            file.truncate(end)
            file.flush()
            os.fsync(file.fileno())

        file.seek(0)
        rows = 0
        while chunk := file.read(1 << 20):
            rows += chunk.count(b"\n")
    return rows


class ResultWriter:
    """Appends rows to the success and error files without buffering.

    Each row goes to the kernel as soon as ``write`` returns, so killing the
    process loses no row that was written. ``sync`` makes them survive a
    machine crash too.
    """

    def __init__(self, success_path: FilePath, error_path: FilePath) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self.paths = {True: success_path, False: error_path}
        self.descriptors = {
            ok: os.open(path, flags, 0o644) for ok, path in self.paths.items()
        }

    def write(self, rows: list[tuple[bool, bytes]]) -> None:
        """Write ``(succeeded, row)`` pairs in order; each row ends with a newline."""
        start = 0
        while start < len(rows):
            succeeded = rows[start][0]
            end = start
            while end < len(rows) and rows[end][0] == succeeded:
                end += 1
            data = b"".join(row for _, row in rows[start:end])
            self._write_all(self.descriptors[succeeded], data)
            start = end

    @staticmethod
    def _write_all(descriptor: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]

    def sync(self) -> None:
        for descriptor in self.descriptors.values():
            os.fsync(descriptor)

    def close(self) -> None:
        for descriptor in self.descriptors.values():
            os.close(descriptor)
        self.descriptors = {}
