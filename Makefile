# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then run `safediff demo` on the embedded default
#   make test   install into .venv, then lint and run the whole test suite (CI runs this)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/safediff demo

test: install
	$(VENV)/bin/ruff check src tests bench recipes experiments
	$(PY) -m pytest -n auto

bench: install
	$(PY) bench/bench_grpo_epoch.py
