#!/usr/bin/env bash
# What only a GPU shows, and what a first cluster user runs, in one command, on the visible GPUs
# of one node (CUDA_VISIBLE_DEVICES honoured):
#   1. a bf16 TAMT-KD search of config:bert-base-uncased (published shape, random weights) for 30
#      steps, timed over steps 21-30 (no threshold reset, evaluation or checkpoint in that window);
#   2. the same search killed (SIGKILL, whole job) after its step-10 checkpoint, then --resume'd;
#   3. a 30-step masked fine-tune of the search's mask (GLUE SST-2 fixture shipped in tests/);
#   4. one IMP round (10% pruned) with ds_configs/zero3_offload.json;
#   5. evaluate_mask on the search's mask, the IMP mask and the dense model;
#   6. where the GPU has fp16: an fp16 search killed after a checkpoint and resumed, whose dynamic
#      loss scaler must come through the checkpoint (against the same search uninterrupted);
#   7. on compute capability >= 8.0: inference of a dense, a compact structured 50% and a 2:4 model,
#      the last also as torch's 2:4 semi-structured sparse weights (OUT/inference.json);
#   8. the output contract, tokens/s and model FLOPs utilisation, per-GPU peak memory (nvidia-smi)
#      and CUDA max allocated, with the memory model's prediction beside it.
# Figures: OUT/gpu_summary.md (paste into docs/scaling.md with the date and device) and OUT/gpu_summary.json;
# the exit code is non-zero if a phase went wrong (listed under "problems").  The parsing half
# (GPU list, nvidia-smi samples, phase verdicts) is tamt_ds/gpu_check.py, tested on CPU.
#
#   scripts/gpu_check.sh [OUT]          (default OUT: outputs/gpu_check; BATCH=32 SEQ=128 by default)
#   PEAK_TFLOPS=989 scripts/gpu_check.sh    # the GPU's dense bf16 peak, if its name is not in the table
#   CUDA_VISIBLE_DEVICES=2,3 scripts/gpu_check.sh   # only those GPUs (indices or UUIDs)
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu_check}"
BATCH="${BATCH:-32}"
SEQ="${SEQ:-128}"
MODEL="config:bert-base-uncased"
CONFIG="ds_configs/zero3_bf16.json"
PY=".venv/bin/python"
DS=".venv/bin/deepspeed"

[[ -x "$PY" && -x "$DS" ]] || { echo "error: no .venv with deepspeed here: run 'make setup' first" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: run this on a GPU node" >&2; exit 2; }
# CUDA numbers GPUs as nvidia-smi does (PCI bus order), so that an index means the same GPU to both.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
GPUS="$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader | "$PY" -m tamt_ds.gpu_check visible)" || exit 2
NGPU="$(tr ',' '\n' <<< "$GPUS" | wc -l)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: torch in .venv sees no CUDA device (CPU-only torch build?): install a CUDA build" >&2; exit 2; }
echo "== $NGPU GPU(s) (nvidia-smi index $GPUS): $(nvidia-smi -i "$GPUS" --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
# DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES when told --num_gpus: name the GPUs instead.
LAUNCH=("$DS" --include "localhost:$GPUS")

rm -rf "$OUT"
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

# The random model is built once (file lock) by whichever rank asks first; building it here
# keeps that out of the timed run.
"$PY" -c "from tamt_ds.models import resolve_model_path; print(resolve_model_path('$MODEL'))"

