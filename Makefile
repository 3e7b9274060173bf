# hftlab: `make demo` runs the main job on the organism, `make test` runs the tests.
# Each target creates .venv itself (the CPU build of torch first, then the pinned package).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# PyTorch's CPU wheels by default: a plain `pip install torch` on Linux pulls the CUDA build (several GB,
# of no use without a GPU). Only torch itself comes from this index; its dependencies and every other
# package come from the default one. Where it cannot be reached (an offline mirror, CI), torch comes from
# the default index too. On a GPU machine: make install TORCH_INDEX=  (or your CUDA version's index).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-slow bench install clean

$(BIN)/hftlab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q --no-deps --retries 0 --timeout 20 --index-url $(TORCH_INDEX) $(TORCH) \
	  || echo "make: $(TORCH_INDEX) unreachable; torch from the default index")
	$(BIN)/pip install -q $(TORCH)
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
