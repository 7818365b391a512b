# Set-up and everyday targets. Everything installs into .venv from this repository's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := data
DEMO_OUT := output
DEMO_MODELS := models

.PHONY: venv demo test test-timing test-all bench bench-preprocess bench-train fuzz sagemaker-source clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-mlflow.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The main job on embedded demo data: synthetic images -> pickles -> trained model + predictions.
demo: venv
	$(PY) -m dss.demo $(DEMO_DIR)
	$(PY) preprocess.py --input $(DEMO_DIR) --output-dir $(DEMO_OUT) --image-size 64
	$(PY) dss_train.py --data-dir $(DEMO_OUT) --model-dir $(DEMO_MODELS) --weights none --epochs 8

test: venv
	$(PY) -m pytest -q

# Everything make test runs, plus the soaks and per-arch matrices marked slow (about 5 more minutes on 2 cores).
test-all: venv
	$(PY) -m pytest -q -m ''

# Probes that measure CPU time, run on a quiet machine (other processes can upset them, so make test skips them).
test-timing: venv
	DSS_TIMING_TESTS=1 $(PY) -m pytest -q tests/test_threads.py

bench: bench-preprocess bench-train

bench-preprocess: venv
	$(PY) bench/preprocess.py

bench-train: venv
	$(PY) bench/train.py

# Long mutation fuzz of the pickle loader, CSV readers and image decoder (tests/robustness runs a short one).
FUZZ_CASES ?= 20000
fuzz: venv
	$(PY) bench/fuzz.py --cases $(FUZZ_CASES)

# A lean SageMaker source_dir: the two scripts, the package and requirements; never .venv or data.
# WITH_MLFLOW=1 adds mlflow and the sagemaker-mlflow plugin (SageMaker managed MLflow) to its requirements.
sagemaker-source:
	rm -rf build/sagemaker-source
	mkdir -p build/sagemaker-source
	cp preprocess.py dss_train.py requirements.txt build/sagemaker-source/
	cp -r dss build/sagemaker-source/dss
ifdef WITH_MLFLOW
	grep -v '^#' requirements-mlflow.txt >> build/sagemaker-source/requirements.txt
	echo 'sagemaker-mlflow' >> build/sagemaker-source/requirements.txt
endif
	find build/sagemaker-source -name '__pycache__' -prune -exec rm -rf {} +
	@echo "source_dir ready: build/sagemaker-source"

clean:
	rm -rf $(DEMO_DIR) $(DEMO_OUT) $(DEMO_MODELS) build .pytest_cache
