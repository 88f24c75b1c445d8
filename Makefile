# Quick start:  make repro   (the demo pipeline: dvc repro, sharing one Prefect server)   |   make test   (the test suite)
# Both create .venv on first use and reuse it afterwards.
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: env repro test test-fast clean-tmp

env:
	@bash scripts/setup-env.sh

repro: env
	@# up to date: plain dvc repro (nothing runs); else one Prefect server shared by every stage that runs.
	@if dvc status --quiet >/dev/null 2>&1; then dvc repro; else \
		CASCADE_CLIP_GROUP=repro-$$(date -u +%Y%m%dT%H%M%SZ) \
		python -m stages.shared_server dvc repro; fi

# two workers (pytest-xdist); tests sharing an expensive session fixture stay on one worker (tests/conftest.py)
PYTEST_WORKERS ?= 2

test: env
	python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15

test-fast: env
	python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"
