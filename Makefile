# Two entry points (see README): `make pipeline` and `make test`. Both are idempotent.
VENV ?= .venv
# dvc in its own venv: its antlr4 pin breaks Dagster's string asset selections in .venv.
DVC_VENV ?= .venv-dvc
PY := $(VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install pipeline test dvc

install: $(VENV)/.installed $(DVC_VENV)/.installed

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

dvc: $(DVC_VENV)/.installed

# Installs once (a stamp file); dvc is called as a CLI (resources/dvc.py), never imported.
$(DVC_VENV)/.installed:
	python3 -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q 'dvc>=3.50,<4'
	touch $@

pipeline: install
	$(PY) -m dagster_project.run

test: install
	$(PY) -m pytest -q
