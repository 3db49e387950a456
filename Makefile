# The two commands of the README. Each one sets up .venv on first use (scripts/setup.sh, idempotent).
#   make edit            the main job: python edit.py (MEMIT on SmolLM2 over the built-in requests)
#   make test            the whole test suite (fast + slow), as CI runs it
# Pass arguments with ARGS, e.g.  make edit ARGS="method=rome data.num_edits=10"
SHELL := /bin/bash
PY := .venv/bin/python
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup edit train test test-fast bench clean

setup:
	@bash scripts/setup.sh

edit: setup
	$(PY) edit.py $(ARGS)

train: setup
	$(PY) train.py $(ARGS)

test: setup
	WANDB_MODE=offline $(PY) -m pytest -q $(ARGS)

test-fast: setup
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf outputs wandb .pytest_cache
