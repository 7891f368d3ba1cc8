"""Scoring functions, registry and plug-ins on fake engines (no vLLM engine starts).

Each engine call returns preset values, so the expected scores follow by hand.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scoring_functions import ScoringFunction, UnparseableOutputError
from scoring_functions.judge import LlmJudgeParams, parse_rating
from scoring_functions.process import aggregate_logprobs, split_steps
from scoring_functions.registry import (
    ENTRY_POINT_GROUP,
    build_registry,
    default_registry,
)
from server.app import create_app
from server.config import ModelKind, ServerConfig
from server.engine import Generation, TokenLogits
from tests import tiny_models
from tests.fake_engine import FakeEngine

STEP_TAG = "<extra_0>"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def conversation(answer: str, prompt: list[dict] = QUESTION) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": answer}]


class ScriptedEngine(FakeEngine):
    """FakeEngine that also serves step rows, next-token logprobs and generations.

    ``step_rows`` are returned in turn, one per step tag token in the input.
    ``next_token`` are the logprobs of the candidate tokens, in request order.
    """

    step_rows: list[list[float]] = [[0.0, 1.0]]
    next_token: list[float] = [-0.5, -1.5]
    generated: str = "Rating: 7"
    generated_logprobs: list[float] = [-0.5, -0.25]

    async def warm_up(self) -> None:
        await super().warm_up()
        if self.kind == ModelKind.PROCESS_REWARD:
            self.labels = ["LABEL_0", "LABEL_1"]

    async def classify_tokens(
        self, token_ids, request_id, step_tag_id=None, priority=0
    ):
        self.calls.append(token_ids)
        count = token_ids.count(step_tag_id)
        rows = [self.step_rows[i % len(self.step_rows)] for i in range(count)]
        return TokenLogits(rows, len(self.step_rows[0]))

    async def next_token_logprobs(
        self, token_ids, candidate_ids, request_id, priority=0
    ):
        self.calls.append(token_ids)
        return dict(zip(candidate_ids, self.next_token, strict=True))

    async def sample(
        self, token_ids, request_id, max_tokens, temperature, top_p, priority=0
    ):
        self.calls.append(token_ids)
        self.sampling = (max_tokens, temperature, top_p)
        return Generation(
            self.generated,
            [5] * len(self.generated_logprobs),
            self.generated_logprobs,
            "stop",
        )


def scripted_factory(engines: dict[str, ScriptedEngine], **overrides):
    def build(config):
        engine = ScriptedEngine(config)
        for name, value in overrides.get(config.id, {}).items():
            setattr(engine, name, value)
        engines[config.id] = engine
        return engine

    return build


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = tiny_models.build_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": [STEP_TAG]})
    tokenizer.save_pretrained(directory)
    return directory


def model_configs(tokenizer_dir: Path) -> list[dict]:
    path = str(tokenizer_dir)
    return [
        {"id": "rm", "path": path, "kind": "reward"},
        {"id": "multi", "path": path, "kind": "reward"},
        {
            "id": "rm-normalised",
            "path": path,
            "kind": "reward",
            "scoring_params": {"raw": {"shift": 0.5, "scale": 2.0}},
        },
        {"id": "lm", "path": path, "kind": "generative", "max_model_len": 256},
        {
            "id": "prm",
            "path": path,
            "kind": "process_reward",
            "max_model_len": 256,
            "scoring_params": {"builtin::process_reward": {"step_tag": STEP_TAG}},
        },
    ]


def start(app) -> TestClient:
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            pytest.fail("fake engines never became ready")
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def engines() -> dict[str, ScriptedEngine]:
    return {}


@pytest.fixture(scope="module")
def client(tokenizer_dir, engines):
    overrides = {
        "multi": {"outputs": [1.0, 2.0, 0.5]},
        "prm": {"step_rows": [[0.0, 2.0], [1.0, 0.0], [0.0, 0.5]]},
    }
    config = ServerConfig(models=model_configs(tokenizer_dir))
    client = start(create_app(config, scripted_factory(engines, **overrides)))
    yield client
    client.__exit__(None, None, None)


def post(client, model: str, messages: list[dict], name: str, **params):
    body = {
        "reward_model": model,
        "prompt_with_response": messages,
        "scoring_function": {"name": name, "params": params},
        "options": {"return_token_ids": True},
    }
    return client.post("/reward_model_scoring/", json=body)


def score(client, model: str, messages: list[dict], name: str, **params) -> dict:
    response = post(client, model, messages, name, **params)
    assert response.status_code == 200, response.text
    return response.json()


def assert_invalid(response, param: str, text: str = "") -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert text in error["message"]
    return error


# Reward models. The fake reward head outputs 1.5 for "rm" and [1.0, 2.0, 0.5]
# for "multi".


def test_raw_shift_and_scale(client):
    result = score(client, "rm", conversation("Paris"), "raw", shift=0.5, scale=4.0)
    assert result["score"] == pytest.approx((1.5 - 0.5) / 4.0)
    assert result["logprob"] == pytest.approx(-math.log1p(math.exp(-1.5)))
    assert result["detail"] == {"raw_score": 1.5}


def test_raw_defaults_from_model_config(client):
    result = score(client, "rm-normalised", conversation("Paris"), "raw")
    assert result["score"] == pytest.approx((1.5 - 0.5) / 2.0)


def test_raw_request_overrides_model_config(client):
    result = score(client, "rm-normalised", conversation("Paris"), "raw", scale=1.0)
    assert result["score"] == pytest.approx(1.5 - 0.5)


def test_raw_without_params_unchanged(client):
    result = score(client, "rm", conversation("Paris"), "raw")
    assert result["score"] == 1.5
    assert "detail" not in result


def test_raw_rejects_zero_scale(client):
    response = post(client, "rm", conversation("Paris"), "raw", scale=0)
    assert_invalid(
        response, "scoring_function.params.scale", "greater than or equal to 0.000001"
    )


def test_label_probability_softmax(client):
    result = score(client, "multi", conversation("Paris"), "label_probability")
    total = math.exp(1.0) + math.exp(2.0) + math.exp(0.5)
    assert result["score"] == pytest.approx(math.exp(0.5) / total)
    assert result["logprob"] == pytest.approx(0.5 - math.log(total))
    probabilities = result["detail"]["probabilities"]
    assert probabilities["l1"] == pytest.approx(math.exp(2.0) / total)
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert result["labels"] == {"l0": 1.0, "l1": 2.0, "l2": 0.5}


def test_label_probability_by_name(client):
    result = score(
        client, "multi", conversation("Paris"), "label_probability", label="l0"
    )
    total = math.exp(1.0) + math.exp(2.0) + math.exp(0.5)
    assert result["score"] == pytest.approx(math.exp(1.0) / total)


def test_label_probability_sigmoid(client):
    result = score(client, "rm", conversation("Paris"), "label_probability")
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert result["logprob"] == pytest.approx(math.log(result["score"]))


def test_label_probability_unknown_label(client):
    response = post(
        client, "multi", conversation("Paris"), "label_probability", label="great"
    )
    assert_invalid(response, "scoring_function.params.label", "l0")


def test_pairwise_equal_rewards(client, engines):
    engines["rm"].calls.clear()
    result = score(client, "rm", conversation("Paris"), "pairwise", reference="Rome")
    assert result["score"] == pytest.approx(0.5)
    assert result["logprob"] == pytest.approx(math.log(0.5))
    assert result["detail"] == {"reward": 1.5, "reference_reward": 1.5}
    assert len(engines["rm"].calls) == 2
    assert engines["rm"].calls[0] == result["token_ids"]
    assert engines["rm"].calls[1] != result["token_ids"]


def test_pairwise_requires_reference(client):
    response = post(client, "rm", conversation("Paris"), "pairwise")
    assert_invalid(response, "scoring_function.params.reference", "Field required")


def test_pairwise_long_reference_names_reference(client):
    response = post(
        client, "rm", conversation("Paris"), "pairwise", reference="Rome " * 200
    )
    error = assert_invalid(
        response, "scoring_function.params.reference", "in place of the response"
    )
    assert "shorten the reference" in error["message"]


# Generative models. The fake gives every token log-probability 1.5, which the
# service clips to 0 only in the top-level logprob.


def test_response_logprob_min(client):
    result = score(
        client, "lm", conversation("Paris is it"), "response_logprob", reduction="min"
    )
    assert result["score"] == pytest.approx(1.5)


def test_response_logprob_rejects_unknown_reduction(client):
    response = post(
        client, "lm", conversation("Paris"), "response_logprob", reduction="max"
    )
    error = assert_invalid(response, "scoring_function.params.reduction")
    assert "'min'" in error["message"]


def test_perplexity_of_constant_logprobs(client, engines):
    engines["lm"].outputs = [-0.25]
    try:
        result = score(client, "lm", conversation("Paris is it"), "perplexity")
    finally:
        engines["lm"].outputs = [1.5]
    tokens = result["usage"]["response_tokens"]
    assert result["score"] == pytest.approx(math.exp(0.25))
    assert result["logprob"] == pytest.approx(-0.25 * tokens)


def test_perplexity_takes_no_params(client):
    response = post(client, "lm", conversation("Paris"), "perplexity", reduction="sum")
    assert_invalid(response, "scoring_function.params.reduction", "unknown field")


# llm_judge. The fake judge gives Yes -0.5 and No -1.5, and generates "Rating: 7"
# with token log-probabilities -0.5 and -0.25.


def test_judge_yes_no(client, engines):
    result = score(client, "lm", conversation("Paris"), "llm_judge")
    assert result["score"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert result["logprob"] == pytest.approx(-math.log1p(math.exp(-1.0)))
    assert result["detail"] == {"yes_logprob": -0.5, "no_logprob": -1.5}
    # The judge prompt, not the plain conversation, is what was sent.
    assert engines["lm"].calls[-1] == result["token_ids"]
    start = result["response_start"]
    end = start + result["usage"]["response_tokens"]
    tokenizer = engines["lm"].renderer.tokenizer
    assert tokenizer.decode(result["token_ids"][start:end]) == "Paris"
    prompt = tokenizer.decode(result["token_ids"])
    assert "User: What is the capital of France?" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_judge_custom_template(client, engines):
    template = "Q: {conversation}\nA: {response}\nIs A right? Answer Yes or No."
    result = score(client, "lm", conversation("Paris"), "llm_judge", template=template)
    prompt = engines["lm"].renderer.tokenizer.decode(result["token_ids"])
    assert "Q: User: What is the capital of France?\nA: Paris\nIs A right?" in prompt


def test_judge_drops_oldest_messages_to_fit(client, engines):
    old = [
        {"role": "user", "content": "two plus two is four. " * 30},
        {"role": "assistant", "content": "Yes."},
    ]
    result = score(client, "lm", conversation("Paris", old + QUESTION), "llm_judge")
    assert len(result["token_ids"]) <= 255
    assert result["usage"]["truncated_tokens"] > 0
    prompt = engines["lm"].renderer.tokenizer.decode(result["token_ids"])
    assert "two plus two" not in prompt
    assert "What is the capital of France?" in prompt
    assert "Is the final answer correct and helpful?" in prompt


def test_judge_rejects_response_longer_than_context(client):
    response = post(
        client, "lm", conversation("two plus two is four. " * 30), "llm_judge"
    )
    assert_invalid(response, "prompt_with_response", "response alone")


@pytest.mark.parametrize(
    ("params", "param", "text"),
    [
        pytest.param(
            {"template": "{conversation} {answer}"},
            "template",
            "placeholders",
            id="unknown-placeholder",
        ),
        pytest.param(
            {"template": "Judge {conversation}"},
            "template",
            "{response}",
            id="no-response",
        ),
        pytest.param(
            {"template": "{response} or {response}?"},
            "template",
            "once",
            id="two-responses",
        ),
        pytest.param(
            {"pattern": "Rating: \\d+"}, "pattern", "group", id="pattern-without-group"
        ),
        pytest.param({"pattern": "(unclosed"}, "pattern", "invalid", id="bad-regex"),
        pytest.param(
            {"yes_token": "Yes please"}, "yes_token", "exactly one", id="two-token-yes"
        ),
        pytest.param({"method": "vote"}, "method", "", id="unknown-method"),
    ],
)
def test_judge_rejects_bad_params(client, params, param, text):
    response = post(client, "lm", conversation("Paris"), "llm_judge", **params)
    assert_invalid(response, f"scoring_function.params.{param}", text)


def test_judge_rejects_equal_rating_bounds(client):
    response = post(
        client, "lm", conversation("Paris"), "llm_judge", min_rating=5, max_rating=5
    )
    assert_invalid(response, "scoring_function.params", "max_rating")


def test_judge_rating(client, engines):
    body = {
        "reward_model": "lm",
        "prompt_with_response": conversation("Paris"),
        "scoring_function": {"name": "llm_judge", "params": {"method": "rating"}},
        "options": {
            "max_tokens": 8,
            "temperature": 0.5,
            "top_p": 0.9,
            "logprobs": True,
        },
    }
    response = client.post("/reward_model_scoring/", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["score"] == pytest.approx((7 - 1) / 9)
    assert result["logprob"] == pytest.approx(-0.75)
    assert result["detail"]["rating"] == 7
    assert result["detail"]["output"] == "Rating: 7"
    assert result["detail"]["output_logprobs"] == [-0.5, -0.25]
    assert engines["lm"].sampling == (8, 0.5, 0.9)


def test_judge_rating_default_sampling(client, engines):
    score(client, "lm", conversation("Paris"), "llm_judge", method="rating")
    assert engines["lm"].sampling == (16, 0.0, 1.0)


@pytest.mark.parametrize(
    ("output", "text"),
    [
        pytest.param("I cannot rate this.", "does not match", id="no-rating"),
        pytest.param("Rating: 11", "outside the range", id="out-of-range"),
        pytest.param("", "does not match", id="empty"),
    ],
)
def test_judge_unparseable_rating_is_error(client, engines, output, text):
    engines["lm"].generated = output
    try:
        response = post(
            client, "lm", conversation("Paris"), "llm_judge", method="rating"
        )
    finally:
        engines["lm"].generated = "Rating: 7"
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "unparseable_output_error"
    assert text in error["message"]


def test_judge_custom_rating_pattern(client, engines):
    engines["lm"].generated = "Score 3 out of 5"
    try:
        result = score(
            client,
            "lm",
            conversation("Paris"),
            "llm_judge",
            method="rating",
            pattern=r"Score (\d+)",
            min_rating=1,
            max_rating=5,
        )
    finally:
        engines["lm"].generated = "Rating: 7"
    assert result["score"] == pytest.approx(0.5)


def test_judge_needs_generative_model(client):
    response = post(client, "rm", conversation("Paris"), "llm_judge")
    assert_invalid(response, "scoring_function.name", "generative")


@pytest.mark.parametrize(
    ("output", "rating"),
    [
        ("Rating: 7", 7.0),
        ("rating = 8.5 because", 8.5),
        ("RATING: 10/10", 10.0),
        ("First Rating: 2, then Rating: 9", 2.0),
    ],
)
def test_parse_rating(output, rating):
    assert parse_rating(output, LlmJudgeParams()) == rating


def test_parse_rating_rejects_text():
    with pytest.raises(UnparseableOutputError, match="does not match"):
        parse_rating("Seven out of ten", LlmJudgeParams())


# process_reward. The fake step rows cycle through [0, 2], [1, 0], [0, 0.5],
# and the step value is the probability of the last label.


def step_probabilities(rows):
    return [math.exp(b) / (math.exp(a) + math.exp(b)) for a, b in rows]


STEPS = "Add 2 and 2.\n\nThe sum is 4.\n\nThe answer is 4."
FAKE_ROWS = [[0.0, 2.0], [1.0, 0.0], [0.0, 0.5]]


@pytest.mark.parametrize(
    ("aggregation", "combine"),
    [
        ("min", min),
        ("mean", lambda values: sum(values) / len(values)),
        ("last", lambda values: values[-1]),
        ("product", math.prod),
    ],
)
def test_process_reward_aggregations(client, aggregation, combine):
    result = score(
        client, "prm", conversation(STEPS), "process_reward", aggregation=aggregation
    )
    expected = step_probabilities(FAKE_ROWS)
    assert result["steps"] == pytest.approx(expected)
    assert result["score"] == pytest.approx(combine(expected))
    assert result["logprob"] == pytest.approx(math.log(combine(expected)))


def test_process_reward_tags_each_step(client, engines):
    result = score(client, "prm", conversation(STEPS), "process_reward")
    tokenizer = engines["prm"].renderer.tokenizer
    start = result["response_start"]
    end = start + result["usage"]["response_tokens"]
    response = tokenizer.decode(result["token_ids"][start:end])
    assert response == (
        "Add 2 and 2.<extra_0>The sum is 4.<extra_0>The answer is 4.<extra_0>"
    )
    assert result["detail"]["step_logits"] == FAKE_ROWS


def test_process_reward_custom_separator(client):
    result = score(
        client, "prm", conversation("a; b; ; c"), "process_reward", separator=";"
    )
    assert len(result["steps"]) == 3


def test_process_reward_ignores_tags_in_prompt(client):
    prompt = [{"role": "user", "content": f"Use {STEP_TAG} after each step."}]
    result = score(
        client, "prm", conversation("One.\n\nTwo.", prompt), "process_reward"
    )
    # The prompt's tag takes the first fake row, so the steps get the next two.
    assert result["steps"] == pytest.approx(step_probabilities(FAKE_ROWS[1:]))


def test_process_reward_label_by_index(client):
    result = score(client, "prm", conversation("One."), "process_reward", label=0)
    assert result["steps"] == pytest.approx([1 - step_probabilities(FAKE_ROWS)[0]])


def test_process_reward_rejects_tag_in_response(client):
    response = post(
        client, "prm", conversation(f"One.{STEP_TAG}Two."), "process_reward"
    )
    assert_invalid(response, "prompt_with_response", "step tag")


def test_process_reward_rejects_empty_response(client):
    response = post(client, "prm", conversation(" \n\n "), "process_reward")
    assert_invalid(response, "prompt_with_response", "no steps")


def test_process_reward_rejects_multi_token_tag(client):
    response = post(
        client, "prm", conversation("One."), "process_reward", step_tag="STEP TAG"
    )
    assert_invalid(response, "scoring_function.params.step_tag", "exactly one")


def test_process_reward_is_default_for_its_kind(client):
    body = {"reward_model": "prm", "prompt_with_response": conversation("One.")}
    response = client.post("/reward_model_scoring/", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["scoring_function"] == "builtin::process_reward"


def test_split_steps_drops_empty_steps():
    assert split_steps(" a \n\n\n\nb\n\n", "\n\n") == ["a", "b"]


def test_aggregate_logprobs_mean_is_log_of_mean():
    values = [math.log(0.2), math.log(0.6)]
    assert aggregate_logprobs(values, "mean") == pytest.approx(math.log(0.4))


def test_aggregate_logprobs_product_stays_finite():
    assert aggregate_logprobs([-400.0, -400.0], "product") == -800.0


# Rule-based functions work with every model kind.


@pytest.mark.parametrize("model", ["rm", "lm", "prm"])
def test_exact_match_on_every_model_kind(client, model):
    result = score(
        client, model, conversation(" Paris "), "exact_match", reference="Paris"
    )
    assert result["score"] == 1.0
    assert result["logprob"] == 0.0
    assert result["detail"] == {"matched": "Paris"}


@pytest.mark.parametrize(
    ("answer", "params", "expected"),
    [
        ("Paris", {"reference": "paris"}, 0.0),
        ("Paris", {"reference": "paris", "ignore_case": True}, 1.0),
        (" Paris", {"reference": "Paris", "strip": False}, 0.0),
        ("Lyon", {"reference": ["Paris", "Lyon"]}, 1.0),
    ],
)
def test_exact_match_cases(client, answer, params, expected):
    result = score(client, "rm", conversation(answer), "exact_match", **params)
    assert result["score"] == expected


def test_exact_match_mismatch_logprob(client):
    result = score(client, "rm", conversation("Rome"), "exact_match", reference="Paris")
    assert result["score"] == 0.0
    assert result["logprob"] == -20.0
    assert result["detail"] == {"matched": None}
    result = score(
        client,
        "rm",
        conversation("Rome"),
        "exact_match",
        reference="Paris",
        mismatch_logprob=-5,
    )
    assert result["logprob"] == -5.0


def test_exact_match_rejects_positive_mismatch_logprob(client):
    response = post(
        client,
        "rm",
        conversation("Rome"),
        "exact_match",
        reference="Paris",
        mismatch_logprob=1,
    )
    assert_invalid(response, "scoring_function.params.mismatch_logprob")


def test_exact_match_rejects_empty_reference_list(client):
    response = post(client, "rm", conversation("Rome"), "exact_match", reference=[])
    assert_invalid(response, "scoring_function.params.reference", "empty")


@pytest.mark.parametrize(
    ("params", "expected", "found"),
    [
        ({"reference": "Paris"}, 1.0, ["Paris"]),
        ({"reference": "paris"}, 0.0, []),
        ({"reference": "paris", "ignore_case": True}, 1.0, ["paris"]),
        ({"reference": ["Rome", "capital"]}, 1.0, ["capital"]),
        ({"reference": ["Rome", "capital"], "require": "all"}, 0.0, ["capital"]),
        (
            {"reference": ["Paris", "capital"], "require": "all"},
            1.0,
            ["Paris", "capital"],
        ),
    ],
)
def test_contains_cases(client, params, expected, found):
    answer = "The capital is Paris."
    result = score(client, "rm", conversation(answer), "contains", **params)
    assert result["score"] == expected
    assert result["detail"] == {"found": found}


@pytest.mark.parametrize(
    ("params", "expected", "match"),
    [
        ({"pattern": r"\d+"}, 1.0, "42"),
        ({"pattern": r"\d+", "mode": "fullmatch"}, 0.0, None),
        (
            {"pattern": r"The answer is \d+\.", "mode": "fullmatch"},
            1.0,
            "The answer is 42.",
        ),
        ({"pattern": "ANSWER", "ignore_case": True}, 1.0, "answer"),
    ],
)
def test_regex_match_cases(client, params, expected, match):
    result = score(
        client, "rm", conversation("The answer is 42."), "regex_match", **params
    )
    assert result["score"] == expected
    assert result["detail"] == {"match": match}


def test_regex_match_times_out(client):
    response = post(
        client, "rm", conversation("a" * 40 + "b"), "regex_match", pattern="(a|aa)+$"
    )
    assert_invalid(response, "scoring_function.params.pattern", "timed out")


def test_regex_match_rejects_invalid_pattern(client):
    response = post(client, "rm", conversation("x"), "regex_match", pattern="[a-")
    assert_invalid(response, "scoring_function.params.pattern", "invalid regular")


# weighted_sum


def test_weighted_sum_of_model_and_rule(client):
    functions = [
        {"name": "raw", "weight": 0.5},
        {"name": "builtin::contains", "params": {"reference": "Paris"}, "weight": 2},
        {"name": "exact_match", "params": {"reference": "Rome"}, "weight": -1},
    ]
    result = score(
        client, "rm", conversation("Paris"), "weighted_sum", functions=functions
    )
    assert result["score"] == pytest.approx(0.5 * 1.5 + 2 * 1.0 - 1 * 0.0)
    expected_logprob = -math.log1p(math.exp(-1.5)) + 0.0 - 20.0
    assert result["logprob"] == pytest.approx(expected_logprob)
    components = result["detail"]["components"]
    assert [c["name"] for c in components] == [
        "builtin::raw",
        "builtin::contains",
        "builtin::exact_match",
    ]
    assert components[0]["score"] == 1.5


def test_weighted_sum_uses_model_defaults(client):
    result = score(
        client,
        "rm-normalised",
        conversation("Paris"),
        "weighted_sum",
        functions=[{"name": "raw", "weight": 2}],
    )
    assert result["score"] == pytest.approx(2 * (1.5 - 0.5) / 2.0)


def test_weighted_sum_nested_judges(client):
    functions = [
        {"name": "llm_judge", "weight": 1},
        {"name": "llm_judge", "params": {"method": "rating"}, "weight": 1},
    ]
    result = score(
        client, "lm", conversation("Paris"), "weighted_sum", functions=functions
    )
    yes_no = 1 / (1 + math.exp(-1.0))
    assert result["score"] == pytest.approx(yes_no + 6 / 9)
    # Each part renders its own judge prompt; the response reports the
    # conversation itself.
    plain = score(client, "lm", conversation("Paris"), "response_logprob")
    assert result["token_ids"] == plain["token_ids"]


@pytest.mark.parametrize(
    ("functions", "param", "text"),
    [
        pytest.param([], "scoring_function.params.functions", "at least 1", id="empty"),
        pytest.param(
            [{"name": "raw"}, {"name": "nope"}],
            "scoring_function.params.functions.1.name",
            "unknown",
            id="unknown-name",
        ),
        pytest.param(
            [{"name": "response_logprob"}],
            "scoring_function.params.functions.0.name",
            "generative",
            id="wrong-kind",
        ),
        pytest.param(
            [{"name": "contains"}],
            "scoring_function.params.functions.0.params.reference",
            "Field required",
            id="missing-param",
        ),
        pytest.param(
            [{"name": "raw", "weight": "heavy"}],
            "scoring_function.params.functions.0.weight",
            "number",
            id="bad-weight",
        ),
    ],
)
def test_weighted_sum_rejects_bad_parts(client, functions, param, text):
    response = post(
        client, "rm", conversation("Paris"), "weighted_sum", functions=functions
    )
    assert_invalid(response, param, text)


def test_weighted_sum_part_error_fails_request(client, engines):
    engines["lm"].generated = "no rating"
    try:
        response = post(
            client,
            "lm",
            conversation("Paris"),
            "weighted_sum",
            functions=[{"name": "llm_judge", "params": {"method": "rating"}}],
        )
    finally:
        engines["lm"].generated = "Rating: 7"
    assert response.status_code == 422, response.text


# Listing and registry


def test_list_scoring_functions(client):
    response = client.get("/v1/scoring_functions")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    builtins = {
        "raw",
        "label_probability",
        "pairwise",
        "response_logprob",
        "perplexity",
        "llm_judge",
        "process_reward",
        "exact_match",
        "regex_match",
        "contains",
        "weighted_sum",
    }
    assert {f"builtin::{name}" for name in builtins} <= set(cards)
    raw = cards["builtin::raw"]
    assert raw["model_kinds"] == ["reward"]
    assert raw["parameters"]["properties"]["shift"]["default"] == 0.0
    assert raw["parameters"]["properties"]["scale"]["minimum"] == 1e-6
    assert raw["parameters"]["additionalProperties"] is False
    judge = cards["builtin::llm_judge"]["parameters"]
    assert judge["properties"]["method"]["enum"] == ["yes_no", "rating"]
    assert judge["properties"]["yes_token"]["default"] == "Yes"
    assert cards["builtin::contains"]["model_kinds"] == [
        "generative",
        "process_reward",
        "reward",
    ]
    assert "reference" in cards["builtin::pairwise"]["parameters"]["required"]
    assert "logprob" in cards["builtin::perplexity"]["description"]


def test_unknown_function_lists_available(client):
    response = post(client, "rm", conversation("Paris"), "builtin::nope")
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["param"] == "scoring_function.name"
    assert "builtin::raw" in error["message"]


class Duplicate(ScoringFunction):
    name = "builtin::raw"
    model_kinds = frozenset({ModelKind.REWARD})

    async def compute(self, context, params):
        raise NotImplementedError


class Unnamespaced(Duplicate):
    name = "length"


class Fine(Duplicate):
    name = "acme::fine"


class NoKinds(Duplicate):
    name = "acme::no_kinds"
    model_kinds = frozenset()


class Abstract(ScoringFunction):
    name = "acme::abstract"
    model_kinds = frozenset({ModelKind.REWARD})


def test_registry_rejects_duplicate_id():
    registry = default_registry()
    registry.register(Fine, "test")
    with pytest.raises(
        ValueError, match="'acme::fine' from again is already registered by test"
    ):
        registry.register(Fine, "again")


def test_registry_reserves_builtin_namespace():
    with pytest.raises(ValueError, match="reserved for built-in"):
        default_registry().register(Duplicate, "a plug-in")


@pytest.mark.parametrize(
    ("function_class", "error", "text"),
    [
        (Unnamespaced, ValueError, "namespace::name"),
        (NoKinds, ValueError, "model_kinds"),
        (Abstract, TypeError, "compute"),
        (object, TypeError, "not a ScoringFunction"),
    ],
)
def test_registry_rejects_invalid_class(function_class, error, text):
    with pytest.raises(error, match=text):
        default_registry().register(function_class, "test")


def test_registry_short_name_only_for_builtins():
    registry = default_registry()
    registry.register(Fine, "test")
    assert registry.get("acme::fine").name == "acme::fine"
    assert registry.get("raw").name == "builtin::raw"
    with pytest.raises(Exception, match="unknown scoring function 'fine'"):
        registry.get("fine")


@pytest.mark.parametrize(
    ("modules", "text"),
    [
        (["no_such_module_xyz"], "cannot import 'no_such_module_xyz'"),
        (["json"], "has no SCORING_FUNCTIONS"),
        (["json:nothing"], "has no attribute 'nothing'"),
        (["json:dumps"], "expected a ScoringFunction subclass"),
    ],
)
def test_build_registry_rejects_bad_module(modules, text):
    with pytest.raises((ValueError, TypeError), match=text):
        build_registry(modules, entry_points=False)


def test_build_registry_names_failing_module(tmp_path, monkeypatch):
    (tmp_path / "rms_failing_plugin.py").write_text(
        'raise RuntimeError("boom at import")\n', encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing 'rms_failing_plugin' raised"):
        build_registry(["rms_failing_plugin"], entry_points=False)


@pytest.mark.parametrize(
    ("scoring_params", "text"),
    [
        ({"nope": {}}, "unknown scoring function"),
        ({"raw": {"scale": -1}}, "scale"),
        ({"raw": {"bias": 1}}, "unknown field"),
        ({"raw": {}, "builtin::raw": {}}, "already has defaults"),
        ({"response_logprob": {}}, "does not apply to reward models"),
        ({"raw": {"scale": "2"}}, "valid number"),
        (
            {"weighted_sum": {"functions": [{"name": "response_logprob"}]}},
            "functions.0.name: builtin::response_logprob needs a generative model",
        ),
        ({"exact_match": {"reference": {1: "a"}}}, "must be JSON values"),
    ],
)
def test_invalid_scoring_params_fail_at_startup(tokenizer_dir, scoring_params, text):
    config = ServerConfig(
        models=[
            {
                "id": "rm",
                "path": str(tokenizer_dir),
                "kind": "reward",
                "scoring_params": scoring_params,
            }
        ]
    )
    with pytest.raises(ValueError, match=text):
        create_app(config, scripted_factory({}))


def test_scoring_params_may_omit_required_params(tokenizer_dir):
    config = ServerConfig(
        models=[
            {
                "id": "rm",
                "path": str(tokenizer_dir),
                "kind": "reward",
                "scoring_params": {"pairwise": {"label": 0}},
            }
        ]
    )
    create_app(config, scripted_factory({}))


# Third-party plug-ins


def test_plugin_entry_point_is_registered(installed_plugin):
    import importlib.metadata

    names = [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    assert "rms_test_plugin" in names
    registry = build_registry()
    assert "rms_test_plugin::response_length" in registry
    assert "entry point 'rms_test_plugin'" in registry.source(
        "rms_test_plugin::response_length"
    )


def test_plugin_entry_points_can_be_disabled(installed_plugin):
    assert "rms_test_plugin::response_length" not in build_registry(entry_points=False)


def test_plugin_loaded_twice_is_rejected(installed_plugin):
    with pytest.raises(ValueError, match="already registered by entry point"):
        build_registry(["rms_test_plugin:ResponseLength"])


def test_plugin_functions_score_over_http(installed_plugin, tokenizer_dir):
    config = ServerConfig(
        models=model_configs(tokenizer_dir)[:1],
        scoring_function_modules=["rms_test_plugin.extra"],
    )
    client = start(create_app(config, scripted_factory({})))
    try:
        listed = {
            card["id"] for card in client.get("/v1/scoring_functions").json()["data"]
        }
        assert {"rms_test_plugin::response_length", "rms_test_plugin::word_count"} <= (
            listed
        )
        answer = conversation("Paris is the capital")
        words = score(client, "rm", answer, "rms_test_plugin::word_count")
        assert words["score"] == 4.0
        characters = score(
            client, "rm", answer, "rms_test_plugin::response_length", unit="characters"
        )
        assert characters["score"] == 20.0
        tokens = score(client, "rm", answer, "rms_test_plugin::response_length")
        assert tokens["score"] == tokens["usage"]["response_tokens"]
        bad = post(
            client, "rm", answer, "rms_test_plugin::response_length", unit="bytes"
        )
        assert_invalid(bad, "scoring_function.params.unit")
    finally:
        client.__exit__(None, None, None)


def post_allowing_nan(client, body: dict):
    """POST with NaN and Infinity written as Python's JSON encoder writes them."""
    return client.post(
        "/reward_model_scoring/",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )


