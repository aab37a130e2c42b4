# The two entry points: `make demo` and `make test`. Both create the virtualenv and install what is
# missing (pinned: requirements.txt + constraints.txt). Nothing needs root or Docker.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean dev-up dev-down

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pinned, about 2 minutes on a fresh machine)"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip wheel
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@scripts/install-system-packages.sh
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(PY) scripts/demo.py

test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	@scripts/install-system-packages.sh --bench
	@$(PY) bench/bench_pg.py
	@$(PY) bench/bench_git.py
	@$(PY) bench/bench_objects.py
	@$(PY) bench/bench_registry.py

dev-up: $(STAMP)
	@$(VENV)/bin/orgmover dev up

dev-down: $(STAMP)
	@$(VENV)/bin/orgmover dev down

clean:
	-@$(VENV)/bin/orgmover --home .orgmover/demo dev down --destroy 2>/dev/null
	rm -rf .orgmover
