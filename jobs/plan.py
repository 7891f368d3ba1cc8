"""Read a job's input line by line, validate each line, and write the plan.

The plan is a JSONL file with one entry per non-blank input line, in input
order: ``{"line", "custom_id", "request"}`` for a line that became a scoring
request, or ``{"line", "custom_id", "error"}`` for a line that was rejected.
Running the job means going through the plan in order, so the result files
follow it too.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from pydantic import ValidationError

from jobs.errors import JobFailure
from jobs.protocol import BatchRequestLine
from server.errors import describe_validation_error
from server.protocol import RewardModelScoringRequest

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
UTF8_BOM = b"\xef\xbb\xbf"
INVALID = "invalid_request_error"
SIMPLE_LINE_FIELDS = frozenset({"custom_id", "prompt_with_response"})
BATCH_LINE_FIELDS = frozenset({"method", "url", "body"})
# Names that OpenAI-style request bodies use, accepted in batch lines.
BODY_ALIASES = {"model": "reward_model", "messages": "prompt_with_response"}


@dataclass(frozen=True)
class LineDefaults:
    """Job-level values for the lines that do not set their own."""

    reward_model: str
    scoring_function: dict[str, Any] | None
    options: dict[str, Any] | None


@dataclass
class PlanSummary:
    """Line counts of a plan: non-blank lines, and those that became requests."""

    total: int = 0
    valid: int = 0


def iter_lines(
    stream: BinaryIO, max_line_bytes: int
) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line number, content)`` for each line, numbered from 1.

    The content has no line ending. It is None for a line longer than
    ``max_line_bytes``, which is skipped without being held in memory.
    """
    buffer = bytearray()
    too_long = False
    number = 0
    while True:
        chunk = stream.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not too_long:
                    buffer += chunk[start:]
                    if len(buffer) > max_line_bytes:
                        too_long = True
                        buffer.clear()
                break
            number += 1
            if too_long:
                yield number, None
            elif buffer:
                buffer += chunk[start:end]
                content = bytes(buffer)
                yield number, None if len(content) > max_line_bytes else content
            else:
                content = chunk[start:end]
                yield number, None if len(content) > max_line_bytes else content
            buffer.clear()
            too_long = False
            start = end + 1
    if too_long:
        yield number + 1, None
    elif buffer:
        yield number + 1, bytes(buffer)


