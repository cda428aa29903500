# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash recipes/synth/run.sh

test: $(STAMP)  # two workers, one file each at a time (a file's module fixtures are built once)
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: $(STAMP)  # the suite without the tests marked slow (several processes, or more than a few seconds of training)
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf outputs multirun data/synth data/synth_tiny
