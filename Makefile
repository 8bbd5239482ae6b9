# Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format clean demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	# Headless Chromium for the Serve web page's browser test (Debian packages; the test skips without them).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver) || \
		echo "chromium could not be installed: the Serve page's browser test will be skipped"
	# torch and torchvision must come from one build; fail here, not in a test, if they do not.
	$(PY) -c "import torch, torchvision, timm, transformers; torchvision.ops.nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The main job on the built-in default: synthetic data -> Ray Data Parquet -> Ray Train (2 workers) ->
# evaluation -> MLflow registry -> Ray Serve and one query over HTTP, with a summary at the end (jobs/demo.py).
# A second run reuses the data and the finished training run.
demo: $(STAMP)
	$(PY) -m jobs.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
