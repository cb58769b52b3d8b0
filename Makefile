PY ?= python3

.PHONY: install demo test test-gpu bench
install:
	PYTHON=$(PY) bash scripts/install.sh dev

# README command 1: the main job
demo: install
	$(PY) -m mfm_fast demo

# README command 2: the whole CPU suite (reference path + Triton interpreter tier + benchmark smoke tests)
test: install
	$(PY) -m pytest tests benchmarks --benchmark-disable -q -x -p no:cacheprovider

test-gpu: install
	$(PY) -m pytest tests -m gpu -q

bench:
	PYTHON=$(PY) bash scripts/install.sh dev,bench
	$(PY) -m pytest benchmarks --benchmark-only
