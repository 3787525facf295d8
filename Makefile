# The two commands of the README (demo, test) and the contributor's others (docs/testing.md).
# Those that run distalex install it first: `make demo` with the demo's extra (scikit-learn's
# bundled digits), the test targets with every extra the tests use.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check -e

.PHONY: install demo test test-quick layouts bench wheels gpu-check

install:
	$(PIP_INSTALL) '.[dev]'

# Bundled dataset -> shards -> torchrun (tp=2) training -> evaluation -> MLflow run.
demo:
	$(PIP_INSTALL) '.[demo]'
	PYTHON=$(PYTHON) bash launch/demo.sh

# The whole test suite on CPU (gloo); starts its own MLflow server and SLURM cluster where needed.
test: install
	$(PYTHON) -m pytest -ra --durations=15

# The quick tier: unit, parity and data tests, no training job, no SLURM (a few minutes on 2 cores).
test-quick: install
	$(PYTHON) -m pytest -m quick -ra --durations=10

# docs/layouts.png from the tables of docs/parallelism.md (tests/test_docs.py says when it is stale).
layouts:
	$(PYTHON) docs/draw_layouts.py

bench: install
	$(PYTHON) bench/bench.py --tiny

# Wheels for the GPU check's machine (no network there): run here, where pip reaches PyPI.
wheels:
	PYTHON=$(PYTHON) bash bench/make_wheelhouse.sh

# On a GPU machine with torch and torchvision (and .whl/ from `make wheels`): CUDA tests + benchmark.
OUT ?= gpu-check
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh $(OUT)
