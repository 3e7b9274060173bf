# hftlab: `make demo` runs the main job on the organism, `make test` runs the tests.
# Each target creates .venv itself (the CPU build of torch first, then the pinned package).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test test-slow bench install clean

$(BIN)/hftlab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

install: $(BIN)/hftlab

demo: install
	$(BIN)/hftlab run

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs
