# Two commands on a fresh clone: `make train` and `make test`; each installs what it needs first.
#
# `make install` creates the project's virtual environment .venv with BASE_PYTHON (any Python >= 3.10; a
# distribution Python marked externally managed, PEP 668, is fine: nothing is installed into it) and installs the
# project with its test extras there, constrained to the exact versions CI uses (requirements/ci.txt).
# PYTHON=<interpreter> uses that interpreter's environment instead of .venv (`make test PYTHON=python3`);
# LOCK= (empty) installs from pyproject.toml's ranges alone.
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
LOCK ?= requirements/ci.txt
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

# one stamp per interpreter, so switching PYTHON= installs into the new environment
STAMP := .install-$(subst /,_,$(subst .,_,$(PYTHON))).stamp

.PHONY: install train test test-fast bench clean distclean

install: $(STAMP)

$(VENV)/bin/python:
	$(BASE_PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) -m pip install --disable-pip-version-check -q $(if $(LOCK),-c $(LOCK)) -e ".[test]"
	@touch $@

train: install
	$(PYTHON) train.py $(ARGS)

# Headless chromium for the report's browser tests (tests/test_report_browser.py): Debian's packages, installed
# once when missing (as root, or through sudo).
.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { SUDO=$$(command -v sudo || true); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

# Two pytest workers on the 2 cores; each worker keeps torch to one thread (tests/conftest.py). The 20 slowest
# tests are listed at the end, so every CI log is a profile of the suite.
test: install browser
	$(PYTHON) -m pytest -n 2 --dist loadgroup --durations=20 $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -n 2 --dist loadgroup -m "not slow and not ddp" $(PYTEST_ARGS)

# Every benchmarks/bench_*.py in its own process, then one table (benchmarks/run_all.py); BENCH_ARGS=--quick for
# small sizes without the benchmarks that train models. The public implementations timed side by side come with the
# `bench` extra: $(PYTHON) -m pip install -c $(LOCK) -e ".[bench]"
bench: install
	$(PYTHON) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .install*.stamp

# `make clean` keeps .venv; `make distclean` removes it too
distclean: clean
	rm -rf $(VENV)
