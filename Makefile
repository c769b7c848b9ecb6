# fluxlab: `make demo` (the main job on the tiny pipeline, CPU) and `make test` (the whole suite).
# Both set up a fresh machine on their own: .venv, torch (if none is importable), fluxlab[dev].
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Offline by design: nothing is fetched from a model hub. Triton runs interpreted on CPU-only machines.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),)
export TRITON_INTERPRET := 1
endif

.PHONY: setup demo test test-unit test-kernels test-notebooks test-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m fluxlab doctor
	$(PY) -m fluxlab tiny build runs/demo/tiny --seed 0
	$(PY) -m fluxlab data sample data/sample/images
	$(PY) -m fluxlab data shapes data/shapes --n 64 --seed 0
	$(PY) -m fluxlab data validate data/sample/images
	$(PY) -m fluxlab data validate data/shapes
	$(PY) -m fluxlab generate --model runs/demo/tiny --prompt "a large red circle at the center" --out runs/demo/generated.png
	$(PY) -m fluxlab results import benchmarks/results/
	$(PY) -m fluxlab notebook run-all --preset ci

test: setup test-unit test-kernels test-notebooks

test-unit: setup
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

test-kernels: setup
	$(PY) -m pytest tests/kernels -q -p no:cacheprovider

test-notebooks: setup
	@if [ -d tests/notebooks ] && ls tests/notebooks/test_*.py >/dev/null 2>&1; then \
		$(PY) -m pytest tests/notebooks tests/browser -v -rs -p no:cacheprovider; \
	else echo "no notebook tests yet"; fi

# The GPU suite (compiled Triton kernels, cuDNN/flash attention; on an H100/H200) and its store record
# tests/gpu in $(GPU_OUT)/records.jsonl. No venv is made: on a machine with torch already installed run
# `make test-gpu PY=python3`; on a copy without .git add FLUXLAB_GIT_COMMIT=<sha> FLUXLAB_GIT_DIRTY=0.
GPU_OUT ?= results/gpu
test-gpu:
	$(PY) -m benchmarks.gpu_tests --out $(GPU_OUT)

clean:
	rm -rf runs results .pytest_cache
