# Quick start targets.  Each installs what is missing first (./install.sh is an idempotent no-op
# when the environment is complete).
PYTHON := .venv/bin/python

.PHONY: install demo test test-fast

install:
	./install.sh

demo: install
	bash classification/demo.sh

test: install
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"
