# Two commands on a fresh clone: `make train` and `make test`; each installs what it needs first.
PYTHON ?= python3
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-fast bench clean

install: .install.stamp

.install.stamp: pyproject.toml
	$(PYTHON) -m pip install --disable-pip-version-check -q -e ".[test]"
	@touch .install.stamp

train: install
	$(PYTHON) train.py $(ARGS)

# Headless chromium for the report's browser tests (tests/test_report_browser.py): Debian's packages, installed
# once when missing (as root, or through sudo).
.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { SUDO=$$(command -v sudo || true); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

# Two pytest workers on the 2 cores; each worker keeps torch to one thread (tests/conftest.py).
test: install browser
	$(PYTHON) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -n 2 --dist loadgroup -m "not slow and not ddp" $(PYTEST_ARGS)

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PYTHON) $$f || exit 1; done

clean:
	rm -rf outputs multirun .pytest_cache .install.stamp
