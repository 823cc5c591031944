# Two entry points: `make demo` (the main job: CPU pretraining on the embedded corpus)
# and `make test`. Both create/reuse .venv and install torch==2.13.0 (CPU) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint install bench smf-report clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt requirements/cpu-constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip list 2>/dev/null | grep -q '^torch *2.13.0+cpu' || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -r requirements/cpu.txt -c requirements/cpu-constraints.txt
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@$(PY) -m pip list 2>/dev/null | grep -q '^torch *2.13.0+cpu' || { echo "expected torch 2.13.0+cpu in $(VENV)"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pretrain.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) tools/bench_train.py

smf-report: $(STAMP)
	$(PY) tools/smf_report.py $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
