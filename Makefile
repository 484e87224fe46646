# Two commands a new user needs (see README.md):
#   make demo   set everything up, then run the quick demo federation on MovieLens-100K
#   make test   set everything up, then run the whole test suite (offline)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint benchmark clean

$(BIN)/fedrec-simulate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: a range would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/fedrec-simulate

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/fedrec-simulate --config simulations/configs/demo.toml --overwrite

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 3 --maxschedchunk 1

benchmark: setup
	HF_HUB_OFFLINE=1 $(BIN)/fedrec-benchmark

clean:
	rm -rf outputs .pytest_cache .ruff_cache
