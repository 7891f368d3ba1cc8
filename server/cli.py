"""Command line: ``python -m server`` starts the scoring server."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.config import (
    DEFAULT_JUDGE_TEMPLATE,
    ServerConfig,
    load_config_file,
    resolve_paths,
)
from server.errors import describe_validation_errors

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048


def default_models(model_dir: Path) -> list[dict[str, Any]]:
    """Serve SmolLM2-135M-Instruct as a yes/no judge and as a generative model."""
    common = {
        "path": str(model_dir),
        "dtype": "float32",
        "max_model_len": DEFAULT_MAX_MODEL_LEN,
        "engine_args": {"enforce_eager": True},
    }
    return [
        {
            "id": "smollm2-judge",
            "kind": "reward",
            "hf_overrides": {
                "architectures": ["LlamaForSequenceClassification"],
                "classifier_from_token": ["No", "Yes"],
                "method": "from_2_way_softmax",
            },
            "judge_template": DEFAULT_JUDGE_TEMPLATE,
            **common,
        },
        {"id": "smollm2", "kind": "generative", **common},
    ]


def parse_model_spec(text: str) -> dict[str, Any]:
    """Parse ``--model``: a JSON object or ``key=value`` pairs joined by commas."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"invalid JSON: {error}") from error
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return spec
    spec: dict[str, Any] = {}
    for item in text.split(","):
        key, separator, value = item.partition("=")
        if not separator:
            raise argparse.ArgumentTypeError(
                f"--model: expected key=value pairs such as "
                f"'id=rm,path=/models/rm,kind=reward', got {item!r}"
            )
        spec[key.strip()] = value.strip()
    return spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve reward models over HTTP. Without --config or --model it "
        "serves the default SmolLM2-135M-Instruct judge and generative models.",
    )
    parser.add_argument(
        "--config", type=Path, help="TOML or YAML settings file (see README)."
    )
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model_spec,
        default=[],
        metavar="SPEC",
        help="A model to serve, as a JSON object or key=value pairs, for example "
        "'id=rm,path=/models/rm,kind=reward,dtype=float32'. Repeat for more models; "
        "adds to the models of --config.",
    )
    parser.add_argument("--host", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, help="TCP port (default 8000).")
    add_log_level_argument(parser, default="info")
    return parser


def add_log_level_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """Add ``--log-level``, which sets the level of the service's own loggers."""
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help=f"Log level of the service's own loggers (default {default}).",
    )


def load_server_config(args: argparse.Namespace) -> ServerConfig:
    """Merge the config file, --model flags and defaults into ServerConfig."""
    data: dict[str, Any] = {}
    if args.config is not None:
        data = resolve_paths(load_config_file(args.config), args.config.parent)
    data.setdefault("models", [])
    if not isinstance(data["models"], list):
        raise ValueError("models: must be a list of model settings")
    data["models"] = [*data["models"], *args.model]
    if not data["models"]:
        from server.default_model import prepare_default_model

        data["models"] = default_models(prepare_default_model())
    if args.host is not None:
        data["host"] = args.host
    if args.port is not None:
        data["port"] = args.port
    return ServerConfig.model_validate(data)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_server_config(args)
    except ValidationError as error:
        message = describe_validation_errors(error.errors())[1]
        parser.error(f"invalid configuration: {message}")
    except (ValueError, OSError) as error:
        parser.error(f"invalid configuration: {error}")

    import uvicorn

    from server.app import create_app

    try:
        # Loads scoring-function plug-ins and checks each model's
        # scoring_params, which raise ValueError or TypeError when invalid.
        app = create_app(config)
    except (ValueError, TypeError) as error:
        parser.error(f"invalid configuration: {error}")
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        access_log=False,
    )


if __name__ == "__main__":
    main()
