#!/usr/bin/env bash
# The ShapesWorld model on one CUDA GPU in under 10 minutes, as one prepared script (run from the repository root):
#
#   OUT=/path/to/output bash train/recipes/shapesworld_gpu.sh            # on the GPU machine
#   OUT=/tmp/gpu-dry-run bash train/recipes/shapesworld_gpu.sh --dry-run  # the same chain at tiny sizes, CPU, fp32
#
# From the shipped teacher and tokenizer: pre-tokenizes ShapesWorld into index shards (on the GPU machine, so nothing
# large travels), trains stage 1 and stage 2 in bf16 with batches of 256 under wall-clock limits (tokens/s and MFU in
# each stage's train_log.csv), writes the report card and the speed card of the 7B shape. Everything lands in $OUT:
# pretrain/ and sft/ (the checkpoint folder), report/, speed/, data/, commands.sh, recipe.json, gpu.txt, recipe.log.
# Run again after an interruption: finished stages are skipped, a stopped stage resumes from its last checkpoint.
set -euo pipefail
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"; } > "$OUT/gpu.txt"
python -m train.recipes.shapesworld --budget h200 --from-shipped --output-dir "$OUT" "$@" 2>&1 | tee -a "$OUT/recipe.log"
