"""Reading and validating job input lines into a plan (no engine)."""

from __future__ import annotations

import io
import json
import threading

import orjson
import pytest

from jobs import plan
from jobs.plan import LineDefaults, LineParser, build_plan, iter_lines

ANSWER = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
]
DEFAULTS = LineDefaults(reward_model="rm", scoring_function=None, options=None)


def simple_line(custom_id: str, messages: list | None = None) -> dict:
    return {"custom_id": custom_id, "prompt_with_response": messages or ANSWER}


def run_plan(text: bytes | str, max_line_bytes: int = 1000, **defaults) -> list:
    if isinstance(text, str):
        text = text.encode("utf-8")
    output = io.BytesIO()
    line_defaults = LineDefaults(**{**DEFAULTS.__dict__, **defaults})
    build_plan(
        io.BytesIO(text), output, line_defaults, max_line_bytes, threading.Event()
    )
    return [orjson.loads(line) for line in output.getvalue().splitlines()]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1 << 20])
def test_iter_lines_across_chunk_sizes(monkeypatch, chunk_bytes):
    monkeypatch.setattr(plan, "READ_CHUNK_BYTES", chunk_bytes)
    text = b"first\n\nthird line\nlast without newline"
    lines = list(iter_lines(io.BytesIO(text), max_line_bytes=100))
    assert lines == [
        (1, b"first"),
        (2, b""),
        (3, b"third line"),
        (4, b"last without newline"),
    ]


@pytest.mark.parametrize("chunk_bytes", [2, 5, 1 << 20])
def test_iter_lines_marks_long_lines(monkeypatch, chunk_bytes):
    monkeypatch.setattr(plan, "READ_CHUNK_BYTES", chunk_bytes)
    text = b"short\n" + b"x" * 30 + b"\nok\n" + b"y" * 30
    lines = list(iter_lines(io.BytesIO(text), max_line_bytes=10))
    assert lines == [(1, b"short"), (2, None), (3, b"ok"), (4, None)]


def test_plan_keeps_input_order_and_line_numbers():
    text = "\n".join(
        [
            json.dumps(simple_line("a")),
            "",
            "   ",
            json.dumps(simple_line("b")),
        ]
    )
    entries = run_plan(text + "\n")
    assert [entry["line"] for entry in entries] == [1, 4]
    assert [entry["custom_id"] for entry in entries] == ["a", "b"]
    request = entries[0]["request"]
    assert request["reward_model"] == "rm"
    assert request["prompt_with_response"] == ANSWER


def test_plan_accepts_bom_and_crlf():
    text = (
        "\ufeff" + json.dumps(simple_line("a")) + "\r\n" + json.dumps(simple_line("b"))
    )
    entries = run_plan(text)
    assert all("request" in entry for entry in entries), entries


def test_plan_applies_job_defaults():
    entries = run_plan(
        json.dumps(simple_line("a")),
        scoring_function={"name": "raw", "params": {"label": 1}},
        options={"truncation": "error"},
    )
    request = entries[0]["request"]
    assert request["scoring_function"] == {"name": "raw", "params": {"label": 1}}
    assert request["options"] == {"truncation": "error"}


@pytest.mark.parametrize(
    ("line", "param", "message"),
    [
        pytest.param("{not json", None, "invalid JSON", id="bad-json"),
        pytest.param("[1, 2]", None, "this one is an array", id="array"),
        pytest.param("null", None, "this one is null", id="null"),
        pytest.param('"text"', None, "this one is a string", id="string"),
        pytest.param(
            json.dumps({"prompt_with_response": ANSWER}),
            "custom_id",
            "custom_id: missing",
            id="no-custom-id",
        ),
        pytest.param(
            json.dumps({"custom_id": 7, "prompt_with_response": ANSWER}),
            "custom_id",
            "non-empty string",
            id="numeric-custom-id",
        ),
        pytest.param(
            json.dumps({"custom_id": "a"}),
            "prompt_with_response",
            "Field required",
            id="no-messages",
        ),
        pytest.param(
            json.dumps(
                simple_line("a", [{"role": "robot", "content": "beep"}, ANSWER[1]])
            ),
            "prompt_with_response.0.role",
            "prompt_with_response.0.role",
            id="bad-role",
        ),
        pytest.param(
            json.dumps({**simple_line("a"), "label": 1}),
            "label",
            "unknown field; a line has custom_id and",
            id="extra-field",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": {"prompt_with_response": ANSWER},
                    "label": 1,
                }
            ),
            "label",
            "unknown field; a line has custom_id and",
            id="batch-extra-field",
        ),
        pytest.param(
            json.dumps(
                {"custom_id": "a", "method": "GET", "url": "/reward_model_scoring/"}
            ),
            "method",
            "method",
            id="batch-method",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {},
                }
            ),
            "url",
            "url",
            id="batch-url",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": {"reward_model": "other", "prompt_with_response": ANSWER},
                }
            ),
            "body.reward_model",
            "differs from the job's reward_model",
            id="batch-other-model",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": {"prompt_with_response": []},
                }
            ),
            "body.prompt_with_response",
            "body.prompt_with_response",
            id="batch-empty-messages",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": [],
                }
            ),
            "body",
            "body: Input should be a valid dictionary",
            id="batch-body-array",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": {"model": "rm", "reward_model": "rm", "messages": ANSWER},
                }
            ),
            "body.model",
            "give reward_model or model, not both",
            id="batch-model-twice",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": {"model": "rm", "messages": []},
                }
            ),
            "body.messages",
            "body.messages: List should have at least 1 item",
            id="batch-empty-messages-alias",
        ),
        pytest.param(
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/reward_model_scoring/",
                    "body": {"model": "other", "messages": ANSWER},
                }
            ),
            "body.model",
            "body.model: 'other' differs",
            id="batch-other-model-alias",
        ),
    ],
)
def test_plan_rejects_invalid_line(line, param, message):
    (entry,) = run_plan(line)
    assert "request" not in entry
    assert entry["line"] == 1
    assert entry["error"]["type"] == "invalid_request_error"
    assert entry["error"]["param"] == param
    assert message in entry["error"]["message"]


