# The two commands a newcomer needs: `make test` and `make demo`.
# Both create .venv when missing, install the pinned CPU torch first (any other torch spec
# pulls a multi-GB CUDA build), then the package with its dev extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autocompress-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test-min`: the lowest versions pyproject.toml allows (constraints-min.txt), in their own
# venv on the oldest supported Python; torch from PyTorch's CPU index (a CPU build at that pin).
PYTHON_MIN ?= python3.10
VENV_MIN ?= .venv-min
TORCH_MIN_INDEX ?= https://download.pytorch.org/whl/cpu
MIN_TESTS ?= tests/test_min_versions.py tests/test_models.py tests/test_evaluate.py tests/test_bos_windows.py \
	tests/test_profile.py tests/test_search.py tests/test_apply_save.py tests/test_gguf_legacy.py tests/test_report.py

.PHONY: test test-min demo install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-min:
	test -x $(VENV_MIN)/bin/python || $(PYTHON_MIN) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet --index-url $(TORCH_MIN_INDEX) \
		"$$(grep '^torch==' constraints-min.txt)"
	$(VENV_MIN)/bin/python -m pip install --quiet -c constraints-min.txt -e ".[dev]"
	$(VENV_MIN)/bin/python -m pytest -m "not real" $(MIN_TESTS)

demo: $(STAMP)
	$(VENV)/bin/autocompress demo

clean-venv:
	rm -rf $(VENV) $(VENV_MIN)
