# The README's commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo laptop cpu-tables test test-fast lint repro bench guard clean-demo wheelhouse bundle

# Everything: the core package, the DVC pipeline's extras (dvc, dvclive, kagglehub, albumentations)
# and the test tools. An offline GPU node needs only the core (`make wheelhouse`, `make bundle`).
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev,pipeline]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m lggseg.workspace --dest demo --overrides params.demo.yaml

# The laptop recipe (README "No GPU? Train on a laptop"): real data, 2 CPU cores, <= 30 min.
laptop: install
	@test -n "$(DATA)" || { echo "usage: make laptop DATA=/path/to/kaggle_3m (or the Kaggle zip)" >&2; exit 2; }
	$(BIN)/python -m lggseg.workspace --dest laptop --overrides params.laptop.yaml \
		--set fetch.source=$(abspath $(DATA)) --targets evaluate@laptop

# Tables 2-4 at CPU scale (params.cpu.yaml, issue 21): all 12 variants + 2 more seeds, ~7.5 h on 2 cores.
# In sittings: PART=23 (the regnetz_040 variants and seeds, ~2.8 h), PART=4 (the other encoders, ~4.7 h), then
# without PART (the rest: figure 9 and the report). The workspace cpu/ keeps what is done between sittings.
CPU_PART_23 := $(addprefix evaluate@,regnet_bce regnet_attr_bce regnet_attr_bce_dice regnet_attr_bce_dice_outlier \
	regnet_attr_bce_dice_isolated)
CPU_PART_4 := $(addprefix evaluate@,unet_bce resnet101_bce effb5_bce xception65_bce repvgg_b2_bce effv2m_bce \
	swinv2_base_bce)
cpu-tables: install
	@test -n "$(DATA)" || { echo "usage: make cpu-tables DATA=/path/to/kaggle_3m [PART=23|4]" >&2; exit 2; }
	@case "$(PART)" in ""|23|4) ;; *) echo "make cpu-tables: PART must be 23, 4 or empty, got $(PART)" >&2; exit 2;; esac
	$(BIN)/python -m lggseg.workspace --dest cpu --overrides params.cpu.yaml \
		--set fetch.source=$(abspath $(DATA)) $(if $(PART),--targets $(CPU_PART_$(PART)))

# Tests marked bf16path follow LGGSEG_CPU_BF16 and run under both settings, so the bf16 and the float32
# CPU paths are checked on either CPU type (bf16 is emulated, slower, where the CPU lacks it).
test: install
	$(BIN)/ruff check src stages tests experiments
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not bf16path"
	LGGSEG_CPU_BF16=off $(BIN)/python -m pytest -m bf16path
	LGGSEG_CPU_BF16=native $(BIN)/python -m pytest -m bf16path

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check src stages tests experiments
	$(BIN)/lint-imports

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro -f bench/dvc.yaml:bench

guard:
	$(BIN)/python -m pytest tests/test_repo_hygiene.py

clean-demo:
	rm -rf demo

# Wheels an offline GPU node lacks, for its Python and platform (README, GPU section):
#   make wheelhouse PY=3.12 [PLATFORM=manylinux2014_x86_64] [WHEELS="segmentation-models-pytorch albumentations ..."]
# Only the named distributions, without their dependencies (torch, timm, numpy ... are on the node;
# add a name to WHEELS for anything else it lacks), at the versions of requirements.lock.
# Needs the network; then copy wheelhouse/ to the node and there:
#   pip install --no-index --no-deps wheelhouse/*.whl     (or run from the tree: PYTHONPATH=src python -m lggseg)
PY       ?= 3.12
PLATFORM ?= manylinux2014_x86_64
WHEELS   ?= segmentation-models-pytorch
wheelhouse:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(PY) --platform $(PLATFORM) \
		--implementation cp -c requirements.lock -d wheelhouse $(WHEELS)
	@du -sh wheelhouse && ls wheelhouse

# Before copying the tree to a machine without .git: record its commit (src/lggseg/_commit.txt,
# git-ignored, read by lggseg.runtime.git_commit) and add lggseg's own wheel (which holds it) to wheelhouse/.
# Both are git-ignored: a copy that takes only what git tracks must name them (wheelhouse, the commit file).
BUNDLE_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
bundle:
	@git diff --quiet HEAD || echo "bundle: warning: uncommitted changes; the recorded commit does not hold them" >&2
	git rev-parse HEAD > src/lggseg/_commit.txt
	$(BUNDLE_PY) -m pip wheel --quiet --no-deps --no-build-isolation -w wheelhouse .
	@cat src/lggseg/_commit.txt && ls wheelhouse
