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
# evaluation, all tracked in MLflow (mlflow.db). Re-running reuses the data and resumes the finished run.
DEMO_DATA := data/processed/synthetic_unc_256

demo: $(STAMP) $(DEMO_DATA)/manifest.json
	$(PY) -m jobs.train --config configs/synthetic.yaml data.path=$(DEMO_DATA)
	$(PY) -m jobs.evaluate --model runs/vglaw-synthetic/model --data $(DEMO_DATA) --splits val,testA,testB \
		--out runs/vglaw-synthetic/evaluation.json
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

$(DEMO_DATA)/manifest.json: $(STAMP)
	$(PY) -m jobs.preprocess --out $(DEMO_DATA) --image-size 256

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
