"""Batch jobs through HTTP on fake engines: states, limits, cancel and resume."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from server.errors import ServiceUnavailableError
from tests import tiny_models
from tests.fake_engine import FakeEngine

SUBMIT = "/reward_model_scoring/submit_job/"
STATUS = "/reward_model_scoring/submit_job/job_status"
CANCEL = "/reward_model_scoring/submit_job/cancel_job"
LIST = "/reward_model_scoring/submit_job/list_jobs"
FILE = "/reward_model_scoring/submit_job/job_file"
FINISHED = {"completed", "failed", "cancelled"}
JOB_PRIORITY = 10


def messages(answer: str, last_role: str = "assistant") -> list[dict]:
    return [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": last_role, "content": answer},
    ]


def job_line(custom_id: str, answer: str = "Paris", **extra) -> str:
    return json.dumps(
        {"custom_id": custom_id, "prompt_with_response": messages(answer), **extra}
    )


def raw_input(lines: list[str]) -> dict:
    return {"type": "raw_bytes", "value": "\n".join(lines) + "\n"}


def submit(client: TestClient, path: dict, model: str = "rm", **extra) -> dict:
    body = {"reward_model": model, "prompt_with_response_path": path, **extra}
    response = client.post(SUBMIT, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def job_status(client: TestClient, job_id: str) -> dict:
    response = client.get(STATUS, params={"job_id": job_id})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(
    client: TestClient, job_id: str, timeout_s: float = 120, until=None
) -> dict:
    """Poll the job until ``until(status)`` holds; default: until it finished."""
    until = until or (lambda status: status["status"] in FINISHED)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_status(client, job_id)
        if until(status):
            return status
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not reach the expected state: {status}")


def read_rows(client: TestClient, job_id: str) -> tuple[list[dict], list[dict]]:
    """Return the success and error rows, as served over HTTP."""
    rows = []
    for kind in ("success", "error"):
        response = client.get(FILE, params={"job_id": job_id, "file": kind})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/jsonl"
        rows.append([json.loads(line) for line in response.text.splitlines()])
    return rows[0], rows[1]


def assert_each_line_once(
    success: list[dict], errors: list[dict], expected_lines: list[int]
) -> None:
    """Check that each expected line number has exactly one row."""
    lines = [int(row["id"].rsplit("-", 1)[1]) for row in success]
    lines += [row["line"] for row in errors]
    assert sorted(lines) == expected_lines


class UnfinishedRequests:
    """Stands in for AsyncLLM's count of unfinished requests."""

    def __init__(self, engine: RecordingEngine) -> None:
        self.owner = engine

    def get_num_unfinished_requests(self) -> int:
        return self.owner.active + self.owner.interactive


class RecordingEngine(FakeEngine):
    """A fake engine that can be slowed down, records request priorities and
    concurrency, and can pretend that interactive requests are running."""

    delay_s: float = 0.0
    interactive: int = 0

    def __init__(self, config) -> None:
        super().__init__(config)
        self.priorities: list[int] = []
        self.active = 0
        self.max_active = 0
        self.engine = UnfinishedRequests(self)

    async def classify(self, token_ids, request_id, priority=0):
        self.priorities.append(priority)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            return await super().classify(token_ids, request_id, priority)
        finally:
            self.active -= 1

    async def prompt_logprobs(self, token_ids, request_id, priority=0):
        self.priorities.append(priority)
        await asyncio.sleep(self.delay_s)
        return await super().prompt_logprobs(token_ids, request_id, priority)


def engine_factory(**attributes):
    def build(config) -> RecordingEngine:
        engine = RecordingEngine(config)
        for name, value in attributes.items():
            setattr(engine, name, value)
        return engine

    return build


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny_models.build_tokenizer(directory)
    return directory


def make_client(
    tokenizer_dir: Path, root: Path, jobs: dict | None = None, **attributes
) -> TestClient:
    """Return a client of an app on fake engines, with jobs stored under root."""
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    settings = {
        "folder": str(root / "jobs"),
        "input_folders": [str(root / "inputs")],
        "uri_schemes": ["memory"],
        "max_running_jobs": 1,
        "max_in_flight_per_job": 4,
        "priority": JOB_PRIORITY,
        "max_raw_bytes": 100_000,
        **(jobs or {}),
    }
    config = ServerConfig(
        models=[
            {"id": "rm", "path": str(tokenizer_dir), "kind": "reward"},
            {"id": "lm", "path": str(tokenizer_dir), "kind": "generative"},
        ],
        jobs=settings,
    )
    app = create_app(config, engine_factory=engine_factory(**attributes))
    return TestClient(app, raise_server_exceptions=False)


