# sbp-mmdet: set up, demo, tests. Everything runs from the virtual environment .venv.
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Written last by `make env`; newer requirements.txt or setup.cfg make it stale.
ENV_STAMP := $(VENV)/.sbp-mmdet-env

.PHONY: env demo test lint benchmark-gpu

env: $(ENV_STAMP)

# mmcv's compiled ops build against the torch of this environment, hence two passes
# (see requirements.txt) and no build isolation. pip caches the built mmcv wheel
# (~/.cache/pip), so only the first build on a machine takes ~10 minutes.
$(ENV_STAMP): requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -c requirements.txt torch setuptools wheel ninja numpy opencv-python
	MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install --no-build-isolation -r requirements.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

demo: env
	PYTHON=$(PY) bash tools/demo.sh

test: env
	$(PY) -m pytest tests -q

# flake8 and isort as configured in setup.cfg; a few seconds.
lint: env
	$(PY) -m flake8 configs sbp_mmdet tests tools
	$(PY) -m isort --check-only --diff configs sbp_mmdet tests tools

# On a CUDA machine: memory and step time, fp32 and AMP, Faster R-CNN and RetinaNet R50-FPN.
benchmark-gpu: env
	PYTHON=$(PY) bash tools/benchmark_gpu.sh
