#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): MiLoRA init on LLaMA-2-7B shapes on the device (the paper's
# float32 SVD vs milora auto) and a bfloat16 training step, MiLoRA vs LoRA. Under 8 minutes on
# one H200 (estimate in benchmarks/RESULTS.md); writes results.json, results.md and the device
# description to OUTPUT_DIR (default: $OUT if set, else gpu_check_results).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gpu   # a specific interpreter
#   bash benchmarks/gpu_check.sh /tmp/gpu --device cpu --tiny       # extra arguments go to gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-${OUT:-gpu_check_results}}"
shift || true
python="${PYTHON:-python3}"
mkdir -p "$output"
{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"; } > "$output/device.txt"
# 470 s: the script skips parts past its own 420 s budget; this is the backstop
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$python" benchmarks/gpu_check.py --output "$output" "$@" 2>&1 | tee "$output/log.txt"
