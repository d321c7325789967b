# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both install what they need; nothing here needs internet beyond the package registries.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup data demo lint test test-slow test-all ci bench

setup:
	$(PIP) install -q -e '.[dev]'

data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

demo: setup data
	dacnn demo --out runs/demo

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test: setup data
	$(PYTHON) -m pytest

test-slow: setup data
	$(PYTHON) -m pytest -m slow

test-all: setup data
	$(PYTHON) -m pytest -m ''

# what .ci/run does: the README's test command, then the linters and the slow tier
ci: test lint test-slow

bench: setup
	$(PYTHON) benchmarks/convert_speed.py
