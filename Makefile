# Quick start:  make demo   |   make test
# Sets up .venv with torch + torchvision from the package index (the CPU-only torch wheel that
# some machines offer through pip's find-links cannot import the index's torchvision), then the
# package in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "multijepa needs Python >= 3.10"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install --quiet --upgrade pip
	PIP_FIND_LINKS= $(PY) -m pip install --quiet torch torchvision
	PIP_FIND_LINKS= $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multijepa demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo runs
