# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/digits.yaml

.PHONY: demo test venv bench clean-demo

venv: $(STAMP)

# The registry's torch build (not the local +cpu wheel: torchvision, and so torch-fidelity, do not
# load with it). Three '=' pin the exact version so pip skips the +cpu local build. DeepSpeed builds
# from source against that torch, so it goes in without build isolation (which would fetch another torch).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "torch===2.13.0" "torchvision==0.28.0"
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scorefuse run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/data.py

clean-demo:
	rm -rf runs/digits
