# Two commands for a newcomer: `make demo` and `make test`. Everything else is below.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
DEMO_SEED ?= 0
IMAGE ?= maskrcnn-sagemaker:latest
BASE_IMAGE ?= maskrcnn-base:bookworm
PRETRAINED_WEIGHTS ?=
DOCKER_BUILD_ARGS ?=
AWS_REGION ?=

.PHONY: setup demo test test-unit test-integration test-container test-gpu lint bench clean \
	base-image build push pipeline-tools test-pipeline bench-serving bench-local sdk-venv sdk3-venv

setup: $(STAMP)  ## create .venv with every pinned dependency

$(STAMP): images/maskrcnn/requirements.txt requirements-dev.txt constraints.txt images/maskrcnn/pyproject.toml pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	$(PIP) install -q -c constraints.txt --no-deps -e images/maskrcnn -e .
	touch $(STAMP)

demo: setup  ## the main job: synthetic data -> train -> model.tar.gz -> endpoint -> predictions
	$(PY) -m local demo --out $(DEMO_OUT) --image $(IMAGE) --seed $(DEMO_SEED)

test: setup  ## every test layer this machine can run (skipped layers say why)
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m unit

test-integration: setup
	$(PY) -m pytest -m integration

test-container: setup  ## builds the image incrementally, then the container tests
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) $(PY) -m pytest -m container

test-pipeline: setup  ## the pipeline area (tests/pipeline), every layer; the other test-* targets are layers (-m)
	$(PY) -m pytest tests/pipeline

test-gpu: setup
	$(PY) -m pytest -m gpu

lint: setup  ## ruff (check, format --check), mypy on the package, the harness, the pipeline and the benchmarks, hadolint on the Dockerfile
	$(VENV)/bin/ruff check images local pipeline tests bench
	$(VENV)/bin/ruff format --check images local pipeline tests bench
	$(VENV)/bin/mypy images/maskrcnn/src/maskrcnn local pipeline bench
	if [ -f images/maskrcnn/Dockerfile ]; then $(VENV)/bin/hadolint images/maskrcnn/Dockerfile; fi

bench: setup  ## training benchmarks (minutes; see docs/benchmarks.md)
	$(PY) bench/bench_train_loop.py
	$(PY) bench/bench_coco_eval.py
	$(PY) bench/bench_roi_align.py
	$(PY) bench/bench_convergence.py
	$(PY) bench/bench_exit.py

bench-serving: setup  ## full stack vs bare predictor, response size, cold start (docs/serving.md)
	$(PY) bench/bench_serving.py && $(PY) bench/bench_response.py && $(PY) bench/bench_cold_start.py

bench-local: setup  ## harness overhead and inner-loop time (docs/local.md)
	$(PY) bench/bench_local.py

base-image:  ## offline Debian 12 base image from Debian packages (no image registry needed)
	BASE_TAG=$(BASE_IMAGE) scripts/build-base-image.sh

build: setup $(if $(filter maskrcnn-base:%,$(BASE_IMAGE)),base-image)  ## BASE_IMAGE=..., PRETRAINED_WEIGHTS=...
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) PRETRAINED_WEIGHTS=$(PRETRAINED_WEIGHTS) \
	    DOCKER_BUILD_ARGS="$(DOCKER_BUILD_ARGS)" scripts/build-image.sh

push:  ## tag with the git sha and push to ECR (aws ecr get-login-password); not run in CI
	IMAGE=$(IMAGE) AWS_REGION=$(AWS_REGION) scripts/push-image.sh

pipeline-tools:  ## asl-validator (npm, pinned in pipeline/package-lock.json) and checkov (own venv: its pins clash)
	npm ci --prefix pipeline --no-audit --no-fund
	test -x .venv-checkov/bin/checkov || ($(PYTHON) -m venv .venv-checkov && .venv-checkov/bin/pip install -q checkov==3.3.30)

sdk-venv:  ## the SageMaker Python SDK v2 in its own venv (.venv-sdk), for the real-client container test
	test -x .venv-sdk/bin/python || ($(PYTHON) -m venv .venv-sdk && .venv-sdk/bin/pip install -q "sagemaker==2.257.7")

sdk3-venv:  ## the SageMaker Python SDK v3 in its own venv (.venv-sdk3), for the real-client container test
	test -x .venv-sdk3/bin/python || ($(PYTHON) -m venv .venv-sdk3 && .venv-sdk3/bin/pip install -q "sagemaker==3.27.0")

clean:
	rm -rf $(DEMO_OUT) build .pytest_cache .mypy_cache .ruff_cache
