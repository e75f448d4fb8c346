#!/usr/bin/env bash
# The default model's recipe: SmolLM2-135M-Instruct fine-tuned with Hearth's own commands on the
# corpus' word chats, shipped as a LoRA adapter (weights/default-lora), built into weights/default,
# measured, and its card written. `make default-model DATA=../shared/corpus` runs it; the card says how
# long each step took on the machine it ran on.
#
#   scripts/train-default-model.sh ../shared/corpus
#   WORD_CHATS=20000 MAX_STEPS=400 scripts/train-default-model.sh DATA    # a bigger budget (GPU: DEVICE=cuda)
#   DICTIONARY_ENTRIES=-1 MAX_STEPS=3000 DEVICE=cuda scripts/train-default-model.sh DATA
#       # + the whole WordNet dictionary as text (--text-data): the route to the F1 target (README)
#   RESUME=1 ... continues the fine-tune saved in runs/default/sft (same settings), e.g. across sessions
#
# Steps: import the GGUF base as float32; write the fine-tuning mix (scripts/default_model/make_data.py:
# sampled word chats + the base's own answers to general prompts, so it keeps what it knew); LoRA
# fine-tune (`hearth sft --lora-rank`); ship the adapter; build weights/default (merge, quantize);
# evaluate float32, int8 and int4 on held-out chats, word-answer F1 through the server, sample chats;
# write the card (scripts/default_model/write_card.py). Intermediate files go to runs/ (git-ignored).
set -euo pipefail
DATA=${1:?usage: scripts/train-default-model.sh DATA_DIR}
RUNS=${RUNS:-runs/default}
PY=${PYTHON:-python}
read -r -a HEARTH <<< "${HEARTH:-$PY -m cli}"  # a command line, split into words
WORD_CHATS=${WORD_CHATS:-6000}
MAX_STEPS=${MAX_STEPS:-40}
GENERAL_REPEAT=${GENERAL_REPEAT:-3}
DEVICE=${DEVICE:-auto}
DICTIONARY_ENTRIES=${DICTIONARY_ENTRIES:-0}
RESUME=${RESUME:-0}
GGUF=$(PYTHON="$PY" scripts/fetch-smollm2.sh weights/gguf)
for file in wordnet-chat-train.jsonl.gz wordnet-chat-valid.jsonl.gz; do
  [ -f "$DATA/$file" ] || { echo "error: $DATA/$file not found (expected the offline corpus folder)" >&2; exit 1; }
done
mkdir -p "$RUNS"
timed() { local name=$1; shift; local start=$SECONDS; "$@"; echo "{\"$name\": $((SECONDS - start))}" >> "$RUNS/times.jsonl"; }
text_data=()
if [ "$DICTIONARY_ENTRIES" != 0 ]; then text_data=(--text-data "$RUNS/dictionary.jsonl"); fi
sft_start=(--overwrite)
if [ "$RESUME" = 1 ]; then sft_start=(--resume); fi
if [ "$RESUME" != 1 ]; then  # a resumed run keeps its base and data (the trainer checks they are the same)
  : > "$RUNS/times.jsonl"
  timed import "${HEARTH[@]}" import-gguf "$GGUF" --out "$RUNS/base-f32" --dtype float32 --overwrite
  timed data "$PY" scripts/default_model/make_data.py "$RUNS/base-f32" --corpus "$DATA" --out "$RUNS" \
    --word-chats "$WORD_CHATS" --dictionary-entries "$DICTIONARY_ENTRIES"
fi
python_slice() { "$PY" -c 'import gzip, itertools, sys; sys.stdout.writelines(itertools.islice(gzip.open(sys.argv[1], "rt"), int(sys.argv[2])))' "$@"; }
python_slice "$DATA/wordnet-chat-valid.jsonl.gz" 300 > "$RUNS/valid-300.jsonl"

# LoRA rank 16 on every linear (4.9M trainable of 135M), lr 1e-3 (the LoRA default), rows of 512 tokens,
# 4096 tokens a step; loss on the assistant replies only (and on every dictionary token, if any).
timed sft "${HEARTH[@]}" sft --base "$RUNS/base-f32" --data "$RUNS/word-chats.jsonl" --upsample "$RUNS/general.jsonl:$GENERAL_REPEAT" \
  --val-data "$RUNS/valid-300.jsonl" --lora-rank 16 --lora-alpha 32 --seq-len 512 --batch-tokens 4096 \
  --max-steps "$MAX_STEPS" --eval-every "$MAX_STEPS" --save-every 5 --device "$DEVICE" \
  "${text_data[@]}" --out "$RUNS/sft" --log-file "$RUNS/sft.jsonl" "${sft_start[@]}"
"$PY" scripts/default_model/ship_adapter.py "$RUNS/sft" --out weights/default-lora

timed build "$PY" scripts/default_model/build.py --gguf "$GGUF" --out weights/default --method int8 --keep-merged "$RUNS/merged-f32"
"${HEARTH[@]}" quantize "$RUNS/merged-f32" --method int4 --out "$RUNS/merged-int4"

for model in base-f32 merged-f32 merged-int4; do
  "${HEARTH[@]}" eval "$RUNS/$model" --data "$RUNS/valid-300.jsonl" > "$RUNS/eval-$model.json"
done
"${HEARTH[@]}" eval weights/default --data "$RUNS/valid-300.jsonl" > "$RUNS/eval-default.json"
"${HEARTH[@]}" eval weights/default --data tests/fixtures/wordnet_chat_valid_slice.jsonl > "$RUNS/eval-default-slice.json"
timed f1 "$PY" scripts/eval_word_answers.py weights/default --data "$DATA/wordnet-chat-valid.jsonl.gz" --limit 200 \
  --answers "$RUNS/f1-default-answers.jsonl" > "$RUNS/f1-default.json"
"$PY" scripts/eval_word_answers.py "$RUNS/base-f32" --data "$DATA/wordnet-chat-valid.jsonl.gz" --limit 200 > "$RUNS/f1-base.json"
"$PY" scripts/card_samples.py weights/default > "$RUNS/samples.md"
"$PY" scripts/default_model/write_card.py --runs "$RUNS" --out weights/default
