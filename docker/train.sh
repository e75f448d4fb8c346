#!/bin/sh
# The compose `trainer` service: pretrain on /app/data into the weights volume.
#
# A first run starts from scratch with HEARTH_TRAIN_PRESET (default mini); a run that was stopped
# (docker compose stop: SIGTERM makes the trainer write a checkpoint) continues where it left off,
# since the output folder then holds training_state.json. HEARTH_TRAIN_ARGS adds flags (e.g.
# "--max-steps 2000"); HEARTH_TRAIN_NAME names the output folder under /app/weights.
#
# While it runs, /app/weights/.NAME.training exists; it is removed when training completes, so a
# server started with HEARTH_WAIT_FOR_WEIGHTS serves the finished model, not a mid-run checkpoint.
set -u

name=${HEARTH_TRAIN_NAME:-trained}
out="/app/weights/$name"
marker="/app/weights/.$name.training"
touch "$marker"

if [ -f "$out/training_state.json" ]; then
    echo "resuming the run in $out" >&2
    # shellcheck disable=SC2086  # HEARTH_TRAIN_ARGS is a list of flags
    hearth pretrain --out "$out" --resume ${HEARTH_TRAIN_ARGS:-} &
else
    # shellcheck disable=SC2086
    hearth pretrain --preset "${HEARTH_TRAIN_PRESET:-mini}" --data /app/data --out "$out" ${HEARTH_TRAIN_ARGS:-} &
fi
child=$!
# As PID 1, sh would ignore SIGTERM: hand it to the trainer, which checkpoints and exits.
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do  # woken by the trap: wait for the checkpoint to be written
    status=0
    wait "$child" || status=$?
done
if [ "$status" -eq 0 ]; then
    rm -f "$marker"
    echo "training complete: $out" >&2
fi
exit "$status"
