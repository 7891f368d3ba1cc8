"""Helpers shared by the benchmarks: inputs, a server subprocess, load clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def conversations(count: int) -> list[list[dict]]:
    """Return ``count`` short question-answer conversations of varied length."""
    items = []
    for i in range(count):
        question = f"Question {i}: what is {i} plus {i}? " + "Explain briefly. " * (
            i % 4
        )
        answer = f"{i} plus {i} is {2 * i}." + " That is the sum." * (i % 3)
        items.append(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        )
    return items


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m server`` on 127.0.0.1 with a YAML config, as a subprocess."""

    def __init__(self, models: list[dict], jobs: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"models": models, "port": self.port}
        if jobs is not None:
            config["jobs"] = jobs
        self._config = tempfile.NamedTemporaryFile(
            "w", suffix=".yaml", delete=False, encoding="utf-8"
        )
        json.dump(config, self._config)  # JSON is valid YAML.
        self._config.close()
        self.log_path = Path(self._config.name).with_suffix(".log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600) -> None:
        log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--config", self._config.name],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(
            f"server not healthy after {timeout_s} s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        Path(self._config.name).unlink(missing_ok=True)


async def run_http_load(
    url: str, bodies: list[dict], concurrency: int
) -> tuple[float, list[float]]:
    """POST every body with ``concurrency`` clients; return seconds and latencies."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post("/reward_model_scoring/", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies


def write_result(name: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return path


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def model_spec(name: str, work_dir: Path) -> dict:
    """Return the model settings for ``tiny`` (built in ``work_dir``) or ``smollm2``."""
    if name == "tiny":
        from tests.tiny_models import build_reward_model

        path = build_reward_model(work_dir / "reward", ["reward"])
        return {
            "id": "bench",
            "path": str(path),
            "kind": "reward",
            "dtype": "float32",
            "max_model_len": 256,
            "engine_args": {"enforce_eager": True},
        }
    from server.cli import default_models
    from server.default_model import prepare_default_model

    spec = default_models(prepare_default_model())[0]
    return {**spec, "id": "bench"}
