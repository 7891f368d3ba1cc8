"""A ModelEngine that returns preset values instead of running vLLM."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from server.chat import ConversationRenderer
from server.config import ModelConfig, ModelKind
from server.engine import EngineState, ModelEngine

logger = logging.getLogger(__name__)


class FakeEngine(ModelEngine):
    """Serves preset head outputs or token log-probabilities.

    ``outputs`` is the head output list for reward models, or the value given
    to every token for generative models. ``fail_with`` makes engine calls raise.
    """

    outputs: list[float] = [1.5]
    fail_with: Exception | None = None
    start_delay_s: float = 0.0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.calls: list[list[int]] = []

    def start(self) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(self.config.path))
        self.renderer = ConversationRenderer(
            tokenizer, judge_template=self.config.judge_template
        )
        self.max_model_len = self.config.max_model_len or 64

    async def warm_up(self) -> None:
        await asyncio.sleep(self.start_delay_s)
        if self.kind == ModelKind.REWARD:
            count = len(self.outputs)
            self.labels = ["score"] if count == 1 else [f"l{i}" for i in range(count)]
            self.check_default_label()
        self.state = EngineState.READY

    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY

    def shutdown(self) -> None:
        self.state = EngineState.STOPPED

    async def classify(self, token_ids, request_id, priority=0):
        self.calls.append(token_ids)
        if self.fail_with is not None:
            raise self.fail_with
        self._check_finite(self.outputs, request_id)
        return list(self.outputs)

    async def prompt_logprobs(self, token_ids, request_id, priority=0):
        self.calls.append(token_ids)
        if self.fail_with is not None:
            raise self.fail_with
        values = [self.outputs[0]] * (len(token_ids) - 1)
        self._check_finite(values, request_id)
        return [None, *values]


def fake_factory(**overrides):
    """Return an engine factory whose engines use the given class attributes."""

    def build(config: ModelConfig) -> FakeEngine:
        engine = FakeEngine(config)
        for name, value in overrides.items():
            setattr(engine, name, value)
        return engine

    return build
