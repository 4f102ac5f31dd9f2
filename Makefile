# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/digits.yaml

.PHONY: demo test test-fast venv datasets bench sweep gpu-check clean-demo

venv: $(STAMP) datasets

# Fashion-MNIST from the distribution's archive (configs/fashion_mnist.yaml and the tests on the real files).
# Skipped where it is installed or there is no apt-get; where apt-get cannot install it (not root, no
# archive) a note says so and the tests that need it skip.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
datasets:
	@test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
	    echo "note: apt-get could not install dataset-fashion-mnist; the tests on the real files skip"

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

demo: venv
	$(BIN)/scorefuse run --config $(CONFIG)

# Two pytest-xdist workers (the two cores of the machines CI and this project's budget are measured on): each
# test and each process it starts runs torch on one thread; tests/conftest.py orders and groups the work.
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The quick local loop: the suite without the tests marked slow, resume, multiprocess or slurm.
test-fast: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not resume and not multiprocess and not slurm"

# ScoreFusion's experiment on the digits: every method at the target sizes of sweep.sizes (after `make demo`,
# whose auxiliaries it reuses; it trains them first otherwise).
sweep: venv
	$(BIN)/scorefuse run --config $(CONFIG) stages=prepare,train-aux
	$(BIN)/scorefuse sweep --config $(CONFIG)

# On a GPU node: the prepared check of every CUDA path (about 5 minutes on one H200, 9 at most), rows in gpu_check.md as they finish.
gpu-check: venv
	$(BIN)/python bench/gpu_check.py --out gpu_check.md

bench: venv
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/likelihood.py

clean-demo:
	rm -rf runs/digits