def test_plan_rejects_duplicate_custom_id():
    lines = [
        json.dumps(simple_line("a")),
        json.dumps({"custom_id": "b"}),
        json.dumps(simple_line("a")),
        json.dumps(simple_line("b")),
    ]
    entries = run_plan("\n".join(lines))
    assert ["request" in entry for entry in entries] == [True, False, False, False]
    for entry in entries[2:]:
        assert entry["error"]["param"] == "custom_id"
        assert "earlier line" in entry["error"]["message"]


def test_plan_marks_long_line():
    entries = run_plan(
        json.dumps(simple_line("a", [{"role": "user", "content": "x" * 200}]))
        + "\n"
        + json.dumps(simple_line("b")),
        max_line_bytes=150,
    )
    assert "longer than 150 bytes" in entries[0]["error"]["message"]
    assert entries[0]["custom_id"] is None
    assert entries[1]["custom_id"] == "b"
    assert "request" in entries[1]


def test_plan_rejects_invalid_utf8():
    (entry,) = run_plan(b'{"custom_id": "\xff"}')
    assert "invalid JSON" in entry["error"]["message"]


def test_batch_line_uses_its_own_function_and_options():
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/reward_model_scoring/",
        "body": {
            "prompt_with_response": ANSWER,
            "scoring_function": {"name": "raw", "params": {"label": 0}},
            "options": {"return_token_ids": True},
        },
    }
    (entry,) = run_plan(
        json.dumps(line),
        scoring_function={"name": "other"},
        options={"truncation": "error"},
    )
    request = entry["request"]
    assert request["reward_model"] == "rm"
    assert request["scoring_function"] == {"name": "raw", "params": {"label": 0}}
    assert request["options"] == {"return_token_ids": True}


def test_batch_line_takes_job_defaults():
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/reward_model_scoring",
        "body": {"reward_model": "rm", "prompt_with_response": ANSWER},
    }
    (entry,) = run_plan(
        json.dumps(line), scoring_function={"name": "raw"}, options={"logprobs": True}
    )
    assert entry["request"]["scoring_function"] == {"name": "raw"}
    assert entry["request"]["options"] == {"logprobs": True}


def test_batch_line_accepts_openai_names():
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/reward_model_scoring/",
        "body": {"model": "rm", "messages": ANSWER},
    }
    (entry,) = run_plan(json.dumps(line))
    assert entry["request"] == {"reward_model": "rm", "prompt_with_response": ANSWER}


def test_plan_stops_when_asked():
    text = "\n".join(json.dumps(simple_line(f"c{i}")) for i in range(10))
    stop = threading.Event()
    output = io.BytesIO()
    seen = []

    def on_line(summary):
        seen.append(summary.total)
        if summary.total == 3:
            stop.set()

    summary = build_plan(
        io.BytesIO(text.encode()), output, DEFAULTS, 1000, stop, on_line
    )
    assert summary.total == 3
    assert len(output.getvalue().splitlines()) == 3


def test_line_parser_counts_valid_lines():
    parser = LineParser(DEFAULTS)
    entries = [
        parser.parse(1, json.dumps(simple_line("a")).encode()),
        parser.parse(2, b"{}"),
    ]
    assert ["request" in entry for entry in entries] == [True, False]
