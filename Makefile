# redblue: `make run` runs the whole workflow, `make test` runs every test and check.
# Both create .venv when it is missing and install the pinned dependencies (constraints.txt).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= secure_ai_outputs
ARGS   ?=

.PHONY: run test lint install bench browser clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# torchattacks is a reference in the tests and benchmarks; --no-deps because its metadata
	# asks for torchvision, which would pull a second (CUDA) torch.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps torchattacks==3.5.1
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/redblue run --out $(OUT) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/bandit --quiet --recursive src --severity-level medium

# pytest on every core; tests that share a costly fixture stay on one worker (tests/conftest.py).
test: lint
	$(BIN)/pytest -n auto --dist loadgroup $(ARGS)

# Debian's Chromium and its driver, for the report's browser test (skipped without them).
browser:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
