PY ?= python3

.PHONY: install install-core demo test test-gpu bench check-triton
# everything the tests use, the image reward libraries included
install:
	PYTHON=$(PY) bash scripts/install.sh dev,rewards

# the demo needs no reward libraries
install-core:
	PYTHON=$(PY) bash scripts/install.sh dev

# README command 1: the main job; then its model goes to outputs/gmm_mfm.pt, which README's first example loads
demo: install-core
	$(PY) -m mfm_fast demo
	$(PY) scripts/export_demo_model.py outputs/gmm_mfm.pt

# README command 2: the whole CPU suite (reference path + Triton interpreter tier + benchmark smoke tests)
test: install
	$(PY) -m pytest tests benchmarks --benchmark-disable -q -x -p no:cacheprovider

test-gpu: install
	$(PY) -m pytest tests -m gpu -q

bench:
	PYTHON=$(PY) bash scripts/install.sh dev,rewards,bench
	$(PY) -m pytest benchmarks --benchmark-only

# the no-GPU kernel checks (interpreter tier + sm_90 compile) against another triton, default the GPU image's 3.6.0
check-triton: install
	PYTHON=$(PY) bash scripts/check_triton.sh $(TRITON)
