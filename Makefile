# make run  : prepare, train and evaluate on the dataset (DATA=folder, default: $PINSFACE_DATA or ../shared)
# make test : the fast test suite
# make test-floor : the same suite on the lowest versions pyproject.toml allows (uv's lowest-direct resolution)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
OUT    ?= runs/latest
STAMP  := $(VENV)/.installed
FLOOR  ?= .venv-floor

.PHONY: install run test test-floor lint docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,serve,ray,library]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pinsface run $(DATA) --out $(OUT)

test: $(STAMP)
	@# The browser test drives Debian's chromium (never a downloaded browser): install it where apt-get can.
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || (apt-get update && apt-get install -y chromium)
	@# The library tests start a real PostgreSQL server (Debian's postgresql, initdb and pg_ctl).
	test -x /usr/lib/postgresql/15/bin/initdb || command -v initdb >/dev/null || ! command -v apt-get >/dev/null \
		|| (apt-get update && apt-get install -y postgresql)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

test-floor: $(STAMP)
	@# Every direct dependency at the lowest version its range allows (their own dependencies at the newest):
	@# a floor in pyproject.toml that nothing was tested on is a guess.
	$(BIN)/python -m pip install -q 'uv>=0.9,<1'
	rm -rf $(FLOOR)
	$(BIN)/uv venv -q --python $(BIN)/python $(FLOOR)
	$(BIN)/uv pip install -q --python $(FLOOR)/bin/python --resolution lowest-direct -e '.[test,serve,ray,library]'
	$(BIN)/uv pip list -q --python $(FLOOR)/bin/python > $(FLOOR)/versions.txt
	$(FLOOR)/bin/python -m pytest -q -p no:cacheprovider

docs: $(STAMP)
	$(BIN)/python scripts/cli_docs.py

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/accuracy.py

clean:
	rm -rf $(VENV) $(FLOOR) runs .pytest_cache
