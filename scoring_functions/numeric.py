"""Log-space helpers that stay finite for large inputs."""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


def log_sigmoid(value: float) -> float:
    """Return log(sigmoid(value)) without overflow."""
    if value >= 0:
        return -math.log1p(math.exp(-value))
    return value - math.log1p(math.exp(value))


def sigmoid(value: float) -> float:
    return math.exp(log_sigmoid(value))


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def log_softmax(values: list[float]) -> list[float]:
    log_total = logsumexp(values)
    return [v - log_total for v in values]


def label_logprobs(values: list[float]) -> list[float]:
    """Return the log-probability of each label of a classification head.

    A single logit is a binary classifier (log-sigmoid); several logits are
    mutually exclusive labels (log-softmax).
    """
    if len(values) == 1:
        return [log_sigmoid(values[0])]
    return log_softmax(values)
