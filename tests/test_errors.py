"""Error envelope and status codes, on fake engines (no vLLM engine starts)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from tests import tiny_models
from tests.fake_engine import fake_factory

ANSWER = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny_models.build_tokenizer(directory)
    return directory


def make_client(tokenizer_dir: Path, **overrides) -> TestClient:
    config = ServerConfig(
        models=[
            {"id": "rm", "path": str(tokenizer_dir), "kind": "reward"},
            {"id": "lm", "path": str(tokenizer_dir), "kind": "generative"},
        ],
        max_request_bytes=64 * 1024,
    )
    app = create_app(config, engine_factory=fake_factory(**overrides))
    # Server errors must come back as 500 responses, as a real client sees them.
    return TestClient(app, raise_server_exceptions=False)


def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    pytest.fail("fake engines never became ready")


@pytest.fixture(scope="module")
def client(tokenizer_dir):
    with make_client(tokenizer_dir) as client:
        wait_ready(client)
        yield client


def post(client, body: dict):
    return client.post("/reward_model_scoring/", json=body)


def assert_error(response, status: int, error_type: str, param: str | None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["param"] == param
    assert error["code"] == status
    return error


def test_fake_reward_scores(client):
    response = post(client, {"reward_model": "rm", "prompt_with_response": ANSWER})
    assert response.status_code == 200, response.text
    assert response.json()["score"] == 1.5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"prompt_with_response": ANSWER}, "reward_model", id="no-model"),
        pytest.param({"reward_model": "rm"}, "prompt_with_response", id="no-messages"),
        pytest.param(
            {"reward_model": "rm", "prompt_with_response": []},
            "prompt_with_response",
            id="empty-messages",
        ),
        pytest.param(
            {
                "reward_model": "rm",
                "prompt_with_response": [{"role": "robot", "content": "hi"}],
            },
            "prompt_with_response.0.role",
            id="bad-role",
        ),
        pytest.param(
            {"reward_model": "rm", "prompt_with_response": [{"role": "user"}]},
            "prompt_with_response.0.content",
            id="no-content",
        ),
        pytest.param(
            {
                "reward_model": "rm",
                "prompt_with_response": [
                    {"role": "assistant", "content": [{"type": "image", "url": "x"}]}
                ],
            },
            "prompt_with_response.0.content",
            id="image-part",
        ),
        pytest.param(
            {"reward_model": "rm", "prompt_with_response": ANSWER, "modle": "x"},
            "modle",
            id="unknown-field",
        ),
        pytest.param(
            {
                "reward_model": "rm",
                "prompt_with_response": ANSWER,
                "options": {"top_p": 2},
            },
            "options.top_p",
            id="top-p-range",
        ),
        pytest.param(
            {"reward_model": 7, "prompt_with_response": ANSWER},
            "reward_model",
            id="model-not-string",
        ),
    ],
)
def test_invalid_body_names_field(client, body, param):
    error = assert_error(
        post(client, body), 400, "invalid_request_error", None or param
    )
    assert param.split(".")[0] in error["message"]


def test_malformed_json(client):
    response = client.post(
        "/reward_model_scoring/",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    error = assert_error(response, 400, "invalid_request_error", None)
    assert "not valid JSON" in error["message"]


def test_last_message_must_be_assistant(client):
    body = {"reward_model": "rm", "prompt_with_response": ANSWER[:1]}
    error = assert_error(
        post(client, body), 400, "invalid_request_error", "prompt_with_response"
    )
    assert "assistant" in error["message"]


def test_unknown_model_lists_served_ids(client):
    body = {"reward_model": "nope", "prompt_with_response": ANSWER}
    error = assert_error(post(client, body), 404, "not_found_error", "reward_model")
    assert "rm" in error["message"]
    assert "lm" in error["message"]


def test_unknown_scoring_function(client):
    body = {
        "reward_model": "rm",
        "prompt_with_response": ANSWER,
        "scoring_function": {"name": "nope"},
    }
    error = assert_error(
        post(client, body), 404, "not_found_error", "scoring_function.name"
    )
    assert "builtin::raw" in error["message"]


def test_invalid_scoring_params(client):
    body = {
        "reward_model": "lm",
        "prompt_with_response": ANSWER,
        "scoring_function": {
            "name": "response_logprob",
            "params": {"reduction": "max"},
        },
    }
    error = assert_error(
        post(client, body),
        400,
        "invalid_request_error",
        "scoring_function.params.reduction",
    )
    assert "sum" in error["message"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        pytest.param({"scale": "2"}, "scale", id="string-for-number"),
        pytest.param({"label": True}, "label", id="bool-for-label"),
    ],
)
def test_scoring_params_are_not_coerced(client, params, param):
    body = {
        "reward_model": "rm",
        "prompt_with_response": ANSWER,
        "scoring_function": {"name": "raw", "params": params},
    }
    assert_error(
        post(client, body),
        400,
        "invalid_request_error",
        f"scoring_function.params.{param}",
    )


@pytest.mark.parametrize(
    ("options", "param"),
    [
        pytest.param({"priority": True}, "priority", id="bool-priority"),
        pytest.param({"priority": "1"}, "priority", id="string-priority"),
        pytest.param({"priority": 1e30}, "priority", id="huge-priority"),
        pytest.param({"max_tokens": "5"}, "max_tokens", id="string-max-tokens"),
        pytest.param({"temperature": "0.5"}, "temperature", id="string-temperature"),
        pytest.param({"logprobs": 1}, "logprobs", id="number-logprobs"),
    ],
)
def test_options_are_not_coerced(client, options, param):
    body = {"reward_model": "rm", "prompt_with_response": ANSWER, "options": options}
    error = assert_error(
        post(client, body), 400, "invalid_request_error", f"options.{param}"
    )
    assert "Unable to parse" not in error["message"]


def test_unknown_scoring_param(client):
    body = {
        "reward_model": "rm",
        "prompt_with_response": ANSWER,
        "scoring_function": {"name": "raw", "params": {"lable": 1}},
    }
    assert_error(
        post(client, body),
        400,
        "invalid_request_error",
        "scoring_function.params.lable",
    )


def test_empty_response_for_logprob(client):
    body = {
        "reward_model": "lm",
        "prompt_with_response": [ANSWER[0], {"role": "assistant", "content": ""}],
    }
    assert_error(
        post(client, body), 400, "invalid_request_error", "prompt_with_response"
    )


def test_not_found_route_uses_envelope(client):
    response = client.get("/no/such/route")
    assert_error(response, 404, "not_found_error", None)


def test_method_not_allowed_uses_envelope(client):
    response = client.get("/reward_model_scoring/")
    assert_error(response, 405, "method_not_allowed", None)


def test_nan_output_is_error(tokenizer_dir):
    with make_client(tokenizer_dir, outputs=[float("nan")]) as client:
        wait_ready(client)
        response = post(client, {"reward_model": "rm", "prompt_with_response": ANSWER})
        error = assert_error(response, 500, "model_output_error", None)
        assert "nan" in error["message"]
        response = post(client, {"reward_model": "lm", "prompt_with_response": ANSWER})
        assert_error(response, 500, "model_output_error", None)


def test_infinite_output_is_error(tokenizer_dir):
    with make_client(tokenizer_dir, outputs=[float("inf"), 0.0]) as client:
        wait_ready(client)
        response = post(client, {"reward_model": "rm", "prompt_with_response": ANSWER})
        assert_error(response, 500, "model_output_error", None)


def test_unexpected_error_hides_internals(tokenizer_dir):
    secret = RuntimeError("/secret/path/weights.bin exploded")
    with make_client(tokenizer_dir, fail_with=secret) as client:
        wait_ready(client)
        response = post(client, {"reward_model": "rm", "prompt_with_response": ANSWER})
        error = assert_error(response, 500, "internal_error", None)
        assert "secret" not in response.text
        assert error["message"] == "internal server error"


def test_dead_engine_is_503(tokenizer_dir):
    from vllm.v1.engine.exceptions import EngineDeadError

    with make_client(tokenizer_dir, fail_with=EngineDeadError()) as client:
        wait_ready(client)
        response = post(client, {"reward_model": "rm", "prompt_with_response": ANSWER})
        assert_error(response, 503, "service_unavailable", None)


def test_starting_engines_give_503(tokenizer_dir):
    with make_client(tokenizer_dir, start_delay_s=30.0) as client:
        response = post(client, {"reward_model": "rm", "prompt_with_response": ANSWER})
        error = assert_error(response, 503, "service_unavailable", None)
        assert "starting" in error["message"]
        health = client.get("/health")
        assert_error(health, 503, "service_unavailable", None)
        assert client.head("/health").status_code == 503


def test_deeply_nested_body_is_400(client):
    nested = b"[" * 20_000 + b"]" * 20_000
    response = client.post(
        "/reward_model_scoring/",
        content=b'{"reward_model": "rm", "prompt_with_response": ' + nested + b"}",
        headers={"content-type": "application/json"},
    )
    error = assert_error(response, 400, "invalid_request_error", None)
    assert "could not be parsed as JSON" in error["message"]


def test_health_supports_head(client):
    response = client.head("/health")
    assert response.status_code == 200
    assert response.content == b""


def test_openapi_keeps_spec_names(client):
    schema = client.get("/openapi.json").json()
    assert "/reward_model_scoring/" in schema["paths"]
    names = set(schema["components"]["schemas"])
    assert {"Message", "Options", "ScoringFunction"} <= names
    assert "ErrorResponse" in names
    # Invalid input gets 400 in the envelope, not FastAPI's 422 body.
    assert "HTTPValidationError" not in names
    scoring = schema["paths"]["/reward_model_scoring/"]["post"]["responses"]
    assert "ErrorResponse" in str(scoring["422"])
    assert "503" in schema["paths"]["/health"]["get"]["responses"]
    status = schema["paths"]["/reward_model_scoring/submit_job/job_status"]["get"]
    assert sorted(status["responses"]) == ["200", "400", "404"]


def test_lone_surrogate_is_invalid(client):
    raw = (
        b'{"reward_model": "rm", "prompt_with_response": ['
        b'{"role": "user", "content": "q"},'
        b'{"role": "assistant", "content": "\\ud800"}]}'
    )
    response = client.post(
        "/reward_model_scoring/",
        content=raw,
        headers={"content-type": "application/json"},
    )
    error = assert_error(
        response, 400, "invalid_request_error", "prompt_with_response.1.content"
    )
    assert "surrogate" in error["message"]


def test_string_for_boolean_option(client):
    body = {
        "reward_model": "lm",
        "prompt_with_response": ANSWER,
        "options": {"logprobs": "yes"},
    }
    assert_error(post(client, body), 400, "invalid_request_error", "options.logprobs")


def test_connection_survives_internal_error(tokenizer_dir):
    with make_client(tokenizer_dir, fail_with=RuntimeError("boom")) as client:
        wait_ready(client)
        body = {"reward_model": "rm", "prompt_with_response": ANSWER}
        assert post(client, body).status_code == 500
        assert client.get("/v1/models").status_code == 200


def test_oversized_body_is_413(client):
    body = {
        "reward_model": "rm",
        "prompt_with_response": [
            {"role": "user", "content": "x" * 70_000},
            {"role": "assistant", "content": "Paris"},
        ],
    }
    error = assert_error(post(client, body), 413, "request_too_large", None)
    assert "65536" in error["message"]


def test_oversized_chunked_body_is_413(client):
    chunks = [b'{"reward_model": "rm", "x": "'] + [b"y" * 8192] * 10 + [b'"}']
    response = client.post(
        "/reward_model_scoring/",
        content=iter(chunks),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, "request_too_large", None)


def test_path_without_trailing_slash(client):
    body = {"reward_model": "rm", "prompt_with_response": ANSWER}
    response = client.post("/reward_model_scoring", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["score"] == 1.5


def test_long_conversation_tokenized_in_thread(client, monkeypatch):
    import threading

    from scoring_functions import base
    from server.chat import ConversationRenderer

    threads = []
    tokenize = ConversationRenderer.tokenize

    def recording_tokenize(self, messages):
        threads.append(threading.current_thread())
        return tokenize(self, messages)

    monkeypatch.setattr(ConversationRenderer, "tokenize", recording_tokenize)
    body = {"reward_model": "rm", "prompt_with_response": ANSWER}
    monkeypatch.setattr(base, "OFFLOAD_CHARS", 1_000)
    assert post(client, body).status_code == 200
    monkeypatch.setattr(base, "OFFLOAD_CHARS", 10)
    assert post(client, body).status_code == 200
    # The first request ran on the event loop's thread, the second did not.
    assert len(threads) == 2
    assert threads[0] is not threads[1]
    assert threads[1].name.startswith("asyncio")


def test_vllm_validation_error_is_400(tokenizer_dir):
    import asyncio

    from vllm.exceptions import VLLMValidationError

    from server.config import ModelConfig
    from server.engine import ModelEngine
    from server.errors import InvalidRequestError

    engine = ModelEngine(
        ModelConfig(id="rm", path=str(tokenizer_dir), kind="process_reward")
    )

    async def rejecting_submit(prompt, params, request_id, priority=0):
        raise VLLMValidationError("step_tag_id is not supported")
        yield

    with pytest.raises(InvalidRequestError) as raised:
        asyncio.run(engine._run(rejecting_submit, [1, 2], None, "r-1", 0))
    assert raised.value.status_code == 400
    assert "model rm rejected the request" in raised.value.message
    assert "step_tag_id is not supported" in raised.value.message


def test_unknown_default_label_fails_model(tokenizer_dir):
    config = ServerConfig(
        models=[
            {
                "id": "rm",
                "path": str(tokenizer_dir),
                "kind": "reward",
                "default_label": "Yes",
            }
        ]
    )
    app = create_app(config, engine_factory=fake_factory())
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(200):
            health = client.get("/health")
            if "default_label" in health.text:
                break
            time.sleep(0.05)
        error = assert_error(health, 503, "service_unavailable", None)
    assert "default_label 'Yes' is not a label of this model" in error["message"]
    assert "['score']" in error["message"]