def wait_ready(client: TestClient) -> None:
    for _ in range(400):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    pytest.fail("fake engines never became ready")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs-manager")


@pytest.fixture(scope="module")
def client(tokenizer_dir, root) -> Iterator[TestClient]:
    with make_client(tokenizer_dir, root) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def engine(client) -> Iterator[RecordingEngine]:
    """The reward model's fake engine, reset after the test."""
    engine = client.app.state.service.models["rm"]
    yield engine
    engine.delay_s = 0.0
    engine.fail_with = None


def test_job_scores_lines_in_input_order(client, engine):
    lines = [job_line(f"c{i}", f"Answer {i}") for i in range(20)]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"custom_id": "c2", "prompt_with_response": []}))
    lines.insert(12, "")
    job = submit(client, raw_input(lines), metadata={"team": "rl", "step": 7})
    assert job["status"] == "validating"

    status = wait_for_job(client, job["job_id"])

    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 22, "completed": 20, "failed": 2}
    assert status["metadata"] == {"team": "rl", "step": 7}
    assert status["error"] is None
    assert status["created"] <= status["started_at"] <= status["finished_at"]
    success, errors = read_rows(client, job["job_id"])
    assert [row["custom_id"] for row in success] == [f"c{i}" for i in range(20)]
    assert set(success[0]) >= {"custom_id", "id", "logprob", "score", "usage"}
    assert success[0]["score"] == 1.5
    assert [row["line"] for row in errors] == [6, 10]
    assert errors[0]["custom_id"] is None
    assert errors[0]["error"]["type"] == "invalid_request_error"
    assert errors[1]["custom_id"] == "c2"
    assert errors[1]["error"]["param"] == "custom_id"
    # Line 13 is blank, so it has no row.
    assert_each_line_once(success, errors, [*range(1, 13), *range(14, 24)])
    assert set(engine.priorities) == {JOB_PRIORITY}


def test_job_paths_point_to_job_files(client):
    job = submit(client, raw_input([job_line("a")]))
    status = wait_for_job(client, job["job_id"])
    folder = Path(status["success_file_path"]["value"]).parent
    assert folder.name == job["job_id"]
    assert status["input_file_path"] == {
        "type": "filepath",
        "value": str(folder / "input.jsonl"),
    }
    assert status["error_file_path"]["value"] == str(folder / "errors.jsonl")
    assert status["success_file_url"].endswith(
        f"job_file?job_id={job['job_id']}&file=success"
    )
    assert (folder / "input.jsonl").read_text("utf-8") == job_line("a") + "\n"


