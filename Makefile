# Two commands do all the set-up (see README.md):
#   make report   build .venv and run the main job
#   make test     build .venv with the test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2

.PHONY: report test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to 2.13.0 (the CPU wheel); an unpinned torch would pull the CUDA build.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[torch,test]'
	touch $@ $(VENV)/.core

report: $(VENV)/.core
	$(BIN)/gradcheck report --out reports/

test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
