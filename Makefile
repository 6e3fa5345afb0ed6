# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP_SERVER := $(VENV)/.installed-server
STAMP_TEST   := $(VENV)/.installed-test

.PHONY: test demo lint typecheck bench clean postgres native native-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_SERVER): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server,sample]'
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP_SERVER)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP_TEST)
	$(VENV)/bin/mypy instrumentation/src storage/src rules/src receiver/src

# The compiled extractor (receiver/src/phiaudit/receiver/_native.c; gcc and libssl-dev). Optional
# for a user (without it every span is extracted in Python); `make test` requires it, so that CI
# tests the path the service takes.
native: $(STAMP_SERVER)
	$(PY) receiver/build_native.py

native-check: $(STAMP_TEST)
	$(PY) receiver/build_native.py --check

# PostgreSQL + pgAudit from Debian's packages, for tests/e2e/test_pgaudit_bypass.py. A failure
# doesn't stop the other tests: that test then fails (CI=true) or skips with the script's reason.
postgres:
	-bash deploy/ci/ensure-postgres.sh

test: lint typecheck $(STAMP_TEST) native-check postgres
	$(PY) -m pytest -q

demo: $(STAMP_SERVER) native
	$(PY) deploy/demo.py

bench: $(STAMP_TEST) native
	$(PY) bench/receiver.py

clean:
	rm -rf $(VENV) phiaudit-data .pytest_cache .mypy_cache .ruff_cache
	rm -f receiver/src/phiaudit/receiver/_native*.so
