# The one entry point: `make book` builds the companion book, `make test` runs the tests.
# Both create the environment in .venv first (Python 3 and make are all they need).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# `make book` settings; the defaults build the offline demo on the synthetic dataset.
PROFILE      ?= demo
DATASET      ?= synth
MTAT_ROOT    ?=
VARIANTS     ?= basic basic-multi se se-multi res1 res1-multi res2 res2-multi rese1 rese1-multi rese2 rese2-multi
DEVICE       ?= auto
SPLIT_POLICY ?= paper
EXCITATION_VARIANT ?= se-multi
# Settings on top of the profile, e.g. `make book WIDTH=0.125 SEED=1`, or any setting with
# SET="num_stages=3 precision=fp32" (the same keys as `resemul train --set`).
WIDTH ?=
SEED  ?=
SET   ?=

OVERRIDES := $(strip $(if $(WIDTH),width=$(WIDTH)) $(if $(SEED),seed=$(SEED)) $(SET))
empty :=
space := $(empty) $(empty)
STORE := data/$(DATASET)-store
# runs with other settings go to their own folder: runs/demo-synth-width0.125-seed1
RUNS  := runs/$(PROFILE)-$(DATASET)$(if $(OVERRIDES),-$(subst =,,$(subst $(space),-,$(OVERRIDES))))
NB    := book/notebooks
EXE   := book/executed
# papermill runs every notebook from book/notebooks, so paths passed to it start with ../..
UP    := ../..
ROOT_PARAM := $(if $(filter mtat,$(DATASET)),$(abspath $(MTAT_ROOT)),$(UP)/data/$(DATASET))
PAPERMILL  := $(BIN)/papermill --cwd $(NB) --no-progress-bar

.PHONY: install test lint book bench gpu-check gpu-wheels clean

install: $(STAMP)

# torch==2.13.0 sits in the same pip command as everything else: on a CPU machine it takes the
# local CPU wheel, on a GPU machine the CUDA build; every other version is fixed by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt torch==2.13.0 -e '.[book,dev]'
	touch $(STAMP)

# The GPU check's reduced CPU mode runs first, so that pytest's summary closes the output.
test: $(STAMP)
	@$(MAKE) --no-print-directory gpu-check DEVICE=cpu GPU_PYTHON=$(BIN)/python GPU_WHEELS=
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check resemul_core tests bench
	$(BIN)/ruff format --check resemul_core tests bench

# Every step skips work already done: the dataset and store are reused, finished training runs
# are not repeated and interrupted ones resume. Any failing cell or Sphinx warning fails the target.
book: $(STAMP)
	@if [ "$(DATASET)" = mtat ] && [ -z "$(MTAT_ROOT)" ]; then \
		echo "make book: DATASET=mtat needs MTAT_ROOT=/path/to/MagnaTagATune"; exit 2; fi
	@mkdir -p $(EXE)/train
	@echo "== data: $(DATASET) -> $(STORE)"
	@$(PAPERMILL) $(NB)/01_data.ipynb $(EXE)/01_data.ipynb -p dataset $(DATASET) \
		-p root "$(ROOT_PARAM)" -p store_dir $(UP)/$(STORE) -p split_policy $(SPLIT_POLICY) \
		|| { echo "make book: notebook 01_data.ipynb failed (see $(EXE)/01_data.ipynb)"; exit 1; }
	@for v in $(VARIANTS); do \
		echo "== training $$v (profile $(PROFILE)$(if $(OVERRIDES), + $(OVERRIDES))) -> $(RUNS)/$$v"; \
		$(PAPERMILL) $(NB)/02_train.ipynb $(EXE)/train/$$v.ipynb -p variant $$v \
			-p profile $(PROFILE) -p overrides "$(OVERRIDES)" -p data $(UP)/$(STORE) \
			-p device $(DEVICE) -p out $(UP)/$(RUNS)/$$v \
		|| { echo "make book: notebook 02_train.ipynb failed for $$v (see $(EXE)/train/$$v.ipynb)"; exit 1; }; \
	done
	@echo "== evaluation of $(RUNS)"
	@$(PAPERMILL) $(NB)/03_evaluate.ipynb $(EXE)/03_evaluate.ipynb -p runs $(UP)/$(RUNS) \
		-p data $(UP)/$(STORE) -p variants "$(VARIANTS)" -p device $(DEVICE) \
		|| { echo "make book: notebook 03_evaluate.ipynb failed (see $(EXE)/03_evaluate.ipynb)"; exit 1; }
	@echo "== excitation analysis of $(RUNS)/$(EXCITATION_VARIANT)"
	@$(PAPERMILL) $(NB)/04_excitations.ipynb $(EXE)/04_excitations.ipynb \
		-p run $(UP)/$(RUNS)/$(EXCITATION_VARIANT) -p data $(UP)/$(STORE) -p device $(DEVICE) \
		|| { echo "make book: notebook 04_excitations.ipynb failed (see $(EXE)/04_excitations.ipynb)"; exit 1; }
	@$(BIN)/python book/toc.py $(VARIANTS)
	$(BIN)/jupyter-book build book --warningiserror --keep-going
	@echo "make book: open book/_build/html/index.html"

bench: $(STAMP)
	$(BIN)/python bench/run.py

# `make gpu-check` proves the GPU path in minutes (bench/gpu_check.py; README, "Training on a
# GPU"). It runs from the checkout with the machine's own python3 and torch (PYTHONPATH=.), not
# .venv, so that it works on a GPU host with no package index; what such a host lacks comes as
# wheels that `make gpu-wheels` downloads into .whl/ beforehand, where the index is reachable.
# DEVICE=cpu runs its reduced mode (`make test` does); DEVICE=auto picks CUDA when present.
GPU_PYTHON ?= python3
GPU_WHEELS ?= .whl
GPU_SITE   ?= /tmp/resemul-gpu-site

gpu-check:
	@site=; if [ -n "$(GPU_WHEELS)" ] && ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
		echo "== gpu-check: installing $$(ls $(GPU_WHEELS)/*.whl | wc -l) wheels into $(GPU_SITE)"; \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
			--upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; \
		site=:$(GPU_SITE); fi; \
	PYTHONPATH=$(CURDIR)$$site$${PYTHONPATH:+:$$PYTHONPATH} \
		$(GPU_PYTHON) bench/gpu_check.py --device $(DEVICE)

gpu-wheels:
	bash bench/gpu_wheels.sh

# Keeps data/ and runs/ (they are expensive); remove those by hand.
clean:
	rm -rf $(VENV) book/_build $(EXE) .pytest_cache .ruff_cache *.egg-info
