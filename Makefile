# Two commands for a newcomer (README): `make demo` and `make test`.
# Both set everything up first and are idempotent.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.fairbus-installed

.PHONY: demo test setup system-deps lint bench-crypto clean

demo: setup
	$(VENV)/bin/fairbus demo

test: setup
	$(PY) -m pytest
	$(MAKE) --no-print-directory lint

setup: $(STAMP) system-deps

# torch goes in first and pinned: the CPU wheel on this machine kind. Installing the
# package after it leaves torch alone (2.13.0 satisfies our range), so pip never
# resolves a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

system-deps:
	@sh scripts/install-system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check fairbus cli broker ledger tests
	$(VENV)/bin/ruff format --check fairbus cli broker ledger tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench-crypto: setup
	$(VENV)/bin/fairbus bench crypto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache fairbus.egg-info
