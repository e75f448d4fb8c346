#!/bin/sh
# Container entrypoint: `hearth "$@"`, optionally waiting for the served checkpoints first.
#
# With HEARTH_WAIT_FOR_WEIGHTS=SECONDS, `serve` waits (up to that long) until every folder in
# HEARTH_MODELS has a config.json and no trainer is still writing it (docker/train.sh keeps a
# `.NAME.training` marker beside the folder while it runs). That is how the compose `trainer`
# service hands its result to the server: checkpoints are renamed into place whole, so the folder
# is complete once config.json is there. Without it, a missing checkpoint is the server's own
# one-line error.
set -eu

wait_for_weights() {
    deadline=$(( $(date +%s) + HEARTH_WAIT_FOR_WEIGHTS ))
    for entry in $(echo "${HEARTH_MODELS:-/app/weights/default}" | tr ',' ' '); do
        folder=${entry#*=}
        folder=${folder%/}
        marker="$(dirname "$folder")/.$(basename "$folder").training"
        until [ -f "$folder/config.json" ] && [ ! -e "$marker" ]; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "error: $folder was not ready within ${HEARTH_WAIT_FOR_WEIGHTS}s" >&2
                exit 1
            fi
            echo "waiting for $folder (HEARTH_WAIT_FOR_WEIGHTS)..." >&2
            sleep 10
        done
    done
}

if [ "${1:-}" = "serve" ] && [ -n "${HEARTH_WAIT_FOR_WEIGHTS:-}" ]; then
    wait_for_weights
fi
exec hearth "$@"
