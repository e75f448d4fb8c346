#!/usr/bin/env bash
# Docker smoke test: build the image, start compose, wait for health, send one chat completion,
# check /metrics and the non-root user, stop with SIGTERM and expect exit status 0.
#
#   scripts/docker-smoke.sh                                  # with registry access
#   WHEELHOUSE=1 BASE_IMAGE=hearth-base:bookworm scripts/docker-smoke.sh   # no registry, no PyTorch index
#
# Settings (environment):
#   BASE_IMAGE   base for the Dockerfile (default: hearth-base:bookworm if built by
#                scripts/make-base-image.sh, else python:3.11-slim from Docker Hub)
#   WHEELHOUSE=1 download torch (from TORCH_INDEX_URL, PyTorch's CPU index by default, so no CUDA
#                build) and every dependency into docker/wheels with the host's pip first, then build
#                with PIP_NO_INDEX=1 (fully offline image build; the host's pip config, find-links and
#                certificates apply); a CUDA package in a CPU wheelhouse is an error
#   TORCH_INDEX_URL  where torch comes from (default https://download.pytorch.org/whl/cpu)
#   KEEP_BUILD_STAGE=1  keep the build-stage image the classic builder leaves untagged (about 2 GB;
#                it is the classic builder's layer cache: removed by default, label org.hearth.stage=build)
#   CPUINFO      the file the kernel check reads the host's ISA from (default /proc/cpuinfo)
#   PORT         host port to publish (default 18080, so a local `hearth serve` on 8080 is left alone)
#   KEEP=1       leave the stack running afterwards (default: `down -v`)
# If the image carries no weights/default, a tiny random checkpoint is written into the weights
# volume first (through the image itself), so the test needs no trained model.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-18080}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
CPUINFO=${CPUINFO:-/proc/cpuinfo}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-hearth-smoke}
export HEARTH_HOST_PORT=$PORT HEARTH_IMAGE=${HEARTH_IMAGE:-hearth:smoke}

log() { printf '\n== %s\n' "$*"; }
host_isa() {  # the widest SIMD the host has: avx512_bf16, avx512f, avx2, neon (arm64) or baseline
    local flags
    flags=$(grep -m1 -E '^(flags|Features)' "$1" || true)
    for isa in avx512_bf16 avx512f avx2 asimd; do
        if grep -qw "$isa" <<<"$flags"; then [[ $isa == asimd ]] && isa=neon; echo "$isa"; return; fi
    done
    echo baseline
}
fail() { printf 'FAIL: %s\n' "$*" >&2; compose logs --tail 50 server >&2 || true; exit 1; }

if docker compose version >/dev/null 2>&1; then
    compose() { docker compose "$@"; }
elif command -v docker-compose >/dev/null; then
    compose() { docker-compose "$@"; }
else
    echo "error: neither 'docker compose' nor docker-compose found" >&2; exit 1
fi
if ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0  # no buildx plugin: the classic builder
fi
if [[ -z ${BASE_IMAGE:-} ]]; then
    if docker image inspect hearth-base:bookworm >/dev/null 2>&1; then BASE_IMAGE=hearth-base:bookworm; else BASE_IMAGE=python:3.11-slim; fi
fi
export HEARTH_BASE_IMAGE=$BASE_IMAGE

PLATFORMS=(--python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_17_x86_64 --platform linux_x86_64)
if [[ ${WHEELHOUSE:-0} == 1 ]]; then
    log "wheelhouse: torch==$TORCH_VERSION from $TORCH_INDEX_URL, then the dependencies, into docker/wheels"
    # Torch first, from its own index: PyPI's torch for Linux is the CUDA build (several GB of nvidia-*).
    python3 -m pip download --quiet --dest docker/wheels --only-binary=:all: "${PLATFORMS[@]}" \
        --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple "torch==$TORCH_VERSION"
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/hearth-requirements.txt
    # The rest from PyPI; --find-links makes the torch just downloaded satisfy `torch>=...` again.
    python3 -m pip download --quiet --dest docker/wheels --only-binary=:all: "${PLATFORMS[@]}" \
        --find-links docker/wheels "torch==$TORCH_VERSION" "setuptools>=68" -r /tmp/hearth-requirements.txt
    if [[ $TORCH_INDEX_URL == */cpu ]] && compgen -G 'docker/wheels/nvidia_*' >/dev/null; then
        echo "error: CUDA packages in the CPU wheelhouse: $(cd docker/wheels && echo nvidia_* | cut -c1-200)" >&2
        echo "       remove docker/wheels/nvidia_* and the CUDA torch wheel, then run again" >&2
        exit 1
    fi
    echo "torch wheel: $(cd docker/wheels && ls torch-"$TORCH_VERSION"*.whl)"
    export HEARTH_PIP_NO_INDEX=1 HEARTH_TORCH_INDEX_URL=
