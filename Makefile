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
# Train every variant once per seed (runs go to RUNS/seed0, RUNS/seed1, ...): the evaluation
# chapter shows the spread over seeds beside the intervals over test clips, and calls a
# difference resolved only when every seed agrees on its sign. The demo trains two by default;
# SEEDS="0 1 2" for three; SEED=N (or SEEDS= with another profile) one run per variant.
SEEDS ?= $(if $(SEED),,$(if $(filter demo,$(PROFILE)),0 1))

OVERRIDES := $(strip $(if $(WIDTH),width=$(WIDTH)) $(if $(SEED),seed=$(SEED)) $(SET))
empty :=
space := $(empty) $(empty)
STORE := data/$(DATASET)-store
# runs with other settings go to their own folder: runs/demo-synth-width0.125-seed1
RUNS  := runs/$(PROFILE)-$(DATASET)$(if $(OVERRIDES),-$(subst =,,$(subst $(space),-,$(OVERRIDES))))$(if $(strip $(SEEDS)),-seeds$(subst $(space),-,$(strip $(SEEDS))))
# the runs the excitation chapter analyses: the first seed's when there are several
FIRST_SEED := $(firstword $(SEEDS))
SEED_RUNS  := $(RUNS)$(if $(FIRST_SEED),/seed$(FIRST_SEED))
# With the demo profile the excitation chapter analyses a run of its own: a longer, hotter run of
# EXCITATION_VARIANT (profile demo-excitations; bench/RESULTS.md, "Demo design experiment").
# EXCITATION_PROFILE= (empty) analyses the variant's run of the comparison instead.
EXCITATION_PROFILE ?= $(if $(filter demo,$(PROFILE)),demo-excitations)
EXCITATION_RUN := $(if $(EXCITATION_PROFILE),runs/$(EXCITATION_PROFILE)-$(DATASET)$(if $(OVERRIDES),-$(subst =,,$(subst $(space),-,$(OVERRIDES))))/$(EXCITATION_VARIANT),$(SEED_RUNS)/$(EXCITATION_VARIANT))
NB    := book/notebooks
EXE   := book/executed
# papermill runs every notebook from book/notebooks, so paths passed to it start with ../..
UP    := ../..
ROOT_PARAM := $(if $(filter mtat,$(DATASET)),$(abspath $(MTAT_ROOT)),$(UP)/data/$(DATASET))
PAPERMILL  := $(BIN)/papermill --cwd $(NB) --no-progress-bar

# `make book` trains JOBS runs at a time, each with THREADS torch threads (its share of the
# cores): on 2 cores two single-threaded runs train faster than one run on both (measured in
# bench/RESULTS.md, "CPU training step at demo width"). The CPU profiles train two at a time,
# the others (a GPU's) one.
JOBS    ?= $(if $(filter demo tiny,$(PROFILE)),2,1)
THREADS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); t=$$((n / $(JOBS))); echo $$((t > 0 ? t : 1)))
TRAIN_JOBS := $(foreach s,$(or $(strip $(SEEDS)),-),$(foreach v,$(VARIANTS),train-job/$(s)/$(v))) \
	$(if $(EXCITATION_PROFILE),train-job/excitation-run)

