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
# vLLM engine arguments that a model's own settings set. engine_args may not
# repeat them, because one of the two values would be ignored.
ENGINE_ARGS_WITH_FIELDS = {
    "model": "path",
    "tokenizer": "tokenizer",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "hf_overrides": "hf_overrides",
    "runner": "kind",
}

DEFAULT_JUDGE_TEMPLATE = (
    "Here is a conversation between a user and an assistant.\n\n"
    "{conversation}\n\n"
    "Here is the assistant's final answer:\n{response}\n\n"
    "Is the final answer correct and helpful? Answer Yes or No."
)


class ModelKind(enum.StrEnum):
    """Kind of served model, which decides the vLLM runner and the scores."""

    # Pooling runner, classify task: one or more logits from a sequence head.
    REWARD = "reward"
    # Generate runner: log-probabilities of the prompt tokens.
    GENERATIVE = "generative"
    # Pooling runner, token_classify task with step pooling: one row of logits
    # per step tag token, as vLLM's Qwen2ForProcessRewardModel returns.
    PROCESS_REWARD = "process_reward"


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
    kind: ModelKind = Field(description="`reward`, `generative` or `process_reward`.")
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
    scoring_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Default `params` per scoring function for this model, keyed by "
        "function id or built-in short name, for example "
        "`{raw: {shift: 0.2, scale: 1.5}}`. Parameters that a request sets override "
        "these.",
    )

    @field_validator("judge_template")
    @classmethod
    def _check_judge_template(cls, template: str | None) -> str | None:
        from server.chat import check_prompt_template

        return None if template is None else check_prompt_template(template)

    @model_validator(mode="after")
    def _check_kind_options(self) -> ModelConfig:
        if self.judge_template is not None and self.kind != ModelKind.REWARD:
            raise ValueError("judge_template applies to reward models only")
        if self.default_label is not None and self.kind == ModelKind.GENERATIVE:
            raise ValueError(
                "default_label applies to reward and process_reward models only"
            )
        clashes = sorted(self.engine_args.keys() & ENGINE_ARGS_WITH_FIELDS.keys())
        if clashes:
            fields = ", ".join(
                f"{key} (use {ENGINE_ARGS_WITH_FIELDS[key]})" for key in clashes
            )
            raise ValueError(f"engine_args: set these through their own keys: {fields}")
        return self


class JobsConfig(BaseModel):
    """Batch job settings: where jobs live, what they may read, how they run."""

    model_config = ConfigDict(extra="forbid")

    folder: Path = Field(
        Path("data/jobs"),
        description="Folder of job records, stored inputs and result files. A "
        "relative path is relative to the working directory, or to the config "
        "file's folder when it starts with `./` or `../`.",
    )
    input_folders: list[Path] = Field(
        default_factory=list,
        description="Folders (with their subfolders) that `filepath` and "
        "`file://` inputs may read; other local paths are rejected with 400. "
        "Empty: jobs accept only `raw_bytes` and enabled remote URIs.",
    )
    uri_schemes: list[str] = Field(
        default_factory=list,
        description="URI schemes besides `file` that jobs may read through "
        "fsspec, for example `s3` or `https`; each needs its fsspec backend "
        "installed. Empty: remote inputs are rejected with 400.",
    )
    max_running_jobs: int = Field(
        2, ge=1, description="Jobs that run at once; later jobs wait in a queue."
    )
    max_in_flight_per_job: int = Field(
        16,
        ge=1,
        le=4096,
        description="Maximum lines of one job that are being scored or waiting "
        "to be written at once.",
    )
    max_in_flight_per_job_when_busy: int = Field(
        1,
        ge=0,
        le=4096,
        description="Maximum lines of one job that are being scored while the "
        "engine also has requests that are not job lines, such as interactive "
        "ones. Lower values keep their latency closer to that of an idle "
        "server; 0 pauses jobs until those requests are gone.",
    )
    busy_cooldown_s: float = Field(
        1.0,
        ge=0.0,
        le=600.0,
        description="Seconds that jobs keep to max_in_flight_per_job_when_busy "
        "after they last saw other requests in the engine.",
    )
    priority: int = Field(
        10,
        ge=1,
        le=1000,
        description="vLLM scheduling priority of job lines; interactive requests "
        "use 0 and lower values run first.",
    )
    max_raw_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Maximum size in bytes of a `raw_bytes` input, as UTF-8.",
    )
    max_line_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="Maximum size in bytes of one input line; longer lines are "
        "recorded as errors.",
    )

    @field_validator("uri_schemes")
    @classmethod
    def _normalize_schemes(cls, schemes: list[str]) -> list[str]:
        return [scheme.lower().removesuffix("://") for scheme in schemes]


class ServerConfig(BaseModel):
    """Settings of the whole server."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    models: list[ModelConfig] = Field(min_length=1)
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest body in bytes that POST /reward_model_scoring/ "
        "accepts; larger ones get 413.",
    )
    scoring_function_modules: list[str] = Field(
        default_factory=list,
        description="Third-party scoring functions to register, each as "
        "`module` (registers the module's `SCORING_FUNCTIONS` list) or "
        "`module:attribute` (a ScoringFunction subclass or a list of them).",
    )
    scoring_function_entry_points: bool = Field(
        True,
        description="Also register the scoring functions that installed packages "
        "declare in the `reward_model_service.scoring_functions` entry-point group.",
    )
    jobs: JobsConfig = Field(
        default_factory=JobsConfig, description="Batch job settings."
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
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    else:
        raise ValueError(
            f"config file {path} must end in .toml, .yaml or .yml to pick a parser"
        )
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must contain a mapping at the top")
    return data


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative model and job paths relative to the config file's folder.

    Only values that start with ``./`` or ``../`` are changed.
    """
    models = data.get("models")
    for model in models if isinstance(models, list) else []:
        if not isinstance(model, dict):
            continue
        for key in ("path", "tokenizer"):
            value = model.get(key)
            if isinstance(value, str) and value.startswith(("./", "../")):
                model[key] = str((base / value).resolve())
    jobs = data.get("jobs")
    if isinstance(jobs, dict):
        folder = jobs.get("folder")
        if isinstance(folder, str) and folder.startswith(("./", "../")):
            jobs["folder"] = str((base / folder).resolve())
        folders = jobs.get("input_folders")
        if isinstance(folders, list):
            jobs["input_folders"] = [
                str((base / value).resolve())
                if isinstance(value, str) and value.startswith(("./", "../"))
                else value
                for value in folders
            ]
    return data
