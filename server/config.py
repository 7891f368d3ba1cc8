"""Typed server and model settings, read from a TOML or YAML file or CLI flags."""

from __future__ import annotations

import enum
import logging
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

TruncationPolicy = Literal["left", "error"]

DEFAULT_JUDGE_TEMPLATE = (
    "Here is a conversation between a user and an assistant.\n\n"
    "{conversation}\n\n"
    "Here is the assistant's final answer:\n{response}\n\n"
    "Is the final answer correct and helpful? Answer Yes or No."
)


class ModelKind(enum.StrEnum):
    """How a served model turns a conversation into numbers."""

    # Pooling runner, classify task: one or more logits from a sequence head.
    REWARD = "reward"
    # Generate runner: log-probabilities of the prompt tokens.
    GENERATIVE = "generative"


class ModelConfig(BaseModel):
    """One served model and the vLLM engine that runs it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9._:/-]+$",
        description="Name that requests use in `reward_model`.",
    )
    path: str = Field(
        min_length=1,
        description="Local Hugging Face checkpoint folder (or a hub id where a hub "
        "is reachable).",
    )
    kind: ModelKind = Field(description="`reward` or `generative`.")
    dtype: str = Field(
        "auto",
        description="Weight dtype passed to vLLM; use float32 on CPU.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length in tokens; default: the model's."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder when it differs from `path`."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (text or a path to a file) replacing the "
        "tokenizer's own.",
    )
    hf_overrides: dict[str, Any] | None = Field(
        None,
        description="Overrides of the Hugging Face config, for example "
        "`architectures` and `classifier_from_token` to turn a causal LM into a "
        "yes/no judge.",
    )
    judge_template: str | None = Field(
        None,
        description="Prompt that wraps the conversation into one user turn asking "
        "a yes/no question, with `{conversation}` and `{response}` placeholders "
        "(write literal braces as `{{` and `}}`). Reward models only; use it for a "
        "language model turned into a yes/no judge.",
    )
    truncation: TruncationPolicy = Field(
        "left",
        description="What to do with a conversation longer than the context: "
        "`left` drops the oldest prompt tokens and keeps the whole response; "
        "`error` rejects it with 400.",
    )
    default_label: str | int | None = Field(
        None,
        description="Label (name or index) that `score` reports for multi-label "
        "heads when the request names none; default: the last label.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Other vLLM engine arguments, as AsyncEngineArgs field names.",
    )

    @field_validator("judge_template")
    @classmethod
    def _check_judge_template(cls, template: str | None) -> str | None:
        if template is None:
            return None
        try:
            template.format(conversation="", response="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                "judge_template may only use the {conversation} and {response} "
                f"placeholders; literal braces are written {{{{ and }}}}: {error!r}"
            ) from error
        return template

    @model_validator(mode="after")
    def _check_kind_options(self) -> ModelConfig:
        if self.judge_template is not None and self.kind != ModelKind.REWARD:
            raise ValueError("judge_template applies to reward models only")
        return self


class ServerConfig(BaseModel):
    """Settings of the whole server."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    models: list[ModelConfig] = Field(min_length=1)
    scoring_function_modules: list[str] = Field(
        default_factory=list,
        description="Python modules to import for third-party scoring functions.",
    )
    jobs: dict[str, Any] = Field(
        default_factory=dict, description="Batch job settings."
    )

    @model_validator(mode="after")
    def _check_unique_ids(self) -> ServerConfig:
        ids = [model.id for model in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {duplicates}")
        return self


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml, .yml) settings file into a dict."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(
            f"config file {path} must end in .toml, .yaml or .yml to pick a parser"
        )
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must contain a mapping at the top")
    return data


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative model paths in a config file relative to the file's folder."""
    for model in data.get("models", []):
        for key in ("path", "tokenizer"):
            value = model.get(key)
            if isinstance(value, str) and value.startswith(("./", "../")):
                model[key] = str((base / value).resolve())
    return data
