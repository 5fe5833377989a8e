# The two commands a newcomer needs: `make test` and `make demo`.
# Both create .venv when missing, install the pinned CPU torch first (any other torch spec
# pulls a multi-GB CUDA build), then the package with its dev extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autocompress-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test demo install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/autocompress demo

clean-venv:
	rm -rf $(VENV)
