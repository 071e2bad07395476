# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install clean

install: $(VENV)/.installed

# torch is pinned by constraints.txt so the CPU wheel is used, not the CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/stoker demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs data/stdlib
