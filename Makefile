# The two commands: `make run` (the whole stack in the foreground) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export DJANGO_SETTINGS_MODULE ?= config.settings.local
export PYTHONUNBUFFERED := 1

.PHONY: run up down status test test-faults lint format services migrate seed demo bench bench-minimal clean

.venv/.installed: requirements.txt
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

services: .venv/.installed
	@scripts/services.sh ensure

migrate: services
	@$(PY) manage.py migrate --noinput -v 0

seed: migrate
	@$(PY) manage.py seed_sandbox
	@$(PY) manage.py seed_demo_merchant

# Services, migrations and seeds are the script's own steps: it must know which servers it started.
run: .venv/.installed
	scripts/run.sh

up: seed
	@scripts/stack.sh up

down:
	@scripts/stack.sh down
	@scripts/services.sh stop

status:
	@scripts/services.sh status
	@scripts/stack.sh status

# The whole suite: unit, e2e, properties, API fuzzing, security, every fault scenario and
# tests/scale (its own Redis Sentinel group and RabbitMQ node); the fault counts are printed in the
# summary at the end. Two pytest workers (XDIST): the stack tests (faults, e2e, scale) run as one
# group on one worker, everything else on both (tests/conftest.py). `make test XDIST=` runs
# it in one process. `make test-faults` runs the fault scenarios alone.
# The API fuzz run goes last in a process of its own: under xdist schemathesis's parametrized
# operations collapse into one item per test and send well under half the cases.
# `make test TESTS="tests/orders tests/gateway"` runs only those paths, in one pytest run; ARGS
# passes options (`ARGS="-k refund -x"`) to every run.
XDIST ?= -n 2
TESTS ?=
test: .venv/.installed
	@scripts/services.sh ensure-test
ifeq ($(strip $(TESTS)),)
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) -m pytest $(XDIST) --ignore=tests/fuzz $(ARGS)
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) -m pytest tests/fuzz $(ARGS)
else
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) -m pytest $(XDIST) $(TESTS) $(ARGS)
endif

test-faults: services
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) -m pytest tests/faults -s $(ARGS)

lint: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/ruff format --check .

format: .venv/.installed
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

demo: up
	@$(PY) scripts/demo.py

bench: up
	@$(PY) -m bench $(ARGS)

# the floor of one order (hops, inserts, calls, SPEC's rows) on the ceiling's own stack (bench/minimal.py; ~2 min, no app stack needed)
bench-minimal: .venv/.installed
	@$(PY) -m bench.minimal $(ARGS)

clean: down
	rm -rf .run
