"""Throughput of the HTTP server against the same engine used in-process.

Both runs score the same conversations with the same model. The engine run
sends pre-tokenized prompts straight to vLLM's AsyncLLM in this process, which
makes it the upper bound. The HTTP run starts ``python -m server`` and sends the
requests from N concurrent clients, which adds JSON, chat templating,
tokenization, HTTP and inter-process overhead. The ratio is HTTP over engine.

Commands (from the repository root, after ``make setup``):

    # tiny random reward model, built in a temporary folder (about 2 minutes)
    .venv/bin/python -m benchmarks.bench_http_vs_engine

    # the default SmolLM2 judge (slower: compute dominates)
    .venv/bin/python -m benchmarks.bench_http_vs_engine --model smollm2 --requests 128

Results are printed and written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    ServerProcess,
    conversations,
    model_spec,
    percentile,
    run_http_load,
    write_result,
)
from server.config import ModelConfig

logger = logging.getLogger(__name__)


async def engine_throughput(spec: dict, messages: list[list[dict]]) -> float:
    """Score every conversation through AsyncLLM in this process; return seconds."""
    from server.engine import ModelEngine

    engine = ModelEngine(ModelConfig.model_validate(spec))
    await asyncio.to_thread(engine.start)
    try:
        await engine.warm_up()
        token_ids = [engine.renderer.tokenize(m).token_ids for m in messages]
        started = time.perf_counter()
        await asyncio.gather(
            *(engine.classify(ids, f"bench-{i}") for i, ids in enumerate(token_ids))
        )
        return time.perf_counter() - started
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    messages = conversations(args.requests)
    with tempfile.TemporaryDirectory() as work_dir:
        spec = model_spec(args.model, Path(work_dir))
        engine_s = asyncio.run(engine_throughput(spec, messages))

        server = ServerProcess([spec])
        server.start()
        try:
            bodies = [
                {"reward_model": "bench", "prompt_with_response": m} for m in messages
            ]
            # One small warm-up round so that lazy start-up work is not timed.
            asyncio.run(run_http_load(server.url, bodies[:8], 8))
            http_s, latencies = asyncio.run(
                run_http_load(server.url, bodies, args.concurrency)
            )
        finally:
            server.stop()

    engine_rate = args.requests / engine_s
    http_rate = args.requests / http_s
    result = {
        "model": args.model,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "engine_items_per_s": round(engine_rate, 2),
        "http_items_per_s": round(http_rate, 2),
        "http_over_engine": round(http_rate / engine_rate, 3),
        "http_latency_p50_ms": round(1000 * percentile(latencies, 0.5), 1),
        "http_latency_p99_ms": round(1000 * percentile(latencies, 0.99), 1),
    }
    print(f"engine in-process: {engine_rate:8.1f} items/s")
    print(
        f"HTTP server:       {http_rate:8.1f} items/s "
        f"({args.concurrency} concurrent clients)"
    )
    print(f"ratio HTTP/engine: {http_rate / engine_rate:8.3f}")
    print(f"written to {write_result('http_vs_engine', result)}")


if __name__ == "__main__":
    main()
