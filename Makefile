# One command to install and run the demo, one to install and run the tests (each from a fresh clone).
#   make demo    creates .venv, installs synthtune, runs the whole loop on the CPU (embedded Prefect)
#   make test    creates .venv, installs synthtune[dev], runs every CPU test tier: unit, integration (real
#                libraries on tiny models), flows (a Prefect server on SQLite), ops and ui (a Prefect server on
#                PostgreSQL, process workers, Chromium); not soak (make soak), the longest drills (make drills)
#                nor gpu (pytest -m gpu)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Offline by design: tests and the demo build their tiny models locally and never call the Hugging Face Hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-unit soak drills lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# CPU torch first: otherwise pip resolves a multi-GB CUDA build through the other dependencies
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/synthtune run

test: install
	$(VENV)/bin/pytest -m "not gpu and not soak and not drill" -q --durations=25

soak: install
	$(VENV)/bin/pytest -m soak -s -q

drills: install
	$(VENV)/bin/pytest -m drill -q

test-unit: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check src tasks flows tests bench

bench: install
	$(PY) -m bench.demo

clean:
	rm -rf .synthtune $(VENV)