@pytest.mark.parametrize(
    ("model", "name", "params", "param"),
    [
        pytest.param("rm", "raw", {"shift": math.inf}, "shift", id="raw-shift-inf"),
        pytest.param("rm", "raw", {"scale": math.nan}, "scale", id="raw-scale-nan"),
        pytest.param(
            "lm",
            "exact_match",
            {"reference": "Paris", "mismatch_logprob": -math.inf},
            "mismatch_logprob",
            id="rule-mismatch-logprob-inf",
        ),
        pytest.param(
            "lm",
            "weighted_sum",
            {"functions": [{"name": "response_logprob", "weight": math.inf}]},
            "functions.0.weight",
            id="weighted-sum-weight-inf",
        ),
    ],
)
def test_non_finite_params_rejected(client, model, name, params, param):
    body = {
        "reward_model": model,
        "prompt_with_response": conversation("Paris"),
        "scoring_function": {"name": name, "params": params},
    }
    response = post_allowing_nan(client, body)
    assert_invalid(response, f"scoring_function.params.{param}", "finite")


def test_weighted_sum_weight_bounded(client):
    functions = [{"name": "response_logprob", "weight": 1e308}]
    response = post(
        client, "lm", conversation("Paris"), "weighted_sum", functions=functions
    )
    assert_invalid(response, "scoring_function.params.functions.0.weight")


