"""Job records, result files and input locations on disk (no engine)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path as FilePath

import pytest

from jobs.errors import JobFailure
from jobs.inputs import InputLocator
from jobs.protocol import JobStatus, Path, PathType
from jobs.results import ResultWriter, recover_row_count
from jobs.store import (
    JobFiles,
    JobRecord,
    load_records,
    lock_job,
    new_job_id,
    save_record,
    write_atomic,
)
from server.config import JobsConfig
from server.errors import InvalidRequestError


def make_record(job_id: str) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        created=datetime.now(UTC),
        status=JobStatus.RUNNING,
        reward_model="rm",
        metadata={"team": "data"},
        input=Path(type=PathType.RAW_BYTES, value=""),
    )


def test_write_atomic_replaces_file(tmp_path):
    path = tmp_path / "record.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [item.name for item in tmp_path.iterdir()] == ["record.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_records_round_trip(tmp_path):
    job_id = new_job_id()
    files = JobFiles(tmp_path / job_id)
    files.folder.mkdir()
    record = make_record(job_id)
    save_record(files, record)
    (tmp_path / "not-a-job").mkdir()
    broken = tmp_path / new_job_id()
    broken.mkdir()
    (broken / "job.json").write_text("{", encoding="utf-8")

    loaded = load_records(tmp_path)

    assert [(item.folder, value) for item, value in loaded] == [(files.folder, record)]


def test_job_lock_is_exclusive(tmp_path):
    files = JobFiles(tmp_path)
    first = lock_job(files)
    assert first is not None
    assert lock_job(files) is None
    os.close(first)
    second = lock_job(files)
    assert second is not None
    os.close(second)


def test_recover_row_count_drops_partial_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3')
    assert recover_row_count(path) == 2
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'


@pytest.mark.parametrize(
    ("content", "rows", "kept"),
    [
        pytest.param(b"", 0, b"", id="empty"),
        pytest.param(b'{"a"', 0, b"", id="only-partial"),
        pytest.param(b"{}\n{}\n", 2, b"{}\n{}\n", id="complete"),
        pytest.param(b"{}\n" * 70000 + b"{", 70000, b"{}\n" * 70000, id="long"),
    ],
)
def test_recover_row_count_cases(tmp_path, content, rows, kept):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    assert recover_row_count(path) == rows
    assert path.read_bytes() == kept


def test_recover_row_count_missing_file(tmp_path):
    assert recover_row_count(tmp_path / "missing.jsonl") == 0


def test_writer_appends_in_order(tmp_path):
    success, errors = tmp_path / "success.jsonl", tmp_path / "errors.jsonl"
    writer = ResultWriter(success, errors)
    writer.write([(True, b"s1\n"), (False, b"e2\n"), (True, b"s3\n"), (True, b"s4\n")])
    writer.write([(False, b"e5\n")])
    writer.sync()
    writer.close()
    assert success.read_bytes() == b"s1\ns3\ns4\n"
    assert errors.read_bytes() == b"e2\ne5\n"


@pytest.fixture
def input_root(tmp_path) -> FilePath:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "in.jsonl").write_text("{}\n", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("{}\n", encoding="utf-8")
    (allowed / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (allowed / "inner-link.jsonl").symlink_to(allowed / "sub" / "in.jsonl")
    return tmp_path


def locator_for(root: FilePath, **settings) -> InputLocator:
    return InputLocator(JobsConfig(input_folders=[root / "allowed"], **settings))


@pytest.mark.parametrize(
    "relative",
    ["allowed/sub/in.jsonl", "allowed/inner-link.jsonl", "allowed/sub/../sub/in.jsonl"],
)
def test_locator_accepts_allowed_files(input_root, relative):
    locator = locator_for(input_root)
    value = str(input_root / relative)
    locator.check(Path(type=PathType.FILEPATH, value=value))
    locator.check(Path(type=PathType.URI, value=f"file://{value}"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("{root}/outside/secret.jsonl", "outside", id="outside"),
        pytest.param("{root}/allowed/../outside/secret.jsonl", "outside", id="dotdot"),
        pytest.param("{root}/allowed/link.jsonl", "outside", id="symlink"),
        pytest.param("{root}/allowed-evil/in.jsonl", "outside", id="prefix"),
        pytest.param("allowed/sub/in.jsonl", "not an absolute path", id="relative"),
        pytest.param("{root}/allowed/missing.jsonl", "does not exist", id="missing"),
        pytest.param("{root}/allowed/sub", "not a regular file", id="folder"),
    ],
)
def test_locator_rejects_paths(input_root, value, message):
    locator = locator_for(input_root)
    value = value.format(root=input_root)
    with pytest.raises(InvalidRequestError, match=message) as raised:
        locator.check(Path(type=PathType.FILEPATH, value=value))
    assert raised.value.param == "prompt_with_response_path.value"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        pytest.param("file:///etc/passwd", "outside", id="file-outside"),
        pytest.param("file://otherhost/data.jsonl", "names host", id="file-host"),
        pytest.param("s3://bucket/in.jsonl", "not enabled", id="s3-disabled"),
        pytest.param("https://example.com/in.jsonl", "not enabled", id="https"),
        pytest.param("in.jsonl", "not a URI", id="no-scheme"),
        pytest.param("file:///{root}/allowed/nope.jsonl", "does not exist", id="gone"),
    ],
)
def test_locator_rejects_uris(input_root, uri, message):
    locator = locator_for(input_root)
    uri = uri.format(root=input_root)
    with pytest.raises(InvalidRequestError, match=message):
        locator.check(Path(type=PathType.URI, value=uri))


def test_locator_rejects_scheme_without_backend(input_root):
    locator = locator_for(input_root, uri_schemes=["nosuchscheme"])
    with pytest.raises(InvalidRequestError, match="cannot read nosuchscheme"):
        locator.check(Path(type=PathType.URI, value="nosuchscheme://x/in.jsonl"))


def test_locator_without_input_folders():
    locator = InputLocator(JobsConfig())
    with pytest.raises(InvalidRequestError, match="input_folders"):
        locator.check(Path(type=PathType.FILEPATH, value="/tmp/in.jsonl"))


def test_locator_reads_memory_uri(input_root):
    import fsspec

    with fsspec.open("memory://jobs-test/in.jsonl", "wb") as file:
        file.write(b"line\n")
    locator = locator_for(input_root, uri_schemes=["memory"])
    path = Path(type=PathType.URI, value="memory://jobs-test/in.jsonl")
    locator.check(path)
    with locator.open(path, JobFiles(input_root)) as file:
        assert file.read() == b"line\n"


def test_locator_open_rechecks_symlink(input_root):
    locator = locator_for(input_root)
    target = input_root / "allowed" / "swapped.jsonl"
    target.write_text("{}\n", encoding="utf-8")
    path = Path(type=PathType.FILEPATH, value=str(target))
    locator.check(path)
    target.unlink()
    target.symlink_to(input_root / "outside" / "secret.jsonl")
    with pytest.raises(JobFailure, match="outside"):
        with locator.open(path, JobFiles(input_root)):
            pass


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        pytest.param("allowed/missing.jsonl", "file not found", id="missing"),
        pytest.param("allowed/sub", "not a regular file", id="folder"),
    ],
)
def test_locator_open_reports_unreadable(input_root, relative, message):
    locator = locator_for(input_root)
    path = Path(type=PathType.FILEPATH, value=str(input_root / relative))
    with pytest.raises(JobFailure, match=message):
        with locator.open(path, JobFiles(input_root)):
            pass
