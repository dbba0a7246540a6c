# Every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install test test-fast lint format lock data-lock clean bench mlflow-ui pipeline servers stop-servers

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	# A re-install (pyproject changed) finds the data-only wheel below from the last one.
	$(BIN)/python -m pip uninstall --quiet --yes stardist 2>/dev/null || true
	$(BIN)/python -m pip check
	# Data only: `knet data nuclei` reads the micrograph shipped in this wheel and never imports
	# the package, so its dependencies (csbdeep, numba, ...) are not installed (after pip check).
	$(BIN)/python -m pip install --quiet --no-deps stardist==0.9.2
	touch $(STAMP)

# The whole suite, heavy markers included (CI runs exactly this).
test: install
	$(BIN)/python -m pytest

# Skip the slow checks while iterating.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# ruff, and the committed dvc.lock against the data stages' code (CI fails on a stale one).
lint: install
	$(BIN)/ruff check knet pipelines tests benchmarks
	$(BIN)/ruff format --check knet pipelines tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_dvc.py -k committed_lock

# After an edit of the synth or prepare code: rerun those stages so dvc.lock records it (seconds).
data-lock: install
	$(BIN)/dvc repro synth prepare

format: install
	$(BIN)/ruff format knet pipelines tests benchmarks
	$(BIN)/ruff check --fix knet pipelines tests benchmarks

# Re-resolve the pinned set from requirements/top.txt into requirements/constraints.txt.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/python -m pip install --quiet --upgrade pip
	.lockvenv/bin/python -m pip install --quiet -c requirements/top.txt -e '.[dev]'
	{ head -3 requirements/constraints.txt; .lockvenv/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements/constraints.new
	mv requirements/constraints.new requirements/constraints.txt && rm -rf .lockvenv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Speed and memory: K-Net (tiny, R-50) vs Mask R-CNN training and inference, the fast path,
# plain loop vs Ray Train, dvc no-op, the flow's stages -> reports/bench.{json,md} (~16 min on 2
# cores; docs/benchmarks.md). On a CUDA machine with its own torch: benchmarks/gpu_check.sh.
bench: install
	$(BIN)/python -m benchmarks

# The MLflow UI on the embedded store: runs, the ablation sweep (a parent run, one child per
# trial), the model registry with its aliases. http://127.0.0.1:5000
mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
	  --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

# The main command: the train-knet flow end to end on the embedded defaults (ephemeral Prefect
# API, a local Ray instance, sqlite MLflow, synthetic data through DVC): params.yaml's 8 epochs.
# PIPELINE_EPOCHS=N trains N epochs with the LR decay before the last (a quicker look);
# PIPELINE_SET="train.seed=1 ..." adds --set overrides.
PIPELINE_EPOCHS ?=
PIPELINE_SET ?=
pipeline: install
	$(BIN)/python -m pipelines train-knet $(if $(PIPELINE_EPOCHS),--epochs $(PIPELINE_EPOCHS) \
	  --set "optim.lr_steps=[$(shell expr $(PIPELINE_EPOCHS) - 1)]") \
	  $(if $(PIPELINE_SET),--set $(PIPELINE_SET))

# MLflow :5000, Prefect :4200 (work pool + worker), Ray head :8265 on 127.0.0.1; deploys the flows.
servers: install
	infra/local/servers.sh

stop-servers:
	infra/local/stop.sh
