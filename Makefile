# `make demo` and `make test` install what they need into .venv (idempotent), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision pinned explicitly first: a bare range would let pip pick a multi-GB CUDA build
# from the index on a machine that lacks the local wheels. See docs/architecture.md.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -ra

demo: install
	$(PY) -m jobs.demo

clean:
	rm -rf out/demo
