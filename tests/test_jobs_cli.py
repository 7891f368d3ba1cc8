"""``python -m jobs``: offline scoring of a JSONL file on a tiny engine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_jobs_manager import job_line

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def tiny_reward_spec(tiny_dir: Path) -> dict:
    """Return the ``--model`` settings of the tiny reward model."""
    return {
        "id": "tiny-reward",
        "path": str(tiny_dir / "reward"),
        "kind": "reward",
        "dtype": "float32",
        "max_model_len": 128,
        "engine_args": {"enforce_eager": True},
    }


def run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def test_command_needs_input_or_resume():
    result = run_command()
    assert result.returncode == 2
    assert "give either INPUT or --resume JOB_ID" in result.stderr


def test_command_rejects_unknown_job(tmp_path):
    model = {"id": "rm", "path": str(tmp_path), "kind": "reward"}
    result = run_command(
        "--resume",
        "job-0123",
        "--jobs-dir",
        str(tmp_path),
        "--model",
        json.dumps(model),
    )
    assert result.returncode == 2
    assert "no job job-0123" in result.stderr


def test_command_rejects_missing_input(tmp_path):
    """The input is checked before any engine starts, so this returns at once."""
    model = {"id": "rm", "path": str(tmp_path), "kind": "reward"}
    result = run_command(
        str(tmp_path / "missing.jsonl"),
        "--jobs-dir",
        str(tmp_path / "jobs"),
        "--model",
        json.dumps(model),
    )
    assert result.returncode == 2
    assert "missing.jsonl' does not exist" in result.stderr


def test_command_rejects_bad_plugin_before_engine(tmp_path):
    input_path = tmp_path / "input.jsonl"
    input_path.write_text(job_line("a") + "\n", encoding="utf-8")
    config = tmp_path / "server.yaml"
    config.write_text(
        "scoring_function_modules: [no_such_module_xyz]\n"
        f"models: [{{id: rm, path: {tmp_path}, kind: reward}}]\n",
        encoding="utf-8",
    )
    result = run_command(str(input_path), "--config", str(config))
    assert result.returncode == 2
    assert "cannot import 'no_such_module_xyz'" in result.stderr
    assert "Traceback" not in result.stderr


def test_command_rejects_invalid_options(tmp_path):
    input_path = tmp_path / "input.jsonl"
    input_path.write_text(job_line("a") + "\n", encoding="utf-8")
    model = {"id": "rm", "path": str(tmp_path), "kind": "reward"}
    result = run_command(
        str(input_path),
        "--jobs-dir",
        str(tmp_path / "jobs"),
        "--model",
        json.dumps(model),
        "--options",
        '{"max_tokens": 0}',
    )
    assert result.returncode == 2
    assert "options.max_tokens: Input should be greater than or equal to 1" in (
        result.stderr
    )
    assert "errors.pydantic.dev" not in result.stderr


@pytest.mark.engine
def test_command_scores_file(tiny_dir, tmp_path):
    input_path = tmp_path / "input.jsonl"
    lines = [job_line(f"c{i}", f"Answer {i}") for i in range(20)] + ["{bad"]
    input_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = tiny_reward_spec(tiny_dir)

    result = run_command(
        str(input_path),
        "--model",
        json.dumps(model),
        "--jobs-dir",
        str(tmp_path / "jobs"),
        "--metadata",
        '{"source": "test"}',
    )

    assert result.returncode == 0, result.stdout + result.stderr
    summary = dict(
        line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line
    )
    assert summary["lines"] == "21 total, 20 completed, 1 failed"
    success = Path(summary["success file"]).read_text("utf-8").splitlines()
    errors = Path(summary["error file"]).read_text("utf-8").splitlines()
    assert [json.loads(row)["custom_id"] for row in success] == [
        f"c{i}" for i in range(20)
    ]
    assert json.loads(errors[0])["line"] == 21
    # The progress bar writes to stderr.
    assert "completed" in result.stderr


@pytest.mark.engine
def test_command_sigterm_leaves_job_resumable(tiny_dir, tmp_path):
    input_path = tmp_path / "input.jsonl"
    lines = [job_line(f"c{i}", f"Answer {i}") for i in range(20_000)]
    input_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = tiny_reward_spec(tiny_dir)
    jobs_dir = tmp_path / "jobs"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs",
            str(input_path),
            "--model",
            json.dumps(model),
            "--jobs-dir",
            str(jobs_dir),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while (
            not any(jobs_dir.glob("*/success.jsonl"))
            or not next(jobs_dir.glob("*/success.jsonl")).stat().st_size
        ):
            assert process.poll() is None, "the command ended before the kill"
            assert time.monotonic() < deadline, "no row was written"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stdout
    assert "resume with: python -m jobs --resume job-" in stdout
