"""One vLLM ``AsyncLLM`` per served model, with its tokenizer and chat renderer."""

from __future__ import annotations

import enum
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.chat import ConversationRenderer
from server.config import ModelConfig, ModelKind
from server.errors import (
    InvalidRequestError,
    ModelOutputError,
    ServiceUnavailableError,
)

logger = logging.getLogger(__name__)


# GiB of KV cache per engine on CPU unless VLLM_CPU_KVCACHE_SPACE is set.
DEFAULT_CPU_KV_CACHE_GIB = 1


@dataclass(frozen=True)
class TokenLogits:
    """Head outputs of a token_classify request: one row of ``width`` per token."""

    rows: list[list[float]]
    width: int


@dataclass(frozen=True)
class Generation:
    """One generated completion."""

    text: str
    token_ids: list[int]
    # log P(token_ids[i] | prompt and token_ids[:i]) under the unscaled model.
    logprobs: list[float]
    # "stop" (end of sequence or a stop token) or "length" (max_tokens reached).
    finish_reason: str | None


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


def build_engine_args(config: ModelConfig) -> dict[str, Any]:
    """Return the AsyncEngineArgs keyword arguments for one model."""
    args: dict[str, Any] = {
        "model": config.path,
        "tokenizer": config.tokenizer or config.path,
        "dtype": config.dtype,
        "runner": "generate" if config.kind == ModelKind.GENERATIVE else "pooling",
        "disable_log_stats": True,
        # Lets batch jobs run behind interactive requests.
        "scheduling_policy": "priority",
    }
    if config.max_model_len is not None:
        args["max_model_len"] = config.max_model_len
    if config.hf_overrides:
        args["hf_overrides"] = config.hf_overrides
    if config.kind == ModelKind.PROCESS_REWARD:
        # Step pooling is what Qwen2ForProcessRewardModel uses anyway, and what
        # a causal LM turned into a step scorer (Math-Shepherd) needs.
        args["pooler_config"] = {"tok_pooling_type": "STEP"}
    args.update(config.engine_args)
    return args


def check_local_checkpoint(location: str, key: str, model: bool = True) -> None:
    """Raise ValueError when a local ``location`` cannot be a checkpoint.

    A location that does not exist and is written like a Hugging Face hub id
    (``org/name``) is left to transformers and vLLM, which fetch it. A model
    folder needs a config.json, a tokenizer folder does not.
    """
    path = Path(location).expanduser()
    looks_local = path.is_absolute() or location.startswith((".", "~"))
    if not path.exists():
        if looks_local or location.count("/") != 1:
            raise ValueError(f"{key} {location!r} does not exist")
        return
    if model and path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"{key} {location!r} is not a Hugging Face checkpoint folder: it has "
            f"no config.json"
        )


def read_chat_template(value: str | None) -> str | None:
    """Return a chat template given as text or as a path to a file."""
    if value is None or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template {value!r} is neither a template nor a file")
    return path.read_text(encoding="utf-8")


def import_engine_libraries() -> None:
    """Import transformers and vLLM once, before engines start in threads.

    transformers resolves its lazy imports without a lock, so two threads that
    import ``AutoTokenizer`` at the same time can fail.
    """
    from transformers import AutoTokenizer  # noqa: F401
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401