.PHONY: install test lint book bench gpu-check gpu-wheels clean FORCE

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
	@if [ -n "$(strip $(SEEDS))" ] && [ -n "$(SEED)" ]; then \
		echo "make book: give SEED (one run per variant) or SEEDS (several), not both"; exit 2; fi
	@mkdir -p $(EXE)/train $(EXE)/train/seeds
	@echo "== data: $(DATASET) -> $(STORE)"
	@$(PAPERMILL) $(NB)/01_data.ipynb $(EXE)/01_data.ipynb -p dataset $(DATASET) \
		-p root "$(ROOT_PARAM)" -p store_dir $(UP)/$(STORE) -p split_policy $(SPLIT_POLICY) \
		|| { echo "make book: notebook 01_data.ipynb failed (see $(EXE)/01_data.ipynb)"; exit 1; }
	@$(MAKE) --no-print-directory -j$(JOBS) $(TRAIN_JOBS)
	@$(if $(EXCITATION_PROFILE),,rm -f $(EXE)/train/excitation-run.ipynb)
	@echo "== evaluation of $(RUNS)"
	@$(PAPERMILL) $(NB)/03_evaluate.ipynb $(EXE)/03_evaluate.ipynb -p runs $(UP)/$(RUNS) \
		-p data $(UP)/$(STORE) -p variants "$(VARIANTS)" -p device $(DEVICE) \
		|| { echo "make book: notebook 03_evaluate.ipynb failed (see $(EXE)/03_evaluate.ipynb)"; exit 1; }
	@echo "== excitation analysis of $(EXCITATION_RUN)"
	@$(PAPERMILL) $(NB)/04_excitations.ipynb $(EXE)/04_excitations.ipynb \
		-p run $(UP)/$(EXCITATION_RUN) -p data $(UP)/$(STORE) -p device $(DEVICE) \
		|| { echo "make book: notebook 04_excitations.ipynb failed (see $(EXE)/04_excitations.ipynb)"; exit 1; }
	@echo "== tagging a long piece with $(EXCITATION_RUN)"
	@$(PAPERMILL) $(NB)/05_tag_music.ipynb $(EXE)/05_tag_music.ipynb \
		-p checkpoint $(UP)/$(EXCITATION_RUN) -p data $(UP)/$(STORE) -p device $(DEVICE) \
		-p out $(UP)/$(RUNS)/tag-your-own-music \
		|| { echo "make book: notebook 05_tag_music.ipynb failed (see $(EXE)/05_tag_music.ipynb)"; exit 1; }
	@$(BIN)/python book/toc.py $(if $(EXCITATION_PROFILE),--excitation-run $(EXCITATION_VARIANT)) $(VARIANTS)
	$(BIN)/jupyter-book build book --warningiserror --keep-going
	@echo "make book: open book/_build/html/index.html"

# One training run of the book, as the training chapter: train-job/SEED/VARIANT, SEED "-" for
# the plain runs folder (no SEEDS); the first seed's pages are the book's, the others go to
# book/executed/train/seeds/.
train-job/%: FORCE
	@s=$(word 1,$(subst /, ,$*)); v=$(word 2,$(subst /, ,$*)); \
	if [ "$$s" = - ]; then dir=$(RUNS)/$$v; extra="$(OVERRIDES)"; page=$(EXE)/train/$$v.ipynb; \
	else dir=$(RUNS)/seed$$s/$$v; extra="$(strip $(OVERRIDES) seed=$$s)"; page=$(EXE)/train/$$v.ipynb; \
		[ "$$s" = "$(FIRST_SEED)" ] || page=$(EXE)/train/seeds/$$v-seed$$s.ipynb; fi; \
	echo "== training $$v (profile $(PROFILE)$${extra:+ + $$extra}) -> $$dir"; \
	OMP_NUM_THREADS=$(THREADS) $(PAPERMILL) $(NB)/02_train.ipynb $$page -p variant $$v \
		-p profile $(PROFILE) -p overrides "$$extra" -p data $(UP)/$(STORE) \
		-p device $(DEVICE) -p out $(UP)/$$dir \
	|| { echo "make book: notebook 02_train.ipynb failed for $$v (see $$page)"; exit 1; }

# The excitation chapter's own run (EXCITATION_PROFILE, by default with the demo profile).
train-job/excitation-run: FORCE
	@echo "== training $(EXCITATION_VARIANT) for the excitation chapter (profile $(EXCITATION_PROFILE)) -> $(EXCITATION_RUN)"
	@OMP_NUM_THREADS=$(THREADS) $(PAPERMILL) $(NB)/02_train.ipynb $(EXE)/train/excitation-run.ipynb \
		-p variant $(EXCITATION_VARIANT) -p profile $(EXCITATION_PROFILE) -p overrides "$(OVERRIDES)" \
		-p data $(UP)/$(STORE) -p device $(DEVICE) -p out $(UP)/$(EXCITATION_RUN) \
	|| { echo "make book: notebook 02_train.ipynb failed for the excitation run (see $(EXE)/train/excitation-run.ipynb)"; exit 1; }

FORCE:

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
