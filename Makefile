# The two README commands: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-scale fuzz lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a plain `torch` requirement resolves to a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/genq demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python -m bench

# a 1,000,000-line batch against a 10,000-line one (about 15 minutes on 2 cores); on
# SQLite, and on PostgreSQL too where one answers on 127.0.0.1:5432 (GENQ_TEST_POSTGRES_URL;
# a database of its own is created there and dropped after)
bench-scale: $(STAMP)
	$(BIN)/python -m bench --only scale

# every schemathesis check, 60 examples an operation (over 1,000 cases), on SQLite (and
# PostgreSQL where GENQ_TEST_POSTGRES_URL is set)
fuzz: $(STAMP)
	GENQ_DEEP_FUZZ=60 $(BIN)/python -m pytest -q -ra tests/test_security.py -k deep_fuzz

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy common worker api bench

clean:
	rm -rf $(VENV) .genq genq.egg-info