class ModelEngine:
    """A served model: its vLLM engine, tokenizer and labels."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.state = EngineState.STARTING
        self.error: str | None = None
        self.engine: Any = None
        self.renderer: ConversationRenderer | None = None
        self.labels: list[str] | None = None
        self.max_model_len: int | None = None

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def kind(self) -> ModelKind:
        return self.config.kind

    @property
    def ready(self) -> bool:
        if self.state != EngineState.READY:
            return False
        if self.engine.errored:
            self.state = EngineState.FAILED
            self.error = "the engine process stopped"
            logger.error("model %s: engine process stopped", self.id)
            return False
        return True

    def start(self) -> None:
        """Load the tokenizer and start the engine process; blocks until ready."""
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM for CPU otherwise sizes the KV cache from free memory, once per
        # engine, which runs out of memory with several engines on one machine.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB))
        config = self.config
        logger.info(
            "model %s: starting %s engine on %s", self.id, self.kind.value, config.path
        )
        check_local_checkpoint(config.path, "path")
        if config.tokenizer is not None:
            check_local_checkpoint(config.tokenizer, "tokenizer", model=False)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.path)
        chat_template = read_chat_template(config.chat_template)
        if chat_template is None and tokenizer.chat_template is None:
            raise ValueError(
                f"model {self.id}: the tokenizer has no chat template; set "
                f"chat_template in the model's configuration"
            )
        self.renderer = ConversationRenderer(
            tokenizer, chat_template=chat_template, judge_template=config.judge_template
        )
        engine_args = AsyncEngineArgs(**build_engine_args(config))
        self.engine = AsyncLLM.from_engine_args(engine_args)
        self.max_model_len = self.engine.model_config.max_model_len

    async def warm_up(self) -> None:
        """Run one tiny request, learn the head's labels, and mark the model ready."""
        token_ids = self.renderer.tokenize(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]
        ).token_ids
        if self.kind == ModelKind.REWARD:
            values = await self.classify(token_ids, f"warmup-{self.id}")
            self.labels = head_labels(self.engine.model_config.hf_config, len(values))
        elif self.kind == ModelKind.PROCESS_REWARD:
            rows = await self.classify_tokens(token_ids, f"warmup-{self.id}")
            self.labels = head_labels(self.engine.model_config.hf_config, rows.width)
        else:
            await self.prompt_logprobs(token_ids, f"warmup-{self.id}")
        self.check_default_label()
        self.state = EngineState.READY
        logger.info(
            "model %s: ready (max_model_len=%s, labels=%s)",
            self.id,
            self.max_model_len,
            self.labels,
        )

    def shutdown(self) -> None:
        if self.engine is not None:
            logger.info("model %s: shutting down engine", self.id)
            self.engine.shutdown()
            # Dropping the reference now runs AsyncLLM.__del__ while the
            # interpreter is still whole, not during interpreter exit.
            self.engine = None
        self.state = EngineState.STOPPED

    def check_ready(self) -> None:
        """Raise ServiceUnavailableError unless the engine can take requests."""
        if self.ready:
            return
        if self.state == EngineState.STARTING:
            raise ServiceUnavailableError(
                f"model {self.id} is still starting; retry in a few seconds"
            )
        raise ServiceUnavailableError(
            f"model {self.id} is unavailable ({self.error or self.state.value}); "
            f"restart the server"
        )

    async def classify(
        self, token_ids: list[int], request_id: str, priority: int = 0
    ) -> list[float]:
        """Return the raw head outputs (no activation) for the whole sequence."""
        from vllm import PoolingParams

        params = PoolingParams(task="classify", use_activation=False)
        output = await self._run(
            self.engine.encode, token_ids, params, request_id, priority
        )
        values = [float(value) for value in output.outputs.data.flatten().tolist()]
        self._check_finite(values, request_id)
        return values

    async def prompt_logprobs(
        self, token_ids: list[int], request_id: str, priority: int = 0
    ) -> list[float | None]:
        """Return log P(token i | tokens before i) for each i; None for i = 0."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        output = await self._run(
            self.engine.generate, token_ids, params, request_id, priority
        )
        values: list[float | None] = [None]
        for token_id, entry in zip(
            token_ids[1:], output.prompt_logprobs[1:], strict=True
        ):
            values.append(float(entry[token_id].logprob))
        self._check_finite(values[1:], request_id)
        return values

    async def generate(
        self,
        token_ids: list[int],
        sampling_params: Any,
        request_id: str,
        priority: int = 0,
    ) -> Any:
        """Run a generation request and return vLLM's final ``RequestOutput``."""

        return await self._run(
            self.engine.generate, token_ids, sampling_params, request_id, priority
        )

    async def classify_tokens(
        self,
        token_ids: list[int],
        request_id: str,
        step_tag_id: int | None = None,
        priority: int = 0,
    ) -> TokenLogits:
        """Return raw head outputs per token, only at ``step_tag_id`` tokens if set.

        This is vLLM's ``token_classify`` task. With step pooling (the pooling
        type of process reward models) and a ``step_tag_id``, the rows are the
        positions of that token in order.
        """
        from vllm import PoolingParams

        params = PoolingParams(
            task="token_classify", use_activation=False, step_tag_id=step_tag_id
        )
        output = await self._run(
            self.engine.encode, token_ids, params, request_id, priority
        )
        data = output.outputs.data
        width = int(data.shape[-1]) if data.dim() > 1 else 1
        rows = [[float(v) for v in row] for row in data.reshape(-1, width).tolist()]
        for row in rows:
            self._check_finite(row, request_id)
        return TokenLogits(rows, width)

    async def next_token_logprobs(
        self,
        token_ids: list[int],
        candidate_ids: list[int],
        request_id: str,
        priority: int = 0,
    ) -> dict[int, float]:
        """Return log P(candidate | token_ids) for each candidate next token.

        The values are log-softmax over the whole vocabulary of the unscaled
        logits (vLLM's ``logprob_token_ids``), so they do not sum to 0.
        """
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=list(candidate_ids),
            detokenize=False,
        )
        output = await self.generate(token_ids, params, request_id, priority)
        entry = output.outputs[0].logprobs[0]
        values = {
            token_id: float(entry[token_id].logprob) for token_id in candidate_ids
        }
        self._check_finite(list(values.values()), request_id)
        return values

    async def sample(
        self,
        token_ids: list[int],
        request_id: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        priority: int = 0,
    ) -> Generation:
        """Generate a continuation and the log-probability of each sampled token.

        The log-probabilities are of the unscaled distribution, before temperature
        and top_p are applied.
        """
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0
        )
        output = await self.generate(token_ids, params, request_id, priority)
        completion = output.outputs[0]
        generated = list(completion.token_ids)
        logprobs = [
            float(entry[token_id].logprob)
            for token_id, entry in zip(generated, completion.logprobs, strict=True)
        ]
        self._check_finite(logprobs, request_id)
        return Generation(
            completion.text, generated, logprobs, completion.finish_reason
        )

    async def _run(
        self,
        submit: Any,
        token_ids: list[int],
        params: Any,
        request_id: str,
        priority: int,
    ) -> Any:
        """Submit token ids through ``engine.encode`` or ``engine.generate``.

        Returns the request's final output.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        try:
            return await final_output(
                submit(
                    TokensPrompt(prompt_token_ids=token_ids),
                    params,
                    request_id,
                    priority=priority,
                )
            )
        except VLLMClientError as error:
            # vLLM's own server returns 400 for these errors too.
            logger.warning(
                "model %s rejected request %s: %s", self.id, request_id, error
            )
            raise InvalidRequestError(
                f"model {self.id} rejected the request: {error}"
            ) from error

    def check_default_label(self) -> None:
        """Raise ValueError when ``default_label`` names no label of the head."""
        label = self.config.default_label
        if label is None:
            return
        if isinstance(label, int) and 0 <= label < len(self.labels):
            return
        if isinstance(label, str) and label in self.labels:
            return
        raise ValueError(
            f"default_label {label!r} is not a label of this model; its labels "
            f"are {self.labels} (indices 0 to {len(self.labels) - 1})"
        )

    def _check_finite(self, values: list[float], request_id: str) -> None:
        for value in values:
            if not math.isfinite(value):
                raise ModelOutputError(
                    f"model {self.id} returned a non-finite value ({value}) for "
                    f"request {request_id}; check the checkpoint and dtype"
                )


async def final_output(outputs: Any) -> Any:
    """Drain an engine output stream and return its last (finished) output."""
    output = None
    async for item in outputs:
        output = item
    return output


def head_labels(hf_config: Any, count: int) -> list[str]:
    """Return the name of each head output.

    The names come from ``id2label`` unless it has only transformers' default
    names. A head built from token rows of the LM head (vLLM's
    ``classifier_from_token``) is named by those tokens. A single output
    without a name is ``score``.
    """
    defaults = [f"LABEL_{i}" for i in range(count)]
    id2label = getattr(hf_config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(count)]
    if all(isinstance(name, str) for name in names) and names != defaults:
        return names
    tokens = getattr(hf_config, "classifier_from_token", None)
    if isinstance(tokens, list) and len(tokens) == count and count > 1:
        return [str(token) for token in tokens]
    return ["score"] if count == 1 else defaults
