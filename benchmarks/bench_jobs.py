"""Batch job throughput against the engine, and interactive latency under a job.

One run, in one process, with one engine:

1. engine: every line's pre-tokenized prompt is sent at once straight to
   vLLM's AsyncLLM, which is the engine's own offline throughput;
2. idle latency: sequential single requests through ScoringService, the code
   path of ``POST /reward_model_scoring/``, with nothing else running;
3. job: the same lines as a JSONL file through the JobManager, as
   ``submit_job`` runs them;
4. latency under the job: the job again, with sequential single requests
   sent while it runs.

Printed ratios: job lines/s over engine lines/s, and single-request latency
with the job over without. Requests skip HTTP, which adds about the same time
to both latencies.

Commands (from the repository root, after ``make setup``):

    # tiny random reward model, built in a temporary folder (about 2 minutes)
    .venv/bin/python -m benchmarks.bench_jobs

    # the default SmolLM2 judge (slower: compute dominates)
    .venv/bin/python -m benchmarks.bench_jobs --model smollm2 --lines 128

Results are printed and written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import conversations, model_spec, percentile, write_result
from jobs.manager import JobManager
from jobs.protocol import JobStatus, SubmitJobRequest
from server.config import JobsConfig, ModelConfig
from server.protocol import RewardModelScoringRequest

logger = logging.getLogger(__name__)

# Pause between sequential single requests, so that they sample the job's
# whole run rather than saturating the engine themselves.
PROBE_PAUSE_S = 0.02
PROBE_ANSWER = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


async def engine_seconds(engine, messages: list[list[dict]]) -> float:
    """Send every pre-tokenized prompt at once; return the seconds taken."""
    token_ids = [engine.renderer.tokenize(m).token_ids for m in messages]
    started = time.perf_counter()
    await asyncio.gather(
        *(engine.classify(ids, f"offline-{i}") for i, ids in enumerate(token_ids))
    )
    return time.perf_counter() - started


async def probe_latencies(
    service, stop: asyncio.Event | None = None, count: int = 0
) -> list[float]:
    """Send sequential single requests until ``stop`` is set, or ``count`` of them."""
    request = RewardModelScoringRequest(
        reward_model="bench", prompt_with_response=PROBE_ANSWER
    )
    latencies = []
    while (stop is None and len(latencies) < count) or (
        stop is not None and not stop.is_set()
    ):
        started = time.perf_counter()
        await service.score(request)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(PROBE_PAUSE_S)
    return latencies


async def run_job(manager: JobManager, input_path: Path) -> tuple[float, float]:
    """Run the file as a job; return its running seconds and its total seconds."""
    request = SubmitJobRequest(
        reward_model="bench",
        prompt_with_response_path={"type": "filepath", "value": str(input_path)},
    )
    job = await manager.submit(request)
    job = await manager.wait(job.job_id)
    record = job.record
    if record.status != JobStatus.COMPLETED or record.request_counts.failed:
        raise RuntimeError(f"benchmark job did not complete cleanly: {record}")
    running_s = (record.finished_at - record.started_at).total_seconds()
    total_s = (record.finished_at - record.created).total_seconds()
    return running_s, total_s


async def measure(spec: dict, lines: int, in_flight: int, work_dir: Path) -> dict:
    from scoring_functions.registry import default_registry
    from server.engine import ModelEngine, import_engine_libraries
    from server.serving import ScoringService

    messages = conversations(lines)
    input_path = work_dir / "inputs" / "lines.jsonl"
    input_path.parent.mkdir()
    with open(input_path, "w", encoding="utf-8") as file:
        for i, conversation in enumerate(messages):
            line = {"custom_id": f"line-{i}", "prompt_with_response": conversation}
            file.write(json.dumps(line) + "\n")

    await asyncio.to_thread(import_engine_libraries)
    engine = ModelEngine(ModelConfig.model_validate(spec))
    await asyncio.to_thread(engine.start)
    service = ScoringService({"bench": engine}, default_registry())
    config = JobsConfig(
        folder=work_dir / "jobs",
        input_folders=[input_path.parent],
        max_in_flight_per_job=in_flight,
    )
    manager = JobManager(config, service)
    await manager.start()
    try:
        await engine.warm_up()
        # Lazy start-up work in the engine and the service is not timed.
        await engine_seconds(engine, messages[:8])
        await probe_latencies(service, count=5)

        offline_s = await engine_seconds(engine, messages)
        idle = await probe_latencies(service, count=50)
        job_running_s, job_total_s = await run_job(manager, input_path)

        stop = asyncio.Event()
        probes = asyncio.create_task(probe_latencies(service, stop))
        loaded_running_s, _ = await run_job(manager, input_path)
        stop.set()
        loaded = await probes
    finally:
        await manager.stop()
        engine.shutdown()

    engine_rate = lines / offline_s
    job_rate = lines / job_running_s
    return {
        "lines": lines,
        "max_in_flight_per_job": in_flight,
        "job_priority": config.priority,
        "engine_lines_per_s": round(engine_rate, 2),
        "job_lines_per_s": round(job_rate, 2),
        "job_lines_per_s_with_validation": round(lines / job_total_s, 2),
        "job_over_engine": round(job_rate / engine_rate, 3),
        "job_with_probes_lines_per_s": round(lines / loaded_running_s, 2),
        "idle_latency_p50_ms": round(1000 * statistics.median(idle), 1),
        "idle_latency_p95_ms": round(1000 * percentile(idle, 0.95), 1),
        "loaded_latency_p50_ms": round(1000 * statistics.median(loaded), 1),
        "loaded_latency_p95_ms": round(1000 * percentile(loaded, 0.95), 1),
        "loaded_probes": len(loaded),
        "latency_p50_ratio": round(
            statistics.median(loaded) / statistics.median(idle), 2
        ),
        "latency_p95_ratio": round(
            percentile(loaded, 0.95) / percentile(idle, 0.95), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--lines", type=int, default=4000, help="Lines in the job.")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=JobsConfig().max_in_flight_per_job,
        help="jobs.max_in_flight_per_job for the job.",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as work_dir:
        spec = model_spec(args.model, Path(work_dir))
        result = asyncio.run(measure(spec, args.lines, args.in_flight, Path(work_dir)))
    result["model"] = args.model

    print(f"engine offline:        {result['engine_lines_per_s']:8.1f} lines/s")
    print(
        f"job, running:          {result['job_lines_per_s']:8.1f} lines/s "
        f"(ratio job/engine {result['job_over_engine']:.3f})"
    )
    print(
        f"job, with validation:  {result['job_lines_per_s_with_validation']:8.1f} "
        f"lines/s"
    )
    print(
        f"job, during requests:  {result['job_with_probes_lines_per_s']:8.1f} lines/s"
    )
    print(
        f"single request p50:    {result['idle_latency_p50_ms']:8.1f} ms idle, "
        f"{result['loaded_latency_p50_ms']:.1f} ms during a job "
        f"(ratio {result['latency_p50_ratio']:.2f})"
    )
    print(
        f"single request p95:    {result['idle_latency_p95_ms']:8.1f} ms idle, "
        f"{result['loaded_latency_p95_ms']:.1f} ms during a job "
        f"(ratio {result['latency_p95_ratio']:.2f})"
    )
    print(f"written to {write_result('jobs', result)}")


if __name__ == "__main__":
    main()
