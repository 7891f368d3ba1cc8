"""Built-in and plug-in scoring functions on real vLLM engines with tiny models.

Every model-based score is compared with transformers on the same token ids.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from tests import reference, tiny_prm
from tests.conftest import ENGINE_START_TIMEOUT_S, wait_until_healthy

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STEPS = "Add 2 and 2.\n\nThe sum is 4.\n\nThe answer is 4."
# The built-in rating template needs more tokens than tiny-lm's context of 128.
SHORT_RATING_TEMPLATE = "Q: {conversation}\nA: {response}\nRating:"


def conversation(answer: str, prompt: list[dict] = QUESTION) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": answer}]


def post(client, model: str, messages: list[dict], name: str, options=None, **params):
    body = {
        "reward_model": model,
        "prompt_with_response": messages,
        "scoring_function": {"name": name, "params": params},
        "options": {"return_token_ids": True, **(options or {})},
    }
    return client.post("/reward_model_scoring/", json=body)


def score(client, model: str, messages: list[dict], name: str, **params) -> dict:
    response = post(client, model, messages, name, **params)
    assert response.status_code == 200, response.text
    return response.json()


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


# Reward models: tiny-reward has one logit, tiny-multi three labels.


def test_raw_shift_scale_matches_transformers(tiny_client, tiny_dir):
    result = score(
        tiny_client, "tiny-reward", conversation("Paris"), "raw", shift=1.0, scale=3.0
    )
    logit = reference.head_logits(tiny_dir / "reward", result["token_ids"])[0]
    assert result["score"] == pytest.approx((logit - 1.0) / 3.0, abs=1e-4)
    assert result["detail"]["raw_score"] == pytest.approx(logit, abs=1e-4)
    assert result["logprob"] == pytest.approx(log_softmax([logit, 0.0])[0], abs=1e-4)


def test_label_probability_matches_transformers(tiny_client, tiny_dir):
    result = score(
        tiny_client,
        "tiny-multi",
        conversation("Paris"),
        "label_probability",
        label="ok",
    )
    logits = reference.head_logits(tiny_dir / "multi", result["token_ids"])
    expected = log_softmax(logits)
    assert result["logprob"] == pytest.approx(expected[1], abs=1e-4)
    assert result["score"] == pytest.approx(math.exp(expected[1]), abs=1e-5)
    probabilities = result["detail"]["probabilities"]
    assert list(probabilities) == ["bad", "ok", "good"]
    for value, logprob in zip(probabilities.values(), expected, strict=True):
        assert value == pytest.approx(math.exp(logprob), abs=1e-5)


def test_label_probability_single_logit(tiny_client, tiny_dir):
    result = score(
        tiny_client, "tiny-reward", conversation("Paris"), "label_probability"
    )
    logit = reference.head_logits(tiny_dir / "reward", result["token_ids"])[0]
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-5)


def test_pairwise_matches_transformers(tiny_client, tiny_dir):
    answer, other = "Paris", "Rome is the answer."
    result = score(
        tiny_client, "tiny-reward", conversation(answer), "pairwise", reference=other
    )
    other_ids = score(tiny_client, "tiny-reward", conversation(other), "raw")[
        "token_ids"
    ]
    reward = reference.head_logits(tiny_dir / "reward", result["token_ids"])[0]
    reference_reward = reference.head_logits(tiny_dir / "reward", other_ids)[0]
    margin = reward - reference_reward
    assert result["detail"]["reward"] == pytest.approx(reward, abs=1e-4)
    assert result["detail"]["reference_reward"] == pytest.approx(
        reference_reward, abs=1e-4
    )
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-4)
    assert result["logprob"] == pytest.approx(log_softmax([margin, 0.0])[0], abs=1e-4)


def test_pairwise_against_itself_is_half(tiny_client):
    result = score(
        tiny_client, "tiny-reward", conversation("Paris"), "pairwise", reference="Paris"
    )
    assert result["score"] == pytest.approx(0.5, abs=1e-6)


# Generative model: tiny-lm.


def test_response_logprob_min_and_perplexity(tiny_client, tiny_dir):
    messages = conversation("Paris is the capital.")
    minimum = score(
        tiny_client, "tiny-lm", messages, "response_logprob", reduction="min"
    )
    token_ids = minimum["token_ids"]
    expected = reference.token_logprobs(
        tiny_dir / "causal", token_ids, minimum["response_start"], len(token_ids)
    )
    assert minimum["score"] == pytest.approx(min(expected), abs=1e-4)
    assert minimum["logprob"] == pytest.approx(sum(expected), abs=1e-4)
    perplexity = score(tiny_client, "tiny-lm", messages, "perplexity")
    mean = sum(expected) / len(expected)
    assert perplexity["score"] == pytest.approx(math.exp(-mean), rel=1e-4)
    assert perplexity["logprob"] == pytest.approx(sum(expected), abs=1e-4)


def judge_token_ids(tiny_dir: Path, *words: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "causal")
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in words]
    assert all(len(token) == 1 for token in ids)
    return [token[0] for token in ids]


def test_judge_yes_no_matches_transformers(tiny_client, tiny_dir):
    result = score(tiny_client, "tiny-lm", conversation("Paris"), "llm_judge")
    token_ids = result["token_ids"]
    logits = reference.next_token_logits(tiny_dir / "causal", token_ids).double()
    logprobs = logits.log_softmax(-1)
    yes, no = judge_token_ids(tiny_dir, "Yes", "No")
    assert result["detail"]["yes_logprob"] == pytest.approx(
        float(logprobs[yes]), abs=1e-4
    )
    assert result["detail"]["no_logprob"] == pytest.approx(
        float(logprobs[no]), abs=1e-4
    )
    margin = float(logits[yes] - logits[no])
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-4)
    assert result["logprob"] == pytest.approx(log_softmax([margin, 0.0])[0], abs=1e-4)


def test_judge_template_reaches_model(tiny_client, tiny_dir):
    template = "Answer: {response}\nGood? Yes or No."
    result = score(
        tiny_client,
        "tiny-lm",
        conversation("Paris"),
        "llm_judge",
        template=template,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "causal")
    text = tokenizer.decode(result["token_ids"])
    assert text == (
        "<s><|im_start|>user\nAnswer: Paris\nGood? Yes or No.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def greedy_continuation(path: Path, token_ids: list[int], max_tokens: int):
    """Return the greedy token ids and their log-probabilities from transformers."""
    import torch

    model = reference._load(str(path), "AutoModelForCausalLM")
    ids = list(token_ids)
    logprobs = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            next_id = int(logits.argmax())
            logprobs.append(float(logits.log_softmax(-1)[next_id]))
            ids.append(next_id)
    return ids[len(token_ids) :], logprobs


def test_judge_rating_generation_matches_transformers(tiny_client, tiny_dir):
    # The random model rarely writes a number, so the test accepts either
    # outcome but checks the generated text against transformers in both.
    from transformers import AutoTokenizer

    max_tokens = 6
    messages = conversation("Paris")
    # A yes/no request with the same template returns the judge prompt's ids.
    prompt_ids = score(
        tiny_client, "tiny-lm", messages, "llm_judge", template=SHORT_RATING_TEMPLATE
    )["token_ids"]
    response = post(
        tiny_client,
        "tiny-lm",
        messages,
        "llm_judge",
        options={"max_tokens": max_tokens, "temperature": 0.0},
        method="rating",
        template=SHORT_RATING_TEMPLATE,
        pattern=r"(\d+)",
        min_rating=0,
        max_rating=1e9,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "causal")
    generated, logprobs = greedy_continuation(
        tiny_dir / "causal", prompt_ids, max_tokens
    )
    if tokenizer.eos_token_id in generated:
        cut = generated.index(tokenizer.eos_token_id) + 1
        generated, logprobs = generated[:cut], logprobs[:cut]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    match = re.search(r"(\d+)", text)
    if match is None:
        assert response.status_code == 422, response.text
        assert repr(text) in response.json()["error"]["message"]
        return
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["token_ids"] == prompt_ids
    assert result["detail"]["output"] == text
    assert result["detail"]["rating"] == float(match.group(1))
    assert result["logprob"] == pytest.approx(sum(logprobs), abs=1e-3)


def test_judge_rating_unparseable_is_422(tiny_client):
    response = post(
        tiny_client,
        "tiny-lm",
        conversation("Paris"),
        "llm_judge",
        options={"max_tokens": 4},
        method="rating",
        template=SHORT_RATING_TEMPLATE,
        pattern=r"(NEVER-MATCHES)",
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "unparseable_output_error"


def test_judge_prompt_longer_than_context(tiny_client):
    response = post(
        tiny_client, "tiny-lm", conversation("Paris"), "llm_judge", method="rating"
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt_with_response"
    assert "judge prompt" in error["message"]


# Rule-based and combined functions on the real server.


def test_rules_on_reward_and_generative(tiny_client):
    for model in ("tiny-reward", "tiny-lm"):
        hit = score(
            tiny_client,
            model,
            conversation("The answer is 42."),
            "regex_match",
            pattern=r"answer is (\d+)",
        )
        assert hit["score"] == 1.0
        assert hit["logprob"] == 0.0
        miss = score(
            tiny_client, model, conversation("No idea."), "contains", reference="42"
        )
        assert miss["score"] == 0.0
        assert miss["logprob"] == -20.0


def test_weighted_sum_matches_parts(tiny_client):
    messages = conversation("Paris")
    raw = score(tiny_client, "tiny-reward", messages, "raw")
    functions = [
        {"name": "raw", "weight": 0.25},
        {"name": "exact_match", "params": {"reference": "Paris"}, "weight": 1.0},
    ]
    result = score(
        tiny_client, "tiny-reward", messages, "weighted_sum", functions=functions
    )
    assert result["score"] == pytest.approx(0.25 * raw["score"] + 1.0, abs=1e-5)
    assert result["logprob"] == pytest.approx(raw["logprob"], abs=1e-6)


def test_scoring_functions_listed(tiny_client):
    response = tiny_client.get("/v1/scoring_functions")
    assert response.status_code == 200, response.text
    ids = {card["id"] for card in response.json()["data"]}
    assert {"builtin::raw", "builtin::process_reward", "builtin::weighted_sum"} <= ids


# Batch jobs run the same functions through ScoringService.

JOBS = "/reward_model_scoring/submit_job/"


def run_job(client, model: str, answers: list[str], scoring_function: dict) -> dict:
    """Submit a job of one line per answer and return its final status and rows."""
    lines = [
        json.dumps({"custom_id": f"line-{i}", "prompt_with_response": conversation(a)})
        for i, a in enumerate(answers)
    ]
    body = {
        "reward_model": model,
        "prompt_with_response_path": {"type": "raw_bytes", "value": "\n".join(lines)},
        "scoring_function": scoring_function,
    }
    response = client.post(JOBS, json=body)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"{JOBS}job_status", params={"job_id": job_id}).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    rows = {}
    for kind in ("success", "error"):
        text = client.get(
            f"{JOBS}job_file", params={"job_id": job_id, "file": kind}
        ).text
        rows[kind] = [json.loads(line) for line in text.splitlines() if line]
    return {"job": job, **rows}


def test_job_scores_equal_single_requests(tiny_client):
    answers = ["Paris", "Rome is the answer.", "It is Paris."]
    function = {
        "name": "weighted_sum",
        "params": {
            "functions": [
                {"name": "label_probability", "weight": 1.0},
                {"name": "contains", "params": {"reference": "Paris"}, "weight": 0.5},
            ]
        },
    }
    result = run_job(tiny_client, "tiny-reward", answers, function)
    assert result["job"]["status"] == "completed", result["job"]
    assert result["error"] == []
    assert [row["custom_id"] for row in result["success"]] == [
        "line-0",
        "line-1",
        "line-2",
    ]
    for answer, row in zip(answers, result["success"], strict=True):
        single = score(
            tiny_client,
            "tiny-reward",
            conversation(answer),
            function["name"],
            **function["params"],
        )
        assert row["score"] == pytest.approx(single["score"], abs=1e-6)
        assert row["logprob"] == pytest.approx(single["logprob"], abs=1e-6)
        assert row["scoring_function"] == "builtin::weighted_sum"


def test_job_records_unparseable_judge_output(tiny_client):
    function = {
        "name": "llm_judge",
        "params": {
            "method": "rating",
            "template": SHORT_RATING_TEMPLATE,
            "pattern": "(NEVER-MATCHES)",
        },
    }
    result = run_job(tiny_client, "tiny-lm", ["Paris", "Rome"], function)
    assert result["job"]["status"] == "completed", result["job"]
    assert result["success"] == []
    assert len(result["error"]) == 2
    assert [row["custom_id"] for row in result["error"]] == ["line-0", "line-1"]
    for row in result["error"]:
        assert row["error"]["type"] == "unparseable_output_error"
        assert "NEVER-MATCHES" in row["error"]["message"]


# Process reward model and plug-ins, on their own server.


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-prm")
    return tiny_prm.build_process_reward_model(directory)


# A causal LM that scores steps by the logits of two tokens at a tag, as
# Math-Shepherd does with "+" and "-" after "ки".
LM_STEP_TAG = "|"
LM_STEP_TOKENS = ["-", "+"]


@pytest.fixture(scope="module")
def prm_client(prm_dir, tiny_dir, installed_plugin):
    common = {
        "kind": "process_reward",
        "dtype": "float32",
        "max_model_len": 128,
        "engine_args": {"enforce_eager": True},
    }
    config = ServerConfig(
        models=[
            {
                "id": "tiny-prm",
                "path": str(prm_dir),
                "scoring_params": {"process_reward": {"step_tag": tiny_prm.STEP_TAG}},
                **common,
            },
            {
                "id": "tiny-lm-prm",
                "path": str(tiny_dir / "causal"),
                "hf_overrides": {
                    "architectures": ["LlamaForSequenceClassification"],
                    "classifier_from_token": LM_STEP_TOKENS,
                    "method": "no_post_processing",
                },
                "scoring_params": {"process_reward": {"step_tag": LM_STEP_TAG}},
                **common,
            },
        ],
        scoring_function_modules=["rms_test_plugin.extra"],
    )
    with TestClient(create_app(config)) as client:
        wait_until_healthy(client, ENGINE_START_TIMEOUT_S)
        yield client


def expected_steps(prm_dir: Path, result: dict) -> list[float]:
    """Return P(last label) at each step tag in the response, from transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prm_dir)
    tag_id = tokenizer.convert_tokens_to_ids(tiny_prm.STEP_TAG)
    token_ids = result["token_ids"]
    logits = tiny_prm.process_logits(prm_dir, token_ids)
    return [
        math.exp(log_softmax(logits[i])[1])
        for i, token in enumerate(token_ids)
        if token == tag_id and i >= result["response_start"]
    ]


