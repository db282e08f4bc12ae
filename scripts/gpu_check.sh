#!/usr/bin/env bash
# What only a GPU shows, in one command, on every visible GPU of one node:
#   1. a bf16 TAMT-KD search of config:bert-base-uncased (published shape, random weights) for 30 steps;
#   2. a 30-step masked fine-tune of that mask (GLUE SST-2 fixture shipped in tests/);
#   3. the output contract, tokens/s and model FLOPs utilisation, per-GPU peak memory (nvidia-smi)
#      and CUDA max allocated, with the memory model's prediction beside it.
# Figures: OUT/gpu_summary.md (paste into docs/scaling.md with the date and device) and OUT/gpu_summary.json.
#
#   scripts/gpu_check.sh [OUT]          (default OUT: outputs/gpu_check; BATCH=32 SEQ=128 by default)
#   PEAK_TFLOPS=989 scripts/gpu_check.sh    # the GPU's dense bf16 peak, if its name is not in the table
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
NGPU="$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)"
(( NGPU >= 1 )) || { echo "error: nvidia-smi lists no GPU" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: torch in .venv sees no CUDA device (CPU-only torch build?): install a CUDA build" >&2; exit 2; }
echo "== $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"

rm -rf "$OUT"
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

# The random model is built once (file lock) by whichever rank asks first; building it here
# keeps that out of the timed run.
"$PY" -c "from tamt_ds.models import resolve_model_path; print(resolve_model_path('$MODEL'))"

SMI_PID=""
sample_memory() {  # per-GPU memory.used (MiB) every 0.5 s into OUT/nvidia_smi_<phase>.csv
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia_smi_$1.csv" &
    SMI_PID=$!
}
stop_sampling() { [[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null || true; SMI_PID=""; }
trap stop_sampling EXIT

echo "== search: $MODEL, bf16, 30 steps, $BATCH x $SEQ tokens per GPU"
sample_memory search
"$DS" --num_gpus "$NGPU" --num_nodes 1 launchers/search.py \
    --model_name_or_path "$MODEL" --deepspeed "$CONFIG" --output_dir "$OUT/search" \
    --max_steps 30 --per_device_train_batch_size "$BATCH" --max_seq_length "$SEQ" \
    --logging_steps 10 --eval_steps 30 --save_steps 30 2>&1 | tee "$OUT/search.log"
stop_sampling

echo "== masked fine-tune: the search's mask, 30 steps"
sample_memory finetune
"$DS" --num_gpus "$NGPU" --num_nodes 1 launchers/finetune.py \
    --task sst2 --data_dir tests/fixtures/downstream/glue --model_name_or_path "$MODEL" \
    --mask "$OUT/search/mask.pt" --deepspeed "$CONFIG" --output_dir "$OUT/finetune" \
    --max_steps 30 --num_train_epochs 1000 --per_device_train_batch_size 4 2>&1 | tee "$OUT/finetune.log"
stop_sampling

echo "== figures"
"$PY" benchmarks/scaling.py gpu_summary --out "$OUT" --model "$MODEL" --deepspeed "$CONFIG" \
    --world_size "$NGPU" --batch "$BATCH" --seq "$SEQ"
