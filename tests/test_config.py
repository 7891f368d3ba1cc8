"""Settings files and command-line flags."""

from __future__ import annotations

import argparse
import re

import pytest
from pydantic import ValidationError

from server.cli import build_parser, load_server_config, parse_model_spec
from server.config import ServerConfig, load_config_file, resolve_paths
from server.engine import build_engine_args

YAML_TEXT = """
port: 9001
models:
  - id: rm
    path: ./models/rm
    kind: reward
    dtype: float32
    hf_overrides: {architectures: [LlamaForSequenceClassification]}
    engine_args: {enforce_eager: true}
"""
TOML_TEXT = """
port = 9002
[[models]]
id = "lm"
path = "/models/lm"
kind = "generative"
max_model_len = 1024
"""


def test_yaml_file_with_relative_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(YAML_TEXT)
    args = build_parser().parse_args(["--config", str(path)])
    config = load_server_config(args)
    assert config.port == 9001
    assert config.models[0].path == str(tmp_path / "models" / "rm")
    assert config.models[0].hf_overrides == {
        "architectures": ["LlamaForSequenceClassification"]
    }


def test_toml_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(TOML_TEXT)
    config = ServerConfig.model_validate(
        resolve_paths(load_config_file(path), tmp_path)
    )
    assert config.models[0].max_model_len == 1024
    assert config.models[0].kind == "generative"


def test_unknown_file_suffix(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=".toml"):
        load_config_file(path)


def test_model_flag_key_value_pairs():
    spec = parse_model_spec("id=rm,path=/models/rm,kind=reward,dtype=float32")
    assert spec == {
        "id": "rm",
        "path": "/models/rm",
        "kind": "reward",
        "dtype": "float32",
    }


def test_model_flag_json():
    spec = parse_model_spec('{"id": "rm", "path": "/m", "kind": "reward"}')
    assert spec["kind"] == "reward"


@pytest.mark.parametrize(
    ("text", "message"),
    [("{bad json", "invalid JSON"), ("[1, 2]", "expected a JSON object")],
)
def test_model_flag_invalid_json(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_model_spec(text)


def test_model_flag_without_equals():
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        parse_model_spec("rm")


def test_model_flags_add_to_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(TOML_TEXT)
    args = build_parser().parse_args(
        ["--config", str(path), "--model", "id=rm,path=/m,kind=reward", "--port", "7"]
    )
    config = load_server_config(args)
    assert [model.id for model in config.models] == ["lm", "rm"]
    assert config.port == 7


def test_duplicate_model_ids():
    model = {"id": "rm", "path": "/m", "kind": "reward"}
    with pytest.raises(ValidationError, match="unique"):
        ServerConfig(models=[model, model])


def test_unknown_model_key():
    with pytest.raises(ValidationError, match="dtyp"):
        ServerConfig(models=[{"id": "rm", "path": "/m", "kind": "reward", "dtyp": 1}])


def test_judge_template_placeholders():
    model = {"id": "rm", "path": "/m", "kind": "reward", "judge_template": "{answer}"}
    with pytest.raises(ValidationError, match="conversation"):
        ServerConfig(models=[model])


def test_engine_args_per_kind():
    config = ServerConfig(
        models=[
            {
                "id": "rm",
                "path": "/m",
                "kind": "reward",
                "max_model_len": 512,
                "dtype": "bfloat16",
                "engine_args": {"enforce_eager": True},
            },
            {"id": "lm", "path": "/m", "kind": "generative"},
            {"id": "prm", "path": "/m", "kind": "process_reward"},
            {
                "id": "prm-all",
                "path": "/m",
                "kind": "process_reward",
                "engine_args": {"pooler_config": {"tok_pooling_type": "ALL"}},
            },
        ]
    )
    reward, generative, prm, prm_all = (
        build_engine_args(model) for model in config.models
    )
    assert reward["runner"] == "pooling"
    assert reward["max_model_len"] == 512
    assert reward["enforce_eager"] is True
    assert reward["dtype"] == "bfloat16"
    assert generative["runner"] == "generate"
    assert "max_model_len" not in generative
    assert generative["scheduling_policy"] == "priority"
    assert "pooler_config" not in reward
    assert prm["pooler_config"] == {"tok_pooling_type": "STEP"}
    assert prm_all["pooler_config"] == {"tok_pooling_type": "ALL"}


def test_judge_template_needs_response():
    model = {
        "id": "rm",
        "path": "/m",
        "kind": "reward",
        "judge_template": "{conversation}",
    }
    with pytest.raises(ValidationError, match="response"):
        ServerConfig(models=[model])


def test_judge_template_rejects_format_spec():
    model = {
        "id": "rm",
        "path": "/m",
        "kind": "reward",
        "judge_template": "{conversation}{response:>99999999}",
    }
    with pytest.raises(ValidationError, match="invalid placeholder"):
        ServerConfig(models=[model])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        pytest.param("bad.yaml", "models: [{id: a\n", "not valid YAML", id="yaml"),
        pytest.param("bad.toml", "x = \n", "not valid TOML", id="toml"),
        pytest.param(
            "list.yaml", "models: abc\n", "models: must be a list", id="models-str"
        ),
        pytest.param(
            "unknown.yaml",
            "models: [{id: a, path: /m, kind: reward, colour: red}]\n",
            "models.0.colour: unknown field",
            id="unknown-key",
        ),
        pytest.param(
            "folder.yaml",
            "jobs: {folder: /dev/null/jobs}\n"
            "models: [{id: a, path: /m, kind: reward}]\n",
            "jobs.folder: /dev/null is not a folder",
            id="jobs-folder-file",
        ),
        pytest.param(
            "plugin.yaml",
            "scoring_function_modules: [no_such_module_xyz]\n"
            "models: [{id: a, path: /m, kind: reward}]\n",
            "cannot import 'no_such_module_xyz'",
            id="missing-plugin",
        ),
    ],
)
def test_server_rejects_invalid_config(tmp_path, name, text, message):
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(config)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        pytest.param(
            {"kind": "generative", "default_label": "Yes"},
            "default_label applies to reward",
            id="label-on-generative",
        ),
        pytest.param(
            {"kind": "reward", "engine_args": {"model": "/other", "dtype": "half"}},
            "dtype (use dtype), model (use path)",
            id="engine-args-clash",
        ),
    ],
)
def test_model_settings_conflicts(model, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        ServerConfig(models=[{"id": "m", "path": "/m", **model}])


@pytest.mark.parametrize(
    ("location", "message"),
    [
        pytest.param("{tmp}", "has no config.json", id="not-a-checkpoint"),
        pytest.param("{tmp}/missing", "does not exist", id="missing"),
        pytest.param("name-without-org", "does not exist", id="bare-name"),
    ],
)
def test_local_checkpoint_checked(tmp_path, location, message):
    from server.engine import check_local_checkpoint

    with pytest.raises(ValueError, match=message):
        check_local_checkpoint(location.format(tmp=tmp_path), "path")


def test_hub_id_left_to_vllm():
    from server.engine import check_local_checkpoint

    check_local_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct", "path")
