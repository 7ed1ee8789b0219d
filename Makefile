# The README's commands. Each target sets itself up: a venv in .venv (created if missing), the pinned
# requirements, and the package (editable; the C++/CUDA extension is built when a toolkit is found).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffaug-setup
PYTEST_ARGS ?=

.PHONY: setup test demo demo-denoiser bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# pytest exits 5 when it collects nothing: that is not a failure of the code, every other code is.
test: setup
	@$(BIN)/python -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

# The effect study on the demo's synthetic shapes: a baseline and a DiffAug ResNet-18, each plain and with DiffAug
# Ensemble, on clean val and corrupted val (runs/study-demo: table.md, study.png, views.png).
demo: setup
	$(BIN)/python -m diffaug_fast.study --demo

# Retrain the shipped demo denoiser (diffaug_fast/assets/demo_denoiser.*) with its recorded command and compare
# it bit for bit; DEMO_DENOISER_ARGS=--install writes the result into the package.
DEMO_DENOISER_ARGS ?=
demo-denoiser: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m diffaug_fast.demo_denoiser $(DEMO_DENOISER_ARGS)

bench: setup
	$(BIN)/python -m pytest bench/ --benchmark-only

# The suite's GPU cases and the GPU benchmarks, then one summary block (compass figures beside their goals).
# Exit 0: all ran, tests passed; 1: a test or step failed. Without a CUDA GPU: one line, exit 0.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

lint: setup
	$(BIN)/ruff check diffaug_fast tests bench train

clean:
	rm -rf build *.egg-info demo_out .pytest_cache .benchmarks gpu_check_out