@pytest.mark.parametrize(
    ("aggregation", "combine"),
    [
        ("min", min),
        ("mean", lambda values: sum(values) / len(values)),
        ("last", lambda values: values[-1]),
        ("product", math.prod),
    ],
)
def test_process_reward_matches_transformers(prm_client, prm_dir, aggregation, combine):
    result = score(
        prm_client,
        "tiny-prm",
        conversation(STEPS),
        "process_reward",
        aggregation=aggregation,
    )
    expected = expected_steps(prm_dir, result)
    assert len(result["steps"]) == 3
    assert len(expected) == 3
    assert result["steps"] == pytest.approx(expected, abs=1e-4)
    assert result["score"] == pytest.approx(combine(expected), abs=1e-4)
    assert result["logprob"] == pytest.approx(math.log(combine(expected)), abs=1e-4)


def test_process_reward_on_causal_lm(prm_client, tiny_dir):
    from transformers import AutoTokenizer

    path = tiny_dir / "causal"
    tokenizer = AutoTokenizer.from_pretrained(path)
    tag_id, minus_id, plus_id = (
        tokenizer.convert_tokens_to_ids(token)
        for token in [LM_STEP_TAG, *LM_STEP_TOKENS]
    )
    result = score(
        prm_client, "tiny-lm-prm", conversation(STEPS), "process_reward", label="+"
    )
    token_ids = result["token_ids"]
    logits = reference.lm_logits(path, token_ids)
    expected = [
        math.exp(
            log_softmax([float(logits[i, minus_id]), float(logits[i, plus_id])])[1]
        )
        for i, token in enumerate(token_ids)
        if token == tag_id and i >= result["response_start"]
    ]
    assert len(expected) == 3
    assert result["steps"] == pytest.approx(expected, abs=1e-4)
    assert result["score"] == pytest.approx(min(expected), abs=1e-4)


