# Two entry points (see README): `make pipeline` and `make test`. Both are idempotent.
VENV ?= .venv
# dvc in its own venv: its antlr4 pin breaks Dagster's string asset selections in .venv.
DVC_VENV ?= .venv-dvc
PIP_VERSION := 26.3
PY := $(VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# datasets draws its progress bars as one long line in a log
export HF_DATASETS_DISABLE_PROGRESS_BARS := 1

.PHONY: install pipeline test dvc lock

install: $(VENV)/.installed $(DVC_VENV)/.installed

# The exact versions of requirements.lock, hash-checked (`make lock` regenerates it from
# pyproject.toml); the project itself goes in editable, with no dependency resolution of its own.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(VENV)/bin/pip install -q --require-hashes -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

dvc: $(DVC_VENV)/.installed

# Installs once (a stamp file); dvc is called as a CLI (resources/dvc.py), never imported.
$(DVC_VENV)/.installed: requirements-dvc.lock
	python3 -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(DVC_VENV)/bin/pip install -q --require-hashes -r requirements-dvc.lock
	touch $@

# Re-resolve the locks (needs the package index); commit the result.
LOCK_VENV ?= .venv-lock
lock:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q pip-tools==7.6.2
	$(LOCK_VENV)/bin/pip-compile -q --allow-unsafe --extra=dev --generate-hashes --no-emit-index-url --no-emit-find-links --strip-extras -o requirements.lock pyproject.toml
	$(LOCK_VENV)/bin/pip-compile -q --allow-unsafe --generate-hashes --no-emit-index-url --no-emit-find-links -o requirements-dvc.lock requirements-dvc.in

# The run CLI first rewrites dvc.yaml from the asset graph and the taxonomy files (a new version
# gets its stages), then materializes what is stale.
pipeline: install
	$(PY) -m dagster_project.run

test: install
	$(PY) -m pytest -q
