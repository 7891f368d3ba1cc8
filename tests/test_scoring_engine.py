"""Scoring through HTTP on real vLLM engines serving tiny random models."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from tests import reference

pytestmark = pytest.mark.engine

DISCONNECT_TIMEOUT_S = 60
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def conversation(answer: str, prompt: list[dict] = QUESTION) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": answer}]


def score(client, model: str, messages: list[dict], **extra) -> dict:
    body = {"reward_model": model, "prompt_with_response": messages, **extra}
    response = client.post("/reward_model_scoring/", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_reward_matches_transformers(tiny_client, tiny_dir):
    result = score(
        tiny_client,
        "tiny-reward",
        conversation("Paris"),
        options={"return_token_ids": True},
    )
    expected = reference.head_logits(tiny_dir / "reward", result["token_ids"])
    assert result["score"] == pytest.approx(expected[0], abs=1e-4)
    assert result["logprob"] == pytest.approx(
        -math.log1p(math.exp(-expected[0])), abs=1e-4
    )
    assert result["labels"] == {"reward": result["score"]}
    assert result["scoring_function"] == "builtin::raw"


def test_reward_differs_between_responses(tiny_client):
    first = score(tiny_client, "tiny-reward", conversation("Paris"))
    second = score(tiny_client, "tiny-reward", conversation("Rome is the answer."))
    assert first["score"] != second["score"]


def test_reward_starts_with_one_bos(tiny_client, tiny_dir):
    result = score(
        tiny_client,
        "tiny-reward",
        conversation("Paris"),
        options={"return_token_ids": True},
    )
    token_ids = result["token_ids"]
    bos = 0
    assert token_ids[0] == bos
    assert token_ids[1] != bos
    assert result["usage"]["prompt_tokens"] == len(token_ids)


def test_multi_label_head_reports_each_label(tiny_client, tiny_dir):
    result = score(
        tiny_client,
        "tiny-multi",
        conversation("Paris"),
        options={"return_token_ids": True},
        scoring_function={"name": "raw", "params": {"label": "ok"}},
    )
    expected = reference.head_logits(tiny_dir / "multi", result["token_ids"])
    assert list(result["labels"]) == ["bad", "ok", "good"]
    for value, reference_value in zip(result["labels"].values(), expected, strict=True):
        assert value == pytest.approx(reference_value, abs=1e-4)
    assert result["score"] == pytest.approx(expected[1], abs=1e-4)
    top = max(expected)
    log_total = top + math.log(sum(math.exp(v - top) for v in expected))
    assert result["logprob"] == pytest.approx(expected[1] - log_total, abs=1e-4)


def test_multi_label_defaults_to_last_label(tiny_client):
    result = score(tiny_client, "tiny-multi", conversation("Paris"))
    assert result["score"] == result["labels"]["good"]


def test_multi_label_by_index(tiny_client):
    result = score(
        tiny_client,
        "tiny-multi",
        conversation("Paris"),
        scoring_function={"name": "builtin::raw", "params": {"label": 0}},
    )
    assert result["score"] == result["labels"]["bad"]


def test_generative_logprobs_match_transformers(tiny_client, tiny_dir):
    result = score(
        tiny_client,
        "tiny-lm",
        conversation("Paris is the capital."),
        options={"return_token_ids": True, "logprobs": True},
    )
    token_ids = result["token_ids"]
    start = result["response_start"]
    expected = reference.token_logprobs(
        tiny_dir / "causal", token_ids, start, len(token_ids)
    )
    assert len(result["token_logprobs"]) == result["usage"]["response_tokens"]
    assert result["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert result["logprob"] == pytest.approx(sum(expected), abs=1e-4)
    assert result["score"] == result["logprob"]
    assert result["logprob"] <= 0.0


def test_generative_mean_reduction(tiny_client):
    messages = conversation("Paris is the capital.")
    total = score(tiny_client, "tiny-lm", messages)
    mean = score(
        tiny_client,
        "tiny-lm",
        messages,
        scoring_function={"name": "response_logprob", "params": {"reduction": "mean"}},
    )
    tokens = mean["usage"]["response_tokens"]
    assert mean["score"] == pytest.approx(total["logprob"] / tokens, abs=1e-6)
    assert mean["logprob"] == pytest.approx(total["logprob"], abs=1e-6)


def test_generative_response_excludes_end_of_turn(tiny_client):
    result = score(
        tiny_client,
        "tiny-lm",
        conversation("Paris"),
        options={"return_token_ids": True},
    )
    # The response is the last thing sent: the end-of-turn tokens after it
    # cannot change its log-probabilities, so they are not sent.
    assert result["response_start"] + result["usage"]["response_tokens"] == len(
        result["token_ids"]
    )


def test_text_parts_equal_plain_content(tiny_client):
    parts = [{"type": "text", "text": "Paris"}, {"type": "text", "text": "is it."}]
    from_parts = score(tiny_client, "tiny-reward", conversation(parts))
    plain = score(tiny_client, "tiny-reward", conversation("Paris\nis it."))
    assert from_parts["score"] == plain["score"]


def test_long_prompt_is_truncated_from_left(tiny_client, tiny_dir):
    long_prompt = [{"role": "user", "content": "two plus two is four. " * 40}]
    result = score(
        tiny_client,
        "tiny-reward",
        conversation("Paris", long_prompt),
        options={"return_token_ids": True},
    )
    token_ids = result["token_ids"]
    assert len(token_ids) == 128
    assert result["usage"]["truncated_tokens"] > 0
    assert token_ids[0] == 0
    expected = reference.head_logits(tiny_dir / "reward", token_ids)
    assert result["score"] == pytest.approx(expected[0], abs=1e-4)


def test_long_prompt_truncation_keeps_response(tiny_client):
    long_prompt = [{"role": "user", "content": "two plus two is four. " * 40}]
    short = score(tiny_client, "tiny-lm", conversation("Paris", QUESTION), options={})
    long = score(tiny_client, "tiny-lm", conversation("Paris", long_prompt))
    assert long["usage"]["response_tokens"] == short["usage"]["response_tokens"]
    assert long["usage"]["prompt_tokens"] == 127


def test_truncation_error_policy(tiny_client):
    long_prompt = [{"role": "user", "content": "two plus two is four. " * 40}]
    response = tiny_client.post(
        "/reward_model_scoring/",
        json={
            "reward_model": "tiny-reward",
            "prompt_with_response": conversation("Paris", long_prompt),
            "options": {"truncation": "error"},
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt_with_response"
    assert "128" in error["message"]


def test_response_longer_than_context(tiny_client):
    response = tiny_client.post(
        "/reward_model_scoring/",
        json={
            "reward_model": "tiny-reward",
            "prompt_with_response": conversation("two plus two is four. " * 40),
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "shorten the response" in error["message"]


def test_scoring_function_for_wrong_kind(tiny_client):
    response = tiny_client.post(
        "/reward_model_scoring/",
        json={
            "reward_model": "tiny-lm",
            "prompt_with_response": conversation("Paris"),
            "scoring_function": {"name": "raw"},
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "scoring_function.name"


def test_unknown_label(tiny_client):
    response = tiny_client.post(
        "/reward_model_scoring/",
        json={
            "reward_model": "tiny-multi",
            "prompt_with_response": conversation("Paris"),
            "scoring_function": {"name": "raw", "params": {"label": "great"}},
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "scoring_function.params.label"
    assert "bad" in error["message"]


def test_concurrent_requests(tiny_client):
    from concurrent.futures import ThreadPoolExecutor

    answers = [f"Answer number {i}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda answer: score(tiny_client, "tiny-reward", conversation(answer)),
                answers,
            )
        )
    singles = [score(tiny_client, "tiny-reward", conversation(a)) for a in answers[:4]]
    for batched, single in zip(results[:4], singles, strict=True):
        assert batched["score"] == pytest.approx(single["score"], abs=1e-4)


async def post_then_disconnect(app, engine, body: dict) -> list[dict]:
    """Send ``body`` to the app through ASGI, and disconnect once the engine
    has the request. Return the messages that the app sent back."""
    data = json.dumps(body).encode("utf-8")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/reward_model_scoring/",
        "raw_path": b"/reward_model_scoring/",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode("ascii")),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        while not engine.engine.output_processor.has_unfinished_requests():
            await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), DISCONNECT_TIMEOUT_S)
    return sent


def test_client_disconnect_aborts_engine_request(tiny_client):
    engine = tiny_client.app.state.service.models["tiny-reward"]
    aborted: list[str] = []
    abort = engine.engine.abort

    async def recording_abort(request_id, *args, **kwargs):
        aborted.append(request_id)
        return await abort(request_id, *args, **kwargs)

    body = {
        "reward_model": "tiny-reward",
        "prompt_with_response": conversation("Paris " * 40),
    }
    engine.engine.abort = recording_abort
    try:
        sent = tiny_client.portal.call(
            post_then_disconnect, tiny_client.app, engine, body
        )
    finally:
        del engine.engine.abort
    # The client is gone, so 499 only reaches the access log.
    assert sent[0]["status"] == 499
    assert b"score" not in b"".join(m.get("body", b"") for m in sent)
    assert aborted
    assert not engine.engine.output_processor.has_unfinished_requests()


def test_models_endpoint_lists_served_ids(tiny_client):
    response = tiny_client.get("/v1/models")
    assert response.status_code == 200
    cards = {card["id"]: card for card in response.json()["data"]}
    assert set(cards) == {"tiny-reward", "tiny-multi", "tiny-lm"}
    assert cards["tiny-multi"]["labels"] == ["bad", "ok", "good"]
    assert cards["tiny-lm"]["kind"] == "generative"
