# Two entry points (see README): `make demo` runs the main job, `make test` the whole suite.
# Both create .venv on first use and install the pinned versions from constraints.txt.
# `make kernels` pre-builds the native CPU kernels (otherwise built on first use).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint kernels

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[examples,test]'
	touch $@

demo: $(STAMP)
	$(PY) examples/quickstart.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

kernels: $(STAMP)
	$(PY) -m bame_optim.kernels.build

# A native kernel that cannot be built fails the suite instead of skipping its tests.
test: lint
	BAME_OPTIM_REQUIRE_NATIVE=1 $(PY) -m pytest -n 2 $(ARGS)