def json_type_name(value: Any) -> str:
    """Return the JSON name of a parsed value's type, with an article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def error_entry(
    line: int, custom_id: str | None, message: str, param: str | None = None
) -> dict[str, Any]:
    return {
        "line": line,
        "custom_id": custom_id,
        "error": {"type": INVALID, "message": message, "param": param},
    }


def unknown_field_entry(
    line: int, custom_id: str, data: dict[str, Any], allowed: frozenset[str]
) -> dict[str, Any] | None:
    """Return an error entry for the first field of ``data`` not in ``allowed``."""
    unknown = sorted(data.keys() - allowed)
    if not unknown:
        return None
    return error_entry(
        line,
        custom_id,
        f"{unknown[0]}: unknown field; a line has custom_id and "
        f"prompt_with_response, or custom_id, method, url and body",
        unknown[0],
    )


def validation_error_entry(
    line: int, custom_id: str, error: ValidationError, prefix: str = ""
) -> dict[str, Any]:
    """Return an error entry naming every invalid field of the line."""
    details = [describe_validation_error(item) for item in error.errors()]
    message = "; ".join(prefix + text for _, text in details)
    return error_entry(line, custom_id, message, prefix + details[0][0])


class LineParser:
    """Turns input lines into plan entries and remembers the custom_ids seen.

    Each custom_id is kept as a 16-byte digest, so checking uniqueness costs
    about 100 bytes of memory per line, whatever the length of the ids.
    """

    def __init__(self, defaults: LineDefaults) -> None:
        self.defaults = defaults
        self.seen: set[bytes] = set()

    def parse(self, line: int, content: bytes) -> dict[str, Any]:
        """Return the plan entry of one non-blank line."""
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError as error:
            return error_entry(line, None, f"invalid JSON: {error}")
        if not isinstance(data, dict):
            return error_entry(
                line,
                None,
                f"a line must be a JSON object, but this one is {json_type_name(data)}",
            )

        custom_id = data.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problem = "missing" if custom_id is None else "must be a non-empty string"
            return error_entry(line, None, f"custom_id: {problem}", "custom_id")
        digest = hashlib.blake2b(custom_id.encode("utf-8"), digest_size=16).digest()
        if digest in self.seen:
            return error_entry(
                line,
                custom_id,
                f"custom_id: {custom_id!r} is used by an earlier line; custom_id "
                f"values must be unique within a file",
                "custom_id",
            )
        self.seen.add(digest)

        if BATCH_LINE_FIELDS & data.keys():
            return self.parse_batch_line(line, custom_id, data)
        return self.parse_simple_line(line, custom_id, data)

    def parse_simple_line(
        self, line: int, custom_id: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        unknown = unknown_field_entry(line, custom_id, data, SIMPLE_LINE_FIELDS)
        if unknown is not None:
            return unknown
        request: dict[str, Any] = {"reward_model": self.defaults.reward_model}
        if "prompt_with_response" in data:
            request["prompt_with_response"] = data["prompt_with_response"]
        if self.defaults.scoring_function is not None:
            request["scoring_function"] = self.defaults.scoring_function
        if self.defaults.options is not None:
            request["options"] = self.defaults.options
        try:
            RewardModelScoringRequest.model_validate(request)
        except ValidationError as error:
            return validation_error_entry(line, custom_id, error)
        return {"line": line, "custom_id": custom_id, "request": request}

    def parse_batch_line(
        self, line: int, custom_id: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        unknown = unknown_field_entry(
            line, custom_id, data, BATCH_LINE_FIELDS | {"custom_id"}
        )
        if unknown is not None:
            return unknown
        try:
            batch_line = BatchRequestLine.model_validate(data)
        except ValidationError as error:
            return validation_error_entry(line, custom_id, error)

        body = dict(batch_line.body)
        used_aliases = {}
        for alias, name in BODY_ALIASES.items():
            if alias not in body:
                continue
            if name in body:
                return error_entry(
                    line,
                    custom_id,
                    f"body.{alias}: give {name} or {alias}, not both",
                    f"body.{alias}",
                )
            body[name] = body.pop(alias)
            used_aliases[name] = alias
        entry = self.parse_batch_body(line, custom_id, body)
        if "error" in entry and used_aliases:
            # Errors name the fields as the line spelled them.
            error = entry["error"]
            for name, alias in used_aliases.items():
                for key in ("message", "param"):
                    if error[key]:
                        error[key] = error[key].replace(f"body.{name}", f"body.{alias}")
        return entry

    def parse_batch_body(
        self, line: int, custom_id: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Return the plan entry of a batch line's body, with the job's defaults."""
        reward_model = body.setdefault("reward_model", self.defaults.reward_model)
        if reward_model != self.defaults.reward_model:
            return error_entry(
                line,
                custom_id,
                f"body.reward_model: {reward_model!r} differs from the job's "
                f"reward_model {self.defaults.reward_model!r}; a job scores with "
                f"one model",
                "body.reward_model",
            )
        if "scoring_function" not in body and self.defaults.scoring_function:
            body["scoring_function"] = self.defaults.scoring_function
        if "options" not in body and self.defaults.options is not None:
            body["options"] = self.defaults.options
        try:
            RewardModelScoringRequest.model_validate(body)
        except ValidationError as error:
            return validation_error_entry(line, custom_id, error, prefix="body.")
        return {"line": line, "custom_id": custom_id, "request": body}


def build_plan(
    stream: BinaryIO,
    plan: BinaryIO,
    defaults: LineDefaults,
    max_line_bytes: int,
    stop: threading.Event,
    on_line: Callable[[PlanSummary], None] | None = None,
) -> PlanSummary:
    """Write the plan entry of every non-blank line of ``stream`` to ``plan``.

    Blank lines are skipped but still counted in line numbers. Stops early,
    with a partial plan, when ``stop`` is set. Raises JobFailure when the
    input cannot be read.
    """
    parser = LineParser(defaults)
    summary = PlanSummary()
    lines = iter_lines(stream, max_line_bytes)
    while not stop.is_set():
        try:
            item = next(lines, None)
        except Exception as error:
            # Local files raise OSError; fsspec backends raise their own types.
            raise JobFailure(f"reading the input failed: {error}") from error
        if item is None:
            break
        line, content = item
        if content is not None:
            if line == 1:
                content = content.removeprefix(UTF8_BOM)
            content = content.rstrip(b"\r")
            if not content.strip():
                continue
            entry = parser.parse(line, content)
        else:
            entry = error_entry(
                line,
                None,
                f"the line is longer than {max_line_bytes} bytes (the server's "
                f"jobs.max_line_bytes); shorten it or split the conversation",
            )
        plan.write(orjson.dumps(entry))
        plan.write(b"\n")
        summary.total += 1
        summary.valid += "request" in entry
        if on_line is not None:
            on_line(summary)
    return summary
