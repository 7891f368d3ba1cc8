"""Build tiny random Llama checkpoints with their own tokenizer and chat template.

The checkpoints are random, so scores mean nothing, but every code path (chat
template, BOS handling, pooling heads, prompt log-probabilities) runs as it does
for a real model. Building one takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim"
    " + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Two plus two is four. Three times three is nine.",
    "Is the answer correct? Yes. No. Maybe.",
    "user assistant system tool: hello, how are you today?",
    "Step 1: add the numbers. Step 2: check the result. The answer is 42.",
    "def add(a, b):\n    return a + b\n",
]
# CPU attention in vLLM rejects head_dim 16, so the models use 64.
HIDDEN_SIZE = 128
NUM_HEADS = 2


def build_tokenizer(directory: Path):
    """Train a byte-level BPE tokenizer and save it with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **extra,
    )


def build_causal_lm(directory: Path, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM with its tokenizer under ``directory``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(directory)
    model = LlamaForCausalLM(_llama_config(tokenizer))
    model.save_pretrained(directory)
    return directory


def build_reward_model(directory: Path, labels: list[str], seed: int = 0) -> Path:
    """Save a random LlamaForSequenceClassification with one logit per label."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(directory)
    config = _llama_config(
        tokenizer,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = LlamaForSequenceClassification(config)
    # Random init gives the head tiny weights, so scale it up until
    # different inputs give clearly different logits.
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    model.save_pretrained(directory)
    return directory


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    build_causal_lm(args.directory / "causal")
    build_reward_model(args.directory / "reward", ["reward"])
    build_reward_model(args.directory / "multi", ["bad", "ok", "good"])
    print(json.dumps({"built": str(args.directory)}))


if __name__ == "__main__":
    main()
