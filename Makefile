# The two commands of the README. Both install the package first: `make demo` with the demo's
# extra (scikit-learn's bundled digits), `make test` with every extra the tests use.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check -e

.PHONY: install demo test bench wheels gpu-check

install:
	$(PIP_INSTALL) '.[dev]'

# Bundled dataset -> shards -> torchrun (tp=2) training -> evaluation -> MLflow run.
demo:
	$(PIP_INSTALL) '.[demo]'
	PYTHON=$(PYTHON) bash launch/demo.sh

# The whole test suite on CPU (gloo); starts its own MLflow server and SLURM cluster where needed.
test: install
	$(PYTHON) -m pytest -ra --durations=15

bench: install
	$(PYTHON) bench/bench.py --tiny

# Wheels for the GPU check's machine (no network there): run here, where pip reaches PyPI.
wheels:
	PYTHON=$(PYTHON) bash bench/make_wheelhouse.sh

# On a GPU machine with torch and torchvision (and .whl/ from `make wheels`): CUDA tests + benchmark.
OUT ?= gpu-check
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh $(OUT)
