"""Batch jobs end to end through HTTP on real vLLM engines with tiny models."""

from __future__ import annotations

import json

import fsspec
import pytest

from tests.test_jobs_manager import (
    CANCEL,
    STATUS,
    SUBMIT,
    assert_each_line_once,
    job_line,
    messages,
    raw_input,
    read_rows,
    submit,
    wait_for_job,
)

pytestmark = pytest.mark.engine


def single_score(client, model: str, answer: str, **extra) -> dict:
    body = {"reward_model": model, "prompt_with_response": messages(answer), **extra}
    response = client.post("/reward_model_scoring/", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_raw_bytes_job_matches_single_requests(tiny_client):
    answers = [f"Paris is answer {i}." for i in range(6)]
    lines = [job_line(f"c{i}", answer) for i, answer in enumerate(answers)]
    job = submit(
        tiny_client,
        raw_input(lines),
        model="tiny-reward",
        metadata={"run": "rlhf-step-3", "tags": ["a", "b"]},
    )

    status = wait_for_job(tiny_client, job["job_id"])

    assert status["status"] == "completed", status
    assert status["metadata"] == {"run": "rlhf-step-3", "tags": ["a", "b"]}
    assert status["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    success, errors = read_rows(tiny_client, job["job_id"])
    assert errors == []
    assert [row["custom_id"] for row in success] == [f"c{i}" for i in range(6)]
    for row, answer in zip(success, answers, strict=True):
        single = single_score(tiny_client, "tiny-reward", answer)
        assert row["score"] == pytest.approx(single["score"], abs=1e-4)
        assert row["logprob"] == pytest.approx(single["logprob"], abs=1e-4)
        assert row["id"].startswith(job["job_id"])


def test_filepath_job(tiny_client, jobs_input_dir):
    path = jobs_input_dir / "filepath.jsonl"
    path.write_text("\n".join(job_line(f"f{i}") for i in range(3)), encoding="utf-8")
    job = submit(
        tiny_client, {"type": "filepath", "value": str(path)}, model="tiny-multi"
    )
    status = wait_for_job(tiny_client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["input_file_path"] == {"type": "filepath", "value": str(path)}
    success, _ = read_rows(tiny_client, job["job_id"])
    assert list(success[0]["labels"]) == ["bad", "ok", "good"]
    assert success[0]["score"] == success[0]["labels"]["good"]


def test_file_uri_job(tiny_client, jobs_input_dir):
    path = jobs_input_dir / "file-uri.jsonl"
    path.write_text("\n".join(job_line(f"u{i}") for i in range(3)), encoding="utf-8")
    job = submit(tiny_client, {"type": "uri", "value": path.as_uri()}, "tiny-reward")
    status = wait_for_job(tiny_client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["request_counts"]["completed"] == 3


def test_fsspec_uri_job(tiny_client):
    uri = "memory://jobs-engine/input.jsonl"
    with fsspec.open(uri, "w") as file:
        file.write("\n".join(job_line(f"m{i}") for i in range(3)))
    job = submit(tiny_client, {"type": "uri", "value": uri}, "tiny-reward")
    status = wait_for_job(tiny_client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["request_counts"]["completed"] == 3


def test_bad_lines_go_to_error_file(tiny_client):
    lines = [
        job_line("ok-1"),
        "{this is not json",
        json.dumps(
            {
                "custom_id": "bad-role",
                "prompt_with_response": [{"role": "robot", "content": "beep"}],
            }
        ),
        job_line("ok-1", "duplicate id"),
        json.dumps({"prompt_with_response": messages("no id")}),
        job_line(
            "too-long",
            "two plus two is four. " * 40,
        ),
        job_line("ok-2"),
    ]
    job = submit(
        tiny_client,
        raw_input(lines),
        model="tiny-reward",
        options={"truncation": "error"},
    )

    status = wait_for_job(tiny_client, job["job_id"])

    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 7, "completed": 2, "failed": 5}
    success, errors = read_rows(tiny_client, job["job_id"])
    assert [row["custom_id"] for row in success] == ["ok-1", "ok-2"]
    by_line = {row["line"]: row for row in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6]
    assert "invalid JSON" in by_line[2]["error"]["message"]
    assert by_line[3]["error"]["param"] == "prompt_with_response.0.role"
    assert by_line[3]["custom_id"] == "bad-role"
    assert by_line[4]["error"]["param"] == "custom_id"
    assert "earlier line" in by_line[4]["error"]["message"]
    assert by_line[5]["error"]["message"] == "custom_id: missing"
    # Rejected by the engine's context limit while the job ran.
    assert by_line[6]["custom_id"] == "too-long"
    assert by_line[6]["error"]["param"] == "prompt_with_response"
    assert_each_line_once(success, errors, list(range(1, 8)))


def test_job_with_every_line_failing(tiny_client):
    lines = [
        json.dumps(
            {"custom_id": f"u{i}", "prompt_with_response": messages("Hi", "user")}
        )
        for i in range(3)
    ]
    job = submit(tiny_client, raw_input(lines), model="tiny-reward")
    status = wait_for_job(tiny_client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    success, errors = read_rows(tiny_client, job["job_id"])
    assert success == []
    assert [row["line"] for row in errors] == [1, 2, 3]
    assert all("last message" in row["error"]["message"] for row in errors)


def test_batch_lines_on_generative_model(tiny_client):
    lines = [
        json.dumps(
            {
                "custom_id": f"b{i}",
                "method": "POST",
                "url": "/reward_model_scoring/",
                "body": {
                    "reward_model": "tiny-lm",
                    "prompt_with_response": messages("Paris is the capital."),
                    "options": {"logprobs": True},
                },
            }
        )
        for i in range(2)
    ]
    job = submit(tiny_client, raw_input(lines), model="tiny-lm")
    status = wait_for_job(tiny_client, job["job_id"])
    assert status["status"] == "completed", status
    success, _ = read_rows(tiny_client, job["job_id"])
    single = single_score(
        tiny_client, "tiny-lm", "Paris is the capital.", options={"logprobs": True}
    )
    for row in success:
        assert row["logprob"] == pytest.approx(single["logprob"], abs=1e-4)
        assert len(row["token_logprobs"]) == single["usage"]["response_tokens"]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("{inputs}/../outside.jsonl", id="dotdot"),
        pytest.param("{inputs}/escape-link.jsonl", id="symlink"),
        pytest.param("/etc/hostname", id="absolute"),
    ],
)
def test_path_outside_input_folders_is_400(tiny_client, jobs_input_dir, value):
    outside = jobs_input_dir.parent / "outside.jsonl"
    outside.write_text(job_line("x"), encoding="utf-8")
    link = jobs_input_dir / "escape-link.jsonl"
    if not link.is_symlink():
        link.symlink_to(outside)
    body = {
        "reward_model": "tiny-reward",
        "prompt_with_response_path": {
            "type": "filepath",
            "value": value.format(inputs=jobs_input_dir),
        },
    }
    response = tiny_client.post(SUBMIT, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt_with_response_path.value"
    assert "outside the allowed input folders" in error["message"]


def test_unknown_job_id_is_404(tiny_client):
    response = tiny_client.get(STATUS, params={"job_id": "job-does-not-exist"})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["type"] == "not_found_error"


def test_cancel_job(tiny_client):
    lines = [job_line(f"c{i}", f"Answer {i}") for i in range(3000)]
    job = submit(tiny_client, raw_input(lines), model="tiny-reward")
    wait_for_job(
        tiny_client,
        job["job_id"],
        until=lambda status: status["request_counts"]["completed"] >= 20,
    )

    response = tiny_client.post(CANCEL, params={"job_id": job["job_id"]})

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["status"] == "cancelled"
    counts = status["request_counts"]
    assert 20 <= counts["completed"] < 3000
    success, errors = read_rows(tiny_client, job["job_id"])
    assert errors == []
    assert len(success) == counts["completed"]
    expected = [f"c{i}" for i in range(len(success))]
    assert [row["custom_id"] for row in success] == expected