def test_weighted_sum_logprob_overflow_is_clamped(client):
    part = {
        "name": "exact_match",
        "params": {"reference": "Berlin", "mismatch_logprob": -1.7e308},
    }
    result = score(
        client, "lm", conversation("Paris"), "weighted_sum", functions=[part, part]
    )
    assert result["logprob"] == -sys.float_info.max
    assert result["score"] == 0.0


def test_non_finite_option_rejected(client):
    body = {
        "reward_model": "lm",
        "prompt_with_response": conversation("Paris"),
        "options": {"temperature": math.nan},
    }
    response = post_allowing_nan(client, body)
    assert_invalid(response, "options.temperature")


def test_weighted_sum_rejects_nesting(client):
    functions = [{"name": "weighted_sum", "params": {"functions": [{"name": "raw"}]}}]
    response = post(
        client, "rm", conversation("Paris"), "weighted_sum", functions=functions
    )
    assert_invalid(
        response, "scoring_function.params.functions.0.name", "cannot contain"
    )


def test_weighted_sum_limits_parts(client):
    functions = [{"name": "raw"}] * 17
    response = post(
        client, "rm", conversation("Paris"), "weighted_sum", functions=functions
    )
    assert_invalid(response, "scoring_function.params.functions", "at most 16")


def test_judge_rejects_format_spec(client):
    response = post(
        client,
        "lm",
        conversation("Paris"),
        "llm_judge",
        template="{response:>300000000}",
    )
    assert_invalid(response, "scoring_function.params.template", "invalid placeholder")
