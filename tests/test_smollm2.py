"""The default configuration on the real SmolLM2-135M-Instruct model."""

from __future__ import annotations

import math

import pytest

from tests import reference

pytestmark = [pytest.mark.engine, pytest.mark.smollm2]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CORRECT = "The capital of France is Paris."
WRONG = "The capital of France is Berlin."


@pytest.fixture
def client(smollm2_client):
    return smollm2_client


def score(client, model: str, answer: str, **extra) -> dict:
    body = {
        "reward_model": model,
        "prompt_with_response": [*QUESTION, {"role": "assistant", "content": answer}],
        "options": {"return_token_ids": True, **extra},
    }
    response = client.post("/reward_model_scoring/", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_correct_answer_has_higher_logprob(client):
    correct = score(client, "smollm2", CORRECT)
    wrong = score(client, "smollm2", WRONG)
    assert correct["logprob"] > wrong["logprob"]
    assert correct["score"] == correct["logprob"]


def test_judge_scores_answers_differently(client):
    correct = score(client, "smollm2-judge", CORRECT)
    wrong = score(client, "smollm2-judge", WRONG)
    assert correct["score"] != wrong["score"]
    for result in (correct, wrong):
        assert math.isfinite(result["score"])
        assert result["logprob"] <= 0.0


def test_generative_matches_transformers(client, smollm2_dir):
    result = score(client, "smollm2", CORRECT, logprobs=True)
    token_ids = result["token_ids"]
    expected = reference.token_logprobs(
        smollm2_dir, token_ids, result["response_start"], len(token_ids)
    )
    assert result["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert result["logprob"] == pytest.approx(sum(expected), abs=1e-4)


def test_judge_matches_transformers(client, smollm2_dir):
    from transformers import AutoTokenizer

    result = score(client, "smollm2-judge", CORRECT)
    token_ids = result["token_ids"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    yes, no = tokenizer.convert_tokens_to_ids(["Yes", "No"])
    logits = reference.next_token_logits(smollm2_dir, token_ids)
    expected = float(logits[yes] - logits[no])
    assert result["score"] == pytest.approx(expected, abs=1e-4)
    assert result["logprob"] == pytest.approx(
        -math.log1p(math.exp(-expected)), abs=1e-4
    )


def test_judge_prompt_ends_with_generation_prompt(client, smollm2_dir):
    from transformers import AutoTokenizer

    result = score(client, "smollm2-judge", CORRECT)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.decode(result["token_ids"])
    assert text.startswith("<|im_start|>")
    assert text.endswith("Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
    assert result["token_ids"][:2].count(tokenizer.bos_token_id) == 1


def test_judge_counts_no_tokens_for_empty_response(client):
    # The newlines before and after the response in the judge template merge
    # into a token that straddles its place. That token is not response.
    result = score(client, "smollm2-judge", "")
    assert result["usage"]["response_tokens"] == 0
