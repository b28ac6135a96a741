# Two entry points (see README): `make demo` runs the main job, `make test` the whole suite.
# Both create .venv on first use and install the pinned versions from constraints.txt.
# `make kernels` pre-builds the native CPU kernels (otherwise built on first use).
# `make device-wheels` fetches what a bare GPU machine lacks for tools/device_check.sh.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint kernels device-wheels

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

# What a bare GPU machine lacks for tools/device_check.sh (wheels for its Python, pinned here).
DEVICE_WHEELS := setuptools datasets dill multiprocess
DEVICE_PYTHON ?= 3.12
device-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -c constraints.txt \
		--python-version $(DEVICE_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .device/wheels $(DEVICE_WHEELS)

# A native kernel that cannot be built fails the suite instead of skipping its tests.
test: lint
	BAME_OPTIM_REQUIRE_NATIVE=1 $(PY) -m pytest -n 2 $(ARGS)
