# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow synthetic bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Pretrains the small CLIP on the synthetic shapes on CPU and prints its zero-shot results.
demo: $(STAMP)
	$(BIN)/vlp-train hydra.run.dir=runs/demo

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/pytest -q

test-slow: $(STAMP)
	WANDB_MODE=offline $(BIN)/pytest -q -m slow

synthetic: $(STAMP)
	$(BIN)/vlp-synthetic --out data/synthetic

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf runs outputs multirun data/synthetic
