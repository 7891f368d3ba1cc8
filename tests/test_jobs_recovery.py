"""A job survives SIGKILL of the server: after a restart every line is in the
output files exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_jobs_manager import FINISHED, job_line

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parent.parent
LINES = 6000
# Every 250th line is invalid JSON, so the error file is resumed too.
BAD_EVERY = 250
KILL_AFTER_COMPLETED = 300
# The kill must land while the job runs, also on fast machines. So the test
# watches the success file instead of polling over HTTP, and the job scores one
# line at a time until the kill. After the restart it scores 8 at a time.
ROW_POLL_S = 0.005
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m server`` in its own process group, so that SIGKILL reaches
    the engine processes too."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, attempts: int = 3) -> None:
        """Start the server and wait until it is healthy.

        Another process may take the free port before the server binds it, so
        a start that fails with "address already in use" is retried.
        """
        for _ in range(attempts):
            port = free_port()
            config = json.loads(self.config_path.read_text("utf-8"))
            config["port"] = port
            self.config_path.write_text(json.dumps(config), encoding="utf-8")
            self.url = f"http://127.0.0.1:{port}"
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "server", "--config", str(self.config_path)],
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self.wait_healthy():
                return
            self.kill()
            with open(self.log_path, "rb") as log:
                log.seek(log_start)
                if b"address already in use" not in log.read():
                    break
        pytest.fail(f"server did not start:\n{self.log_tail()}")

    def wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    def kill(self) -> None:
        """Send SIGKILL to the server and its engine processes."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)

    def log_tail(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")[-4000:]


def job_status(server: Server, job_id: str) -> dict:
    response = httpx.get(
        f"{server.url}/reward_model_scoring/submit_job/job_status",
        params={"job_id": job_id},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(server: Server, job_id: str, until) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = job_status(server, job_id)
        if until(status):
            return status
        time.sleep(0.1)
    pytest.fail(f"job {job_id} stuck at {status}:\n{server.log_tail()}")


def wait_for_rows(path: Path, rows: int, server: Server) -> int:
    """Wait until ``path`` contains at least ``rows`` rows; return how many."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            written = path.read_bytes().count(b"\n")
        except FileNotFoundError:
            written = 0
        if written >= rows:
            return written
        time.sleep(ROW_POLL_S)
    pytest.fail(f"{path} stuck at {written} rows:\n{server.log_tail()}")


def test_job_resumes_after_sigkill(tiny_dir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    input_path = inputs / "rollouts.jsonl"
    lines = [
        "{not json" if i % BAD_EVERY == BAD_EVERY - 1 else job_line(f"c{i}", f"A{i}")
        for i in range(LINES)
    ]
    input_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bad_lines = [i + 1 for i in range(LINES) if i % BAD_EVERY == BAD_EVERY - 1]
    good_ids = [f"c{i}" for i in range(LINES) if i % BAD_EVERY != BAD_EVERY - 1]
    config = {
        "models": [
            {
                "id": "tiny-reward",
                "path": str(tiny_dir / "reward"),
                "kind": "reward",
                "dtype": "float32",
                "max_model_len": 128,
                "engine_args": {"enforce_eager": True},
            }
        ],
        "jobs": {
            "folder": str(tmp_path / "jobs"),
            "input_folders": [str(inputs)],
            "max_in_flight_per_job": 1,
        },
    }
    # JSON is valid YAML.
    config_path = tmp_path / "server.yaml"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    log_path = tmp_path / "server.log"

    server = Server(config_path, log_path)
    try:
        server.start()
        response = httpx.post(
            f"{server.url}/reward_model_scoring/submit_job/",
            json={
                "reward_model": "tiny-reward",
                "prompt_with_response_path": {
                    "type": "filepath",
                    "value": str(input_path),
                },
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        job_id = response.json()["job_id"]
        folder = tmp_path / "jobs" / job_id
        written = wait_for_rows(folder / "success.jsonl", KILL_AFTER_COMPLETED, server)
        server.kill()
    finally:
        server.kill()
    assert written < len(good_ids), "the job finished before the kill"
    record = json.loads((folder / "job.json").read_text("utf-8"))
    assert record["status"] == "running"

    config["jobs"]["max_in_flight_per_job"] = 8
    config_path.write_text(json.dumps(config), encoding="utf-8")
    server = Server(config_path, log_path)
    try:
        server.start()
        status = wait_for(server, job_id, lambda s: s["status"] in FINISHED)
    finally:
        server.kill()

    assert status["status"] == "completed", status
    assert status["request_counts"] == {
        "total": LINES,
        "completed": len(good_ids),
        "failed": len(bad_lines),
    }
    success = [
        json.loads(line)
        for line in (folder / "success.jsonl").read_text("utf-8").splitlines()
    ]
    errors = [
        json.loads(line)
        for line in (folder / "errors.jsonl").read_text("utf-8").splitlines()
    ]
    assert [row["custom_id"] for row in success] == good_ids
    assert [row["line"] for row in errors] == bad_lines
    assert "resuming at plan entry" in log_path.read_text("utf-8")
