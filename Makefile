# Quick start:  make demo   |   make test
# Sets up .venv with torch + torchvision from the package index (the CPU-only torch wheel that
# some machines offer through pip's find-links cannot import the index's torchvision), then the
# package in editable mode.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# open3d (the point-cloud readers) cannot be imported without the system library libusb-1.0, and
# MuJoCo (multijepa record) renders headless through EGL (libegl1, Mesa's libgl1-mesa-dri): install
# them with apt (Debian/Ubuntu) when ldconfig does not know them.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "multijepa needs Python >= 3.10"; exit 1; }
	(ldconfig -p 2>/dev/null || /sbin/ldconfig -p) | grep -q libusb-1.0 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y libusb-1.0-0; }
	(ldconfig -p 2>/dev/null || /sbin/ldconfig -p) | grep -q libEGL.so.1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y libegl1 libgl1-mesa-dri; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install --quiet --upgrade pip
	PIP_FIND_LINKS= $(PY) -m pip install --quiet torch torchvision
	PIP_FIND_LINKS= $(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multijepa demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo runs