fi

cleanup() {
    if [[ ${KEEP:-0} != 1 ]]; then compose down -v --remove-orphans >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

log "build (base $BASE_IMAGE)"
started=$(date +%s)
compose build server
echo "built $HEARTH_IMAGE in $(( $(date +%s) - started )) s: $(docker image inspect -f '{{.Size}}' "$HEARTH_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
# The classic builder keeps the build stage as an untagged image (about 2 GB). BuildKit keeps no such
# image (its cache is `docker builder prune`'s business).
if [[ ${KEEP_BUILD_STAGE:-0} != 1 ]]; then
    docker image prune --force --filter label=org.hearth.stage=build >/dev/null
    echo "removed the untagged build-stage image (KEEP_BUILD_STAGE=1 keeps it as layer cache)"
fi

if ! docker run --rm --entrypoint test "$HEARTH_IMAGE" -f /app/weights/default/config.json; then
    log "no bundled weights/default: writing a tiny random checkpoint into the weights volume"
    compose run --rm --no-deps --entrypoint python server -c '
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.decoder import Transformer
from model.tokenizer import Tokenizer
text = ["the quick brown fox jumps over the lazy dog %d\n" % i for i in range(400)]
tokenizer = Tokenizer.train(iter(text), vocab_size=512)
model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)).init_weights(0).eval()
save_checkpoint("/app/weights/default", model, tokenizer)
print("wrote /app/weights/default")'
fi

log "compose up"
compose up -d server
deadline=$(( $(date +%s) + 180 ))
until curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
    [[ $(date +%s) -lt $deadline ]] || fail "/health not OK within 180 s"
    sleep 2
done
echo "healthy after $(( $(date +%s) - started )) s since the build started: $(curl -fsS "http://127.0.0.1:$PORT/health")"

log "one chat completion"
reply=$(curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "default", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}') \
    || fail "chat completion request failed"
echo "$reply"
python3 -c '
import json, sys
body = json.loads(sys.argv[1])
assert isinstance(body["choices"][0]["message"]["content"], str), "no message content"
assert body["usage"]["completion_tokens"] > 0, "no tokens generated"
print("ok: %d tokens" % body["usage"]["completion_tokens"])' "$reply" || fail "unexpected completion body"

log "metrics, user, docker health"
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep -E '^hearth_(http_requests_total|generation_tokens_total)' \
    || fail "/metrics lacks the request and token counters"
if ! uid=$(compose exec -T server id -u) || [[ $uid == 0 ]]; then fail "the server runs as root"; fi
echo "server uid: $uid"
container=$(compose ps -q server)
for _ in $(seq 30); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    [[ $health == healthy ]] && break
    sleep 2
done
echo "docker HEALTHCHECK: $health"
[[ $health == healthy ]] || fail "docker health status is $health"
# The image compiles the native kernels at build time; the server must load the ones for this host's
# ISA. The server logs "native NAME unavailable, using PyTorch's kernel: REASON" for each it cannot use
# (after the completion above, every kernel a step needs has been tried); "the CPU lacks ..." means
# this build has no kernels for the host's ISA: the check is skipped, and says so.
isa=$(host_isa "$CPUINFO")
refused=$(docker logs "$container" 2>&1 | grep -E 'native .* unavailable' || true)
if [[ -z $refused ]]; then
    echo "native kernels: checked: the server loaded them (host ISA $isa, no 'native ... unavailable' in its log)"
elif grep -q 'the CPU lacks' <<<"$refused"; then
    echo "native kernels: check SKIPPED: this build has no kernels for the host ISA ($isa), the server uses PyTorch's:"
    echo "$refused" | sort -u | head -3
else
    fail "the server could not load the native kernels for this host (ISA $isa): $refused"
fi

log "SIGTERM: graceful stop"
compose stop server
code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
echo "exit status after SIGTERM: $code"
[[ $code == 0 ]] || fail "server exited $code after SIGTERM"

log "docker smoke test passed"
