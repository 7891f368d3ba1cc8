"""Reference scores computed with transformers on the same token ids."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)


@cache
def _load(path: str, architecture: str):
    import torch
    import transformers

    model_class = getattr(transformers, architecture)
    model = model_class.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def head_logits(path: Path, token_ids: list[int]) -> list[float]:
    """Return the sequence-classification logits at the last token."""
    import torch

    model = _load(str(path), "AutoModelForSequenceClassification")
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits
    return logits[0].tolist()


def lm_logits(path: Path, token_ids: list[int]):
    """Return the causal LM's logits at every position, one row per token."""
    import torch

    model = _load(str(path), "AutoModelForCausalLM")
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def next_token_logits(path: Path, token_ids: list[int]):
    """Return the causal LM's logits for the token after ``token_ids``."""

    return lm_logits(path, token_ids)[-1]


def token_logprobs(
    path: Path, token_ids: list[int], start: int, end: int
) -> list[float]:
    """Return log P(token i | tokens before i) for i in [start, end)."""
    import torch

    model = _load(str(path), "AutoModelForCausalLM")
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i - 1, token_ids[i]]) for i in range(start, end)]
