# Two commands on a fresh machine: `make serve` and `make test`.
# Everything installs into .venv; torch is pinned first so pip takes the CPU
# build instead of pulling several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= weights/default
PORT ?= 8080
TORCH_VERSION ?= 2.13.0

.PHONY: install test serve bench clean default-model

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/hearth serve --model $(MODEL) --port $(PORT)

# Rebuild weights/default from the offline corpus (about 175 minutes on a 2-core CPU).
DATA ?= ../shared/corpus
default-model: install
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/train-default-model.sh $(DATA) $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
