"""Built-in scoring functions on SmolLM2-135M-Instruct, checked with transformers.

The server runs the default configuration: `smollm2` (generative) and
`smollm2-judge` (the same weights as a reward model whose single logit is
logit(Yes) - logit(No) after the default judge template).
"""

from __future__ import annotations

import math
import re

import pytest

from tests import reference

pytestmark = [pytest.mark.engine, pytest.mark.smollm2]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CORRECT = "The capital of France is Paris."
WRONG = "The capital of France is Berlin."


def conversation(answer: str) -> list[dict]:
    return [*QUESTION, {"role": "assistant", "content": answer}]


@pytest.fixture
def client(smollm2_client):
    return smollm2_client


def post(client, model: str, answer: str, name: str, options=None, **params):
    body = {
        "reward_model": model,
        "prompt_with_response": conversation(answer),
        "scoring_function": {"name": name, "params": params},
        "options": {"return_token_ids": True, **(options or {})},
    }
    return client.post("/reward_model_scoring/", json=body)


def score(client, model: str, answer: str, name: str, **params) -> dict:
    response = post(client, model, answer, name, **params)
    assert response.status_code == 200, response.text
    return response.json()


def test_judge_yes_no_matches_transformers(client, smollm2_dir):
    result = score(client, "smollm2", CORRECT, "llm_judge")
    logits = reference.next_token_logits(smollm2_dir, result["token_ids"]).double()
    logprobs = logits.log_softmax(-1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    [yes] = tokenizer.encode("Yes", add_special_tokens=False)
    [no] = tokenizer.encode("No", add_special_tokens=False)
    assert result["detail"]["yes_logprob"] == pytest.approx(
        float(logprobs[yes]), abs=1e-3
    )
    assert result["detail"]["no_logprob"] == pytest.approx(
        float(logprobs[no]), abs=1e-3
    )
    margin = float(logits[yes] - logits[no])
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-3)


@pytest.mark.parametrize("answer", [CORRECT, WRONG])
def test_judge_yes_no_equals_reward_judge(client, answer):
    # Same template, same weights: the generative judge's P(Yes) / (P(Yes) +
    # P(No)) is the sigmoid of the reward judge's Yes - No logit.
    generative = score(client, "smollm2", answer, "llm_judge")
    reward = score(client, "smollm2-judge", answer, "label_probability")
    assert generative["score"] == pytest.approx(reward["score"], abs=1e-3)
    assert generative["logprob"] == pytest.approx(reward["logprob"], abs=1e-3)
    assert generative["token_ids"] == reward["token_ids"]


def test_judge_rating_parses_output(client):
    result = score(client, "smollm2", CORRECT, "llm_judge", method="rating")
    output = result["detail"]["output"]
    rating = float(re.search(r"(\d+(?:\.\d+)?)", output).group(1))
    assert result["detail"]["rating"] == rating
    assert result["score"] == pytest.approx((rating - 1) / 9)
    assert 0.0 <= result["score"] <= 1.0
    assert -100 < result["logprob"] < 0


def test_judge_rating_matches_transformers_greedy(client, smollm2_dir):
    import torch

    options = {"max_tokens": 8, "temperature": 0.0}
    result = score(
        client, "smollm2", CORRECT, "llm_judge", options=options, method="rating"
    )
    model = reference._load(str(smollm2_dir), "AutoModelForCausalLM")
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([result["token_ids"]]), max_new_tokens=8, do_sample=False
        )[0, len(result["token_ids"]) :].tolist()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    expected = tokenizer.decode(generated, skip_special_tokens=True)
    assert result["detail"]["output"] == expected


def test_judge_rating_unparseable_with_strict_pattern(client):
    response = post(
        client,
        "smollm2",
        CORRECT,
        "llm_judge",
        method="rating",
        pattern=r"\[\[(\d+)\]\]",
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "unparseable_output_error"


def test_response_logprob_min_and_perplexity(client, smollm2_dir):
    minimum = score(client, "smollm2", CORRECT, "response_logprob", reduction="min")
    token_ids = minimum["token_ids"]
    expected = reference.token_logprobs(
        smollm2_dir, token_ids, minimum["response_start"], len(token_ids)
    )
    assert minimum["score"] == pytest.approx(min(expected), abs=1e-3)
    perplexity = score(client, "smollm2", CORRECT, "perplexity")
    mean = sum(expected) / len(expected)
    assert perplexity["score"] == pytest.approx(math.exp(-mean), rel=1e-3)
    wrong = score(client, "smollm2", WRONG, "perplexity")
    assert perplexity["score"] < wrong["score"]


def test_pairwise_is_sigmoid_of_margin(client):
    correct = score(client, "smollm2-judge", CORRECT, "raw")
    wrong = score(client, "smollm2-judge", WRONG, "raw")
    result = score(client, "smollm2-judge", CORRECT, "pairwise", reference=WRONG)
    margin = correct["score"] - wrong["score"]
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-4)
    assert result["detail"]["reward"] == pytest.approx(correct["score"], abs=1e-4)
    swapped = score(client, "smollm2-judge", WRONG, "pairwise", reference=CORRECT)
    assert result["score"] + swapped["score"] == pytest.approx(1.0, abs=1e-4)


def test_weighted_sum_judge_and_format(client):
    functions = [
        {"name": "llm_judge", "weight": 1.0},
        {"name": "regex_match", "params": {"pattern": r"\.$"}, "weight": 0.5},
    ]
    judge = score(client, "smollm2", CORRECT, "llm_judge")
    result = score(client, "smollm2", CORRECT, "weighted_sum", functions=functions)
    assert result["score"] == pytest.approx(judge["score"] + 0.5, abs=1e-4)
    assert result["logprob"] == pytest.approx(judge["logprob"], abs=1e-4)
