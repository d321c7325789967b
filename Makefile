# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both install what they need; nothing here needs internet beyond the package registries.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup data demo test test-all bench

setup:
	$(PIP) install -q -e '.[dev]'

data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

demo: setup data
	dacnn demo --out runs/demo

test: setup data
	$(PYTHON) -m pytest

test-all: setup data
	$(PYTHON) -m pytest -m ''

bench: setup
	$(PYTHON) benchmarks/convert_speed.py
