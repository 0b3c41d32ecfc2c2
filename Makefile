# hadctl: every target creates/uses its own virtualenv in .venv.
# Debian's /usr/bin/python3 is preferred: a service may run as another user
# (user = "nobody"), who must be able to execute the interpreter.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
HADCTL := $(VENV)/bin/hadctl
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo demo-stop test bench chaos man lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Byte-compile: the environment may set PYTHONDONTWRITEBYTECODE, and a standby
# compiling hadctl from source on every start costs time and ~1 MB of memory.
install: $(STAMP)
	$(PY) -m compileall -q src configs tests

# Programs the tests really run: shellcheck, systemd-analyze, groff, ZooKeeper.
system-deps:
	sh tools/system-deps.sh

demo: install
	$(HADCTL) -c configs/example.toml start
	$(HADCTL) -c configs/example.toml status
	@echo "Now try: $(HADCTL) -c configs/example.toml restart | stop  (log: run/example/stdout.log)"

demo-stop: install
	$(HADCTL) -c configs/example.toml stop

test: install system-deps
	$(PY) -m pytest -q tests

bench: install
	$(PY) tests/bench/bench.py

chaos: install
	$(PY) tests/chaos.py --operations 1000

man:
	man -l man/hadctl.1

lint: install
	$(PY) -m pip install -q mypy ruff
	$(PY) -m mypy
	$(PY) -m ruff check src

clean:
	rm -rf $(VENV) run build src/*.egg-info
