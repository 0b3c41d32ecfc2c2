# hadctl: every target creates/uses its own virtualenv in .venv.
# Debian's /usr/bin/python3 is preferred: a service may run as another user
# (user = "nobody"), who must be able to execute the interpreter.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
HADCTL := $(VENV)/bin/hadctl
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo demo-stop test test-pythons bench chaos man lint clean

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

# The suite under every interpreter 3.10+ that pyenv holds, each in its own
# venv (.venv-3.X, made once): one summary line per interpreter. TESTS narrows it.
PYENV_VERSIONS ?= /root/.pyenv/versions
PYTHONS ?= $(sort $(wildcard $(PYENV_VERSIONS)/3.1[0-9]*))
TESTS ?= tests

test-pythons: install system-deps
	@test -n "$(PYTHONS)" || { echo "no Python 3.10+ under $(PYENV_VERSIONS)"; exit 1; }
	@failed=0; for dir in $(PYTHONS); do \
	  version=$$(basename $$dir | cut -d. -f1,2); venv=.venv-$$version; \
	  if [ ! -f $$venv/.installed ]; then \
	    $$dir/bin/python3 -m venv $$venv && \
	    $$venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >$$venv.log 2>&1 && \
	    touch $$venv/.installed || { echo "$$version: cannot install (see $$venv.log)"; failed=1; continue; }; \
	  fi; \
	  out=$$($$venv/bin/python -m pytest -q $(TESTS) 2>&1); rc=$$?; \
	  echo "$$version ($$($$venv/bin/python -c 'import platform; print(platform.python_version())')): $$(printf '%s\n' "$$out" | tail -1)"; \
	  [ $$rc -eq 0 ] || failed=1; \
	done; exit $$failed

bench: install
	$(PY) tests/bench/bench.py

chaos: install
	$(PY) tests/chaos.py --operations 1000

man:
	man -l man/hadctl.1

# Pinned: a new ruff or mypy release must not turn lint red on its own.
lint: install
	$(PY) -m pip install -q --disable-pip-version-check ruff==0.8.6 mypy==2.4.1
	$(PY) -m ruff check src tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) run build src/*.egg-info