SMI_PID=""
sample_memory() {  # memory.used (MiB) of every GPU every 0.5 s into OUT/nvidia_smi_<phase>.csv
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia_smi_$1.csv" &
    SMI_PID=$!
}
stop_sampling() { [[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null || true; SMI_PID=""; }
JOB_PID=""
stop_job() { [[ -n "$JOB_PID" ]] && kill -KILL -- "-$JOB_PID" 2>/dev/null || true; JOB_PID=""; }
trap 'stop_sampling; stop_job' EXIT

# Resets every 20 steps: steps 21-30 (the timed logging window) hold none; the save at 30 and
# the evaluation come after that window's log line.
search_args() {  # OUT_DIR CONFIG MAX_STEPS SAVE_STEPS: the array ARGS
    ARGS=(--model_name_or_path "$MODEL" --deepspeed "$2" --output_dir "$1"
          --max_steps "$3" --save_steps "$4" --per_device_train_batch_size "$BATCH" --max_seq_length "$SEQ"
          --threshold_reset_steps 20 --logging_steps 10 --eval_steps "$3")
}

kill_and_resume() {  # NAME: search ARGS into OUT/NAME, SIGKILL the whole job once its first checkpoint is
    local run="$OUT/$1" pid tag      # complete (many steps before the end), then the same with --resume
    setsid "${LAUNCH[@]}" launchers/search.py "${ARGS[@]}" > "$OUT/$1_killed.log" 2>&1 &
    pid=$!
    JOB_PID=$pid  # setsid: the launcher leads a new process group, which holds every rank
    local deadline=$((SECONDS + 1800))
    while [[ ! -f "$run/checkpoints/latest" ]] && ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || { echo "error: $1 ended before its first checkpoint: see $OUT/$1_killed.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -f "$run/checkpoints/latest" ]] || { echo "error: $1: no checkpoint after 30 min: see $OUT/$1_killed.log" >&2; exit 1; }
    tag="$(cat "$run/checkpoints/latest")"
    stop_job
    wait "$pid" 2>/dev/null || true
    echo "   killed after $tag; resuming"
    "${LAUNCH[@]}" launchers/search.py "${ARGS[@]}" --resume 2>&1 | tee "$OUT/$1.log"
}

echo "== search: $MODEL, bf16, 30 steps, $BATCH x $SEQ tokens per GPU"
search_args "$OUT/search" "$CONFIG" 30 30
sample_memory search
"${LAUNCH[@]}" launchers/search.py "${ARGS[@]}" 2>&1 | tee "$OUT/search.log"
stop_sampling

echo "== the same search, killed after its step-10 checkpoint, then --resume"
search_args "$OUT/resume" "$CONFIG" 30 10
kill_and_resume resume

echo "== masked fine-tune: the search's mask, 30 steps"
sample_memory finetune
"${LAUNCH[@]}" launchers/finetune.py \
    --task sst2 --data_dir tests/fixtures/downstream/glue --model_name_or_path "$MODEL" \
    --mask "$OUT/search/mask.pt" --deepspeed "$CONFIG" --output_dir "$OUT/finetune" \
    --max_steps 30 --num_train_epochs 1000 --per_device_train_batch_size 4 2>&1 | tee "$OUT/finetune.log"
stop_sampling

echo "== one IMP round (10% pruned), ds_configs/zero3_offload.json"
"${LAUNCH[@]}" launchers/imp.py --model_name_or_path "$MODEL" --deepspeed ds_configs/zero3_offload.json \
    --output_dir "$OUT/imp" --max_sparsity 0.1 --prune_fraction 0.1 --prune_interval 10 \
    --per_device_train_batch_size 8 --max_seq_length "$SEQ" 2>&1 | tee "$OUT/imp.log"

echo "== evaluate_mask: the search's mask, the IMP mask, the dense model"
"${LAUNCH[@]}" launchers/evaluate_mask.py --model_name_or_path "$MODEL" --deepspeed "$CONFIG" \
    --mask "$OUT/search/mask.pt" "$OUT/imp/0.1/mask.pt" none \
    --output "$OUT/eval_search.json" "$OUT/eval_imp.json" "$OUT/eval_none.json" \
    --eval_blocks 64 --max_seq_length "$SEQ" --per_device_eval_batch_size 4 2>&1 | tee "$OUT/evaluate_mask.log"

if "$PY" -c "import sys; from tamt_ds.engine import _fp16_supported; sys.exit(0 if _fp16_supported() else 1)"; then
    echo "== fp16 search: uninterrupted, and killed after its step-10 checkpoint then --resume (loss scaler)"
    search_args "$OUT/fp16" ds_configs/zero3_fp16.json 20 10
    "${LAUNCH[@]}" launchers/search.py "${ARGS[@]}" 2>&1 | tee "$OUT/fp16.log"
    search_args "$OUT/fp16_resume" ds_configs/zero3_fp16.json 20 10
    kill_and_resume fp16_resume
else
    echo "== fp16: not supported by this GPU, skipped (said in the summary)"
fi

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.get_device_capability()[0] >= 8 else 1)"; then
    echo "== inference, one GPU, bf16, $BATCH x $SEQ: dense vs compact structured 50% vs 2:4 zeros vs 2:4 semi-structured"
    CUDA_VISIBLE_DEVICES="${GPUS%%,*}" "$PY" benchmarks/inference.py --model "$MODEL" --device cuda --dtypes bfloat16 \
        --shapes "${BATCH}x${SEQ}" --structured 0.5 --unstructured --two_four --repeats 20 \
        --output "$OUT/inference.json" 2>&1 | tee "$OUT/inference.log"
else
    echo "== 2:4 semi-structured inference: needs compute capability >= 8.0, skipped"
fi

echo "== figures"
"$PY" benchmarks/scaling.py gpu_summary --out "$OUT" --model "$MODEL" --deepspeed "$CONFIG" \
    --world_size "$NGPU" --gpus "$GPUS" --batch "$BATCH" --seq "$SEQ"
