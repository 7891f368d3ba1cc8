"""Build a tiny random process reward model in vLLM's Qwen2ForProcessRewardModel layout.

transformers has no class for this architecture (the published checkpoints ship
their own modeling code), so the weights are a random ``Qwen2Model`` plus the
two-layer ``score`` head that vLLM loads: ``score.0`` (hidden to hidden), ReLU,
``score.2`` (hidden to 2 labels). ``process_logits`` computes the same head with
transformers for reference values.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from tests import tiny_models

logger = logging.getLogger(__name__)

STEP_TAG = "<extra_0>"
ARCHITECTURE = "Qwen2ForProcessRewardModel"


def build_process_reward_model(directory: Path, seed: int = 0) -> Path:
    """Save a random Qwen2 process reward model with its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    tokenizer = tiny_models.build_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": [STEP_TAG]})
    tokenizer.save_pretrained(directory)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny_models.HIDDEN_SIZE,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=tiny_models.NUM_HEADS,
        num_key_value_heads=tiny_models.NUM_HEADS,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        num_labels=2,
        architectures=[ARCHITECTURE],
        torch_dtype="float32",
    )
    body = Qwen2Model(config)
    hidden = config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
    )
    # Scale the output layer up so that steps get clearly different values.
    with torch.no_grad():
        head[2].weight.mul_(20.0)
    weights = {f"model.{k}": v for k, v in body.state_dict().items()}
    weights |= {f"score.{k}": v for k, v in head.state_dict().items()}
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, directory / "model.safetensors"
    )
    config.save_pretrained(directory)
    return directory


@cache
def _load(path: str):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config.from_pretrained(path)
    weights = load_file(str(Path(path) / "model.safetensors"))
    body = Qwen2Model(config)
    body.load_state_dict(
        {
            k.removeprefix("model."): v
            for k, v in weights.items()
            if k.startswith("model.")
        }
    )
    hidden = config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
    )
    head.load_state_dict(
        {
            k.removeprefix("score."): v
            for k, v in weights.items()
            if k.startswith("score.")
        }
    )
    return body.eval(), head.eval()


def process_logits(path: Path, token_ids: list[int]) -> list[list[float]]:
    """Return the two head logits at every position of ``token_ids``."""
    import torch

    body, head = _load(str(path))
    with torch.no_grad():
        hidden = body(torch.tensor([token_ids])).last_hidden_state
        return head(hidden)[0].tolist()
