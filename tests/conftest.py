"""Shared fixtures: tiny random checkpoints and apps that serve them."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from tests import tiny_models

logger = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = 600
PLUGIN_SOURCE = Path(__file__).parent / "plugin_package"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with tiny checkpoints: reward (1 label), multi (3 labels), causal."""
    root = tmp_path_factory.mktemp("tiny-models")
    tiny_models.build_reward_model(root / "reward", ["reward"])
    tiny_models.build_reward_model(root / "multi", ["bad", "ok", "good"], seed=1)
    tiny_models.build_causal_lm(root / "causal")
    return root


def tiny_model_configs(root: Path) -> list[dict]:
    common = {
        "dtype": "float32",
        "max_model_len": 128,
        "engine_args": {"enforce_eager": True},
    }
    return [
        {"id": "tiny-reward", "path": str(root / "reward"), "kind": "reward", **common},
        {"id": "tiny-multi", "path": str(root / "multi"), "kind": "reward", **common},
        {"id": "tiny-lm", "path": str(root / "causal"), "kind": "generative", **common},
    ]


def wait_until_healthy(client: TestClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200:
            return
        if "start failed" in response.text:
            pytest.fail(f"engine failed to start: {response.text}")
        time.sleep(0.5)
    pytest.fail(f"engines not ready after {timeout_s} s: {response.text}")


@pytest.fixture(scope="session")
def jobs_input_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder from which the ``tiny_client`` app's jobs may read input files."""
    return tmp_path_factory.mktemp("job-inputs")


@pytest.fixture(scope="session")
def tiny_client(
    tiny_dir: Path, jobs_input_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """HTTP client of an app serving the tiny models on real vLLM engines.

    Its jobs are stored in a temporary folder and may read ``jobs_input_dir``
    and ``memory://`` URIs.
    """
    jobs = {
        "folder": str(tmp_path_factory.mktemp("jobs")),
        "input_folders": [str(jobs_input_dir)],
        "uri_schemes": ["memory"],
    }
    config = ServerConfig(models=tiny_model_configs(tiny_dir), jobs=jobs)
    with TestClient(create_app(config)) as client:
        wait_until_healthy(client, ENGINE_START_TIMEOUT_S)
        yield client


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory):
    """Install tests/plugin_package into a temporary folder on sys.path.

    pip writes the package's dist-info there too, so importlib.metadata finds
    its entry point as it would in site-packages.
    """
    root = tmp_path_factory.mktemp("plugin")
    source = root / "source"
    # Built from a copy, so that the build leaves no files in the repository.
    shutil.copytree(PLUGIN_SOURCE, source)
    target = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for name in [name for name in sys.modules if name.startswith("rms_test_plugin")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default SmolLM2-135M-Instruct checkpoint, converted on first use."""
    from server.default_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def smollm2_client(smollm2_dir: Path) -> Iterator[TestClient]:
    """HTTP client of an app serving the default configuration on SmolLM2."""
    from server.cli import default_models

    config = ServerConfig(models=default_models(smollm2_dir))
    with TestClient(create_app(config)) as client:
        wait_until_healthy(client, ENGINE_START_TIMEOUT_S)
        yield client