@pytest.mark.parametrize("kind", ["filepath", "file-uri", "memory-uri"])
def test_job_reads_each_path_type(client, root, kind):
    text = "\n".join(job_line(f"{kind}-{i}") for i in range(3))
    if kind == "memory-uri":
        import fsspec

        value = f"memory://jobs-manager/{kind}.jsonl"
        with fsspec.open(value, "w") as file:
            file.write(text)
        path = {"type": "uri", "value": value}
    else:
        local = root / "inputs" / f"{kind}.jsonl"
        local.write_text(text, encoding="utf-8")
        path = {"type": "filepath", "value": str(local)}
        if kind == "file-uri":
            path = {"type": "uri", "value": local.as_uri()}
    job = submit(client, path)
    status = wait_for_job(client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["request_counts"]["completed"] == 3
    assert status["input_file_path"] == path


@pytest.fixture
def http_folder(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on loopback, and its URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_job_reads_http_uri(tokenizer_dir, tmp_path, http_folder):
    folder, url = http_folder
    (folder / "in.jsonl").write_text(
        "\n".join(job_line(f"h{i}") for i in range(3)), encoding="utf-8"
    )
    with make_client(tokenizer_dir, tmp_path, jobs={"uri_schemes": ["http"]}) as client:
        wait_ready(client)
        job = submit(client, {"type": "uri", "value": f"{url}/in.jsonl"})
        status = wait_for_job(client, job["job_id"])
        assert status["status"] == "completed", status
        assert status["request_counts"]["completed"] == 3

        missing = submit(client, {"type": "uri", "value": f"{url}/missing.jsonl"})
        status = wait_for_job(client, missing["job_id"])
    assert status["status"] == "failed", status
    assert "cannot read input" in status["error"]
    assert "missing.jsonl" in status["error"]


def test_job_with_every_line_failing_completes(client):
    lines = [
        json.dumps(
            {"custom_id": f"u{i}", "prompt_with_response": messages("Hi", "user")}
        )
        for i in range(4)
    ]
    job = submit(client, raw_input(lines))
    status = wait_for_job(client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
    success, errors = read_rows(client, job["job_id"])
    assert success == []
    assert [row["custom_id"] for row in errors] == ["u0", "u1", "u2", "u3"]
    assert all(row["error"]["param"] == "prompt_with_response" for row in errors)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("{bad\n[1]\n", "no valid line (2 non-blank lines)", id="invalid"),
        pytest.param("\n \n", "contains no lines", id="blank"),
    ],
)
def test_job_without_valid_line_fails(client, text, message):
    job = submit(client, {"type": "raw_bytes", "value": text})
    status = wait_for_job(client, job["job_id"])
    assert status["status"] == "failed", status
    assert message in status["error"]
    counts = status["request_counts"]
    assert counts["failed"] == counts["total"]
    success, errors = read_rows(client, job["job_id"])
    assert success == []
    assert len(errors) == counts["total"]


def test_missing_file_is_rejected_at_submit(client, root):
    path = {"type": "filepath", "value": str(root / "inputs" / "missing.jsonl")}
    response = client.post(
        SUBMIT, json={"reward_model": "rm", "prompt_with_response_path": path}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt_with_response_path.value"
    assert "does not exist" in error["message"]


def test_batch_lines_on_generative_model(client):
    lines = [
        json.dumps(
            {
                "custom_id": "sum",
                "method": "POST",
                "url": "/reward_model_scoring/",
                "body": {"reward_model": "lm", "prompt_with_response": messages("Hi")},
            }
        ),
        json.dumps(
            {
                "custom_id": "mean",
                "method": "POST",
                "url": "/reward_model_scoring/",
                "body": {
                    "prompt_with_response": messages("Hi"),
                    "scoring_function": {
                        "name": "response_logprob",
                        "params": {"reduction": "mean"},
                    },
                },
            }
        ),
    ]
    job = submit(client, raw_input(lines), model="lm")
    status = wait_for_job(client, job["job_id"])
    assert status["request_counts"]["completed"] == 2, status
    success, _ = read_rows(client, job["job_id"])
    by_id = {row["custom_id"]: row for row in success}
    tokens = by_id["sum"]["usage"]["response_tokens"]
    assert by_id["sum"]["score"] == pytest.approx(1.5 * tokens)
    assert by_id["mean"]["score"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("body", "status_code", "param"),
    [
        pytest.param({"reward_model": "nope"}, 404, "reward_model", id="model"),
        pytest.param(
            {"scoring_function": {"name": "nope"}},
            404,
            "scoring_function.name",
            id="function",
        ),
        pytest.param(
            {"reward_model": "lm", "scoring_function": {"name": "raw"}},
            400,
            "scoring_function.name",
            id="wrong-kind",
        ),
        pytest.param(
            {"scoring_function": {"name": "raw", "params": {"nope": 1}}},
            400,
            "scoring_function.params.nope",
            id="params",
        ),
        pytest.param(
            {"prompt_with_response_path": {"type": "ftp", "value": "x"}},
            400,
            "prompt_with_response_path.type",
            id="path-type",
        ),
        pytest.param(
            {"prompt_with_response_path": {"type": "filepath", "value": "/etc/hosts"}},
            400,
            "prompt_with_response_path.value",
            id="outside",
        ),
        pytest.param(
            {"prompt_with_response_path": {"type": "uri", "value": "s3://b/k"}},
            400,
            "prompt_with_response_path.value",
            id="scheme",
        ),
        pytest.param(
            {
                "prompt_with_response_path": {
                    "type": "raw_bytes",
                    "value": "x" * 100_001,
                }
            },
            413,
            "prompt_with_response_path.value",
            id="too-large",
        ),
        pytest.param({"metadata": [1]}, 400, "metadata", id="metadata"),
    ],
)
def test_submit_rejects_invalid_request(client, body, status_code, param):
    request = {
        "reward_model": "rm",
        "prompt_with_response_path": raw_input([job_line("a")]),
        **body,
    }
    response = client.post(SUBMIT, json=request)
    assert response.status_code == status_code, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == status_code


@pytest.mark.parametrize(
    ("method", "url", "params"),
    [
        pytest.param("get", STATUS, {"job_id": "job-unknown"}, id="status"),
        pytest.param("post", CANCEL, {"job_id": "job-unknown"}, id="cancel"),
        pytest.param(
            "get", FILE, {"job_id": "job-unknown", "file": "success"}, id="file"
        ),
        pytest.param("get", LIST, {"after": "job-unknown"}, id="list-after"),
    ],
)
def test_unknown_job_is_404(client, method, url, params):
    response = client.request(method, url, params=params)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "not_found_error"
    assert error["param"] == next(iter(params))
    assert "job-unknown" in error["message"]


def test_list_jobs_pages_newest_first(client):
    ids = [submit(client, raw_input([job_line("a")]))["job_id"] for _ in range(3)]
    for job_id in ids:
        wait_for_job(client, job_id)

    first = client.get(LIST, params={"limit": 2}).json()
    second = client.get(
        LIST, params={"limit": 2, "after": first["data"][-1]["job_id"]}
    ).json()

    assert [job["job_id"] for job in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    assert second["data"][0]["job_id"] == ids[0]
    completed = client.get(LIST, params={"status": "completed", "limit": 1000}).json()
    assert all(job["status"] == "completed" for job in completed["data"])


def test_cancel_running_job_keeps_written_rows(client, engine):
    engine.delay_s = 0.05
    lines = [job_line(f"c{i}") for i in range(200)]
    job = submit(client, raw_input(lines))
    job_id = job["job_id"]
    wait_for_job(client, job_id, until=lambda s: s["request_counts"]["completed"] >= 8)

    response = client.post(CANCEL, params={"job_id": job_id})

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["status"] == "cancelled"
    assert status["error"] == "cancelled by request"
    assert status["finished_at"] is not None
    success, errors = read_rows(client, job_id)
    assert errors == []
    done = status["request_counts"]["completed"]
    assert 8 <= done < 200
    assert [row["custom_id"] for row in success] == [f"c{i}" for i in range(done)]
    again = client.post(CANCEL, params={"job_id": job_id})
    assert again.status_code == 200
    assert again.json()["request_counts"] == status["request_counts"]


def test_cancel_finished_job_is_409(client):
    job = submit(client, raw_input([job_line("a")]))
    wait_for_job(client, job["job_id"])
    response = client.post(CANCEL, params={"job_id": job["job_id"]})
    assert response.status_code == 409, response.text
    assert response.json()["error"]["type"] == "conflict_error"


def test_running_jobs_limit_queues_later_jobs(client, engine):
    engine.delay_s = 0.02
    first = submit(client, raw_input([job_line(f"a{i}") for i in range(24)]))
    second = submit(client, raw_input([job_line(f"b{i}") for i in range(4)]))
    first_done = wait_for_job(client, first["job_id"])
    second_done = wait_for_job(client, second["job_id"])
    assert first_done["status"] == second_done["status"] == "completed"
    assert second_done["started_at"] >= first_done["finished_at"]


def test_job_waits_for_model_to_start(tokenizer_dir, tmp_path):
    with make_client(tokenizer_dir, tmp_path, start_delay_s=1.5) as client:
        job = submit(client, raw_input([job_line("a")]))
        time.sleep(0.5)
        assert job_status(client, job["job_id"])["status"] == "validating"
        status = wait_for_job(client, job["job_id"])
    assert status["status"] == "completed", status


def test_job_resumes_after_restart(tokenizer_dir, tmp_path):
    lines = [job_line(f"c{i}") for i in range(60)]
    lines.insert(30, "{bad")
    # 0.2 s per line, 4 at a time: the job needs 3 s, so the app stops it
    # long before it finishes.
    with make_client(tokenizer_dir, tmp_path, delay_s=0.2) as client:
        wait_ready(client)
        job_id = submit(client, raw_input(lines))["job_id"]
        wait_for_job(
            client, job_id, until=lambda s: s["request_counts"]["completed"] >= 8
        )
    # The app stopped with the job running. Add a partly written row, as a
    # crash in the middle of a write would leave.
    folder = tmp_path / "jobs" / job_id
    record = json.loads((folder / "job.json").read_text("utf-8"))
    assert record["status"] == "running"
    with open(folder / "success.jsonl", "ab") as file:
        file.write(b'{"custom_id": "c99", "sco')

    with make_client(tokenizer_dir, tmp_path) as client:
        status = wait_for_job(client, job_id)
        success, errors = read_rows(client, job_id)

    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 61, "completed": 60, "failed": 1}
    assert [row["custom_id"] for row in success] == [f"c{i}" for i in range(60)]
    assert [row["line"] for row in errors] == [31]
    assert_each_line_once(success, errors, list(range(1, 62)))


def test_engine_failure_pauses_job_until_restart(tokenizer_dir, tmp_path):
    failure = ServiceUnavailableError("model rm is unavailable (engine stopped)")
    lines = [job_line(f"c{i}") for i in range(10)]
    with make_client(tokenizer_dir, tmp_path, fail_with=failure) as client:
        wait_ready(client)
        job_id = submit(client, raw_input(lines))["job_id"]
        status = wait_for_job(client, job_id, until=lambda s: s["error"] is not None)
        assert status["status"] == "running"
        assert "engine stopped" in status["error"]
        assert status["request_counts"]["completed"] == 0

    with make_client(tokenizer_dir, tmp_path) as client:
        status = wait_for_job(client, job_id)
        success, errors = read_rows(client, job_id)
    assert status["status"] == "completed", status
    assert status["error"] is None
    assert len(success) == 10
    assert errors == []


@pytest.mark.parametrize(("interactive", "expected"), [(0, 4), (1, 1)])
def test_job_yields_to_interactive_requests(
    tokenizer_dir, tmp_path, interactive, expected
):
    with make_client(
        tokenizer_dir, tmp_path, delay_s=0.05, interactive=interactive
    ) as client:
        wait_ready(client)
        job = submit(client, raw_input([job_line(f"c{i}") for i in range(16)]))
        status = wait_for_job(client, job["job_id"])
        engine = client.app.state.service.models["rm"]
    assert status["request_counts"]["completed"] == 16, status
    # max_in_flight_per_job is 4, and 1 while other requests are running.
    assert engine.max_active == expected


def test_running_jobs_share_the_engine(tokenizer_dir, tmp_path):
    jobs = {"max_running_jobs": 2}
    with make_client(tokenizer_dir, tmp_path, jobs=jobs, delay_s=0.02) as client:
        wait_ready(client)
        first = submit(client, raw_input([job_line(f"a{i}") for i in range(40)]))
        second = submit(client, raw_input([job_line(f"b{i}") for i in range(40)]))
        first_done = wait_for_job(client, first["job_id"])
        second_done = wait_for_job(client, second["job_id"])
    assert first_done["status"] == second_done["status"] == "completed"
    # Both ran at once, and neither waited for the other to finish.
    assert second_done["started_at"] < first_done["finished_at"]
    assert first_done["started_at"] < second_done["finished_at"]


def test_unexpected_line_error_is_internal_error_row(client, engine):
    engine.fail_with = RuntimeError("tensor on fire")
    job = submit(client, raw_input([job_line("a"), job_line("b")]))
    status = wait_for_job(client, job["job_id"])
    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    _, errors = read_rows(client, job["job_id"])
    assert [row["error"]["type"] for row in errors] == ["internal_error"] * 2
    # The row points to the server log and does not show internals.
    assert f"{job['job_id']}-1" in errors[0]["error"]["message"]
    assert "tensor on fire" not in errors[0]["error"]["message"]


def test_status_without_job_id_is_400(client):
    response = client.get(STATUS)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "job_id"
    assert error["message"].startswith("job_id: ")


def test_result_file_download_ends_at_complete_row(client):
    job = submit(client, raw_input([job_line("a"), job_line("b")]))
    status = wait_for_job(client, job["job_id"])
    path = Path(status["success_file_path"]["value"])
    rows = path.read_bytes()
    # A row that is being written while the file is downloaded.
    with open(path, "ab") as file:
        file.write(b'{"custom_id": "c", "sco')
    response = client.get(FILE, params={"job_id": job["job_id"], "file": "success"})
    assert response.status_code == 200, response.text
    assert response.content == rows
    assert response.headers["content-length"] == str(len(rows))
    assert "attachment" in response.headers["content-disposition"]


def test_missing_result_file_is_404(client):
    job = submit(client, raw_input([job_line("a")]))
    status = wait_for_job(client, job["job_id"])
    Path(status["error_file_path"]["value"]).unlink()
    response = client.get(FILE, params={"job_id": job["job_id"], "file": "error"})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["param"] == "file"
