# The README's commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo laptop test test-fast lint repro bench guard clean-demo

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m lggseg.workspace --dest demo --overrides params.demo.yaml

# The laptop recipe (README "No GPU? Train on a laptop"): real data, 2 CPU cores, <= 30 min.
laptop: install
	@test -n "$(DATA)" || { echo "usage: make laptop DATA=/path/to/kaggle_3m (or the Kaggle zip)" >&2; exit 2; }
	$(BIN)/python -m lggseg.workspace --dest laptop --overrides params.laptop.yaml \
		--set fetch.source=$(abspath $(DATA)) --targets evaluate@laptop

# Tests marked bf16path follow LGGSEG_CPU_BF16 and run under both settings, so the bf16 and the float32
# CPU paths are checked on either CPU type (bf16 is emulated, slower, where the CPU lacks it).
test: install
	$(BIN)/ruff check src stages tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not bf16path"
	LGGSEG_CPU_BF16=off $(BIN)/python -m pytest -m bf16path
	LGGSEG_CPU_BF16=native $(BIN)/python -m pytest -m bf16path

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check src stages tests
	$(BIN)/lint-imports

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro -f bench/dvc.yaml:bench

guard:
	$(BIN)/python -m pytest tests/test_repo_hygiene.py

clean-demo:
	rm -rf demo
