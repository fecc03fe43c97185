# leanscale: the README's two commands are `make tour` and `make test`.
# Everything they need is installed here; nothing by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Every install goes through the constraints file: torch stays the CPU build (2.13.0).
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt

# Debian packages with the open data sets used by the tour, the tests and the benchmarks.
DATA_PACKAGES := dataset-fashion-mnist wordnet-base dict-gcide
DATA_MARKERS  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
                 /usr/share/wordnet/data.noun /usr/share/dictd/gcide.dict.dz

.PHONY: tour test bench data install install-dev clean help readme

help:
	@echo "make tour   - install everything and run the leanscale tour on built-in data"
	@echo "make test   - install the dev environment and run the whole test suite"
	@echo "make bench  - run the benchmarks (long; writes benchmarks/results/)"

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip
	@touch $@

$(VENV)/.tour: $(VENV)/.base pyproject.toml constraints.txt
	$(PIP_INSTALL) -e '.[tour]'
	@touch $@

$(VENV)/.dev: $(VENV)/.tour
	$(PIP_INSTALL) -e '.[dev,ray]'
	@touch $@

install: $(VENV)/.tour
install-dev: $(VENV)/.dev

# Install the open data sets when missing: apt-get when it is there, otherwise say how.
data:
	@missing=0; for f in $(DATA_MARKERS); do [ -e $$f ] || missing=1; done; \
	if [ $$missing -eq 0 ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
		echo "installing data sets: $(DATA_PACKAGES)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DATA_PACKAGES) >/dev/null; \
	else \
		echo "leanscale: the open data sets are missing and apt-get is not available."; \
		echo "Install the Debian packages $(DATA_PACKAGES), or pass your own copies with --data-root."; \
	fi

tour: install data
	$(VENV)/bin/leanscale tour

test: install-dev data
	@# two workers for the 2-core CI machine, whole files each (module fixtures built once); tests/conftest.py
	@# gives each worker one torch thread
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

bench: install-dev data
	$(PY) benchmarks/run_all.py

# Refresh the technique table of README.md from the registry and the committed benchmark results.
readme: install
	$(PY) -c "import re, pathlib; from leanscale.core.registry import markdown_table; \
	p = pathlib.Path('README.md'); s = p.read_text(); \
	p.write_text(re.sub(r'(<!-- techniques:start -->\n).*?(\n?<!-- techniques:end -->)', \
	lambda m: m.group(1) + markdown_table() + '\n' + m.group(2).lstrip('\n'), s, flags=re.S))"

clean:
	rm -rf $(VENV) tour-report .pytest_cache
