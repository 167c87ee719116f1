# Quick start targets.  Each installs what is missing first (./install.sh is an idempotent no-op
# when the environment is complete).
PYTHON := .venv/bin/python

.PHONY: install demo test test-slow test-all explore

install:
	./install.sh

demo: install
	bash classification/demo.sh

# the everyday loop: every test except the end-to-end runs (launchers, training, predict, export),
# on two processes (pytest-xdist)
test: install
	$(PYTHON) -m pytest -m "not slow" -n 2

# the end-to-end runs alone, on two processes too: most of their time is subprocesses starting
# (imports, torchrun), which the other process overlaps; a file's tests stay on one process, so
# its module-wide fixtures (trained runs) are made once.  CI runs both targets.
test-slow: install
	$(PYTHON) -m pytest -m slow -n 2 --dist loadfile

test-all: test test-slow

# the cluster explorer page on http://127.0.0.1:7860 (python tools/explore.py --help for its options)
explore: install
	$(PYTHON) tools/explore.py