def test_process_reward_step_count(prm_client):
    for answer, count in [("One step.", 1), ("a\n\nb\n\nc\n\nd\n\ne", 5)]:
        result = score(prm_client, "tiny-prm", conversation(answer), "process_reward")
        assert len(result["steps"]) == count
        assert len(result["detail"]["step_logits"]) == count


def test_process_reward_prompt_tags_ignored(prm_client, prm_dir):
    prompt = [{"role": "user", "content": f"End steps with {tiny_prm.STEP_TAG}."}]
    result = score(
        prm_client, "tiny-prm", conversation(STEPS, prompt), "process_reward"
    )
    assert result["steps"] == pytest.approx(expected_steps(prm_dir, result), abs=1e-4)


def test_plugins_found_and_used(prm_client):
    cards = prm_client.get("/v1/scoring_functions").json()["data"]
    ids = {card["id"] for card in cards}
    assert "rms_test_plugin::response_length" in ids
    assert "rms_test_plugin::word_count" in ids
    result = score(
        prm_client,
        "tiny-prm",
        conversation("Paris is big"),
        "rms_test_plugin::response_length",
        unit="characters",
    )
    assert result["score"] == 12.0
    words = score(
        prm_client,
        "tiny-prm",
        conversation("Paris is big"),
        "rms_test_plugin::word_count",
    )
    assert words["score"] == 3.0


def test_process_model_rejects_raw(prm_client):
    response = post(prm_client, "tiny-prm", conversation("x"), "raw")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "scoring_function.name"
