# The one entry point: `make book` builds the companion book, `make test` runs the tests.
# Both create the environment in .venv first (Python 3 and make are all they need).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint book bench clean

install: $(STAMP)

# torch==2.13.0 sits in the same pip command as everything else: on a CPU machine it takes the
# local CPU wheel, on a GPU machine the CUDA build; every other version is fixed by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt torch==2.13.0 -e '.[book,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check resemul_core tests bench
	$(BIN)/ruff format --check resemul_core tests bench

book: $(STAMP)
	@echo "make book: the notebooks arrive with issue 6" && exit 1

clean:
	rm -rf $(VENV) book/_build book/_executed .pytest_cache .ruff_cache *.egg-info
