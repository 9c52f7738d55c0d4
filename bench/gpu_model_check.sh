#!/usr/bin/env bash
# GPU check of the training step (issue 16), one H100, inside a deadline (default 8 minutes):
#
#     OUT=/some/dir bash bench/gpu_model_check.sh
#
# 1. bench/train_step.py: `glm52 pretrain --config configs/proxy_h100.yaml` (20 steps at 4K,
#    bf16, DSA kernels): tokens/s, TFLOP/s, MFU, peak memory against `glm52 plan`, and the
#    profile of steps 16-18 by model part;
# 2. bench/long_context_layer.py: the longest sequence one full-width DSA layer trains at;
# 3. tests/test_gpu_model.py: the model's kernel path against its PyTorch path on the GPU.
# Writes under $OUT: env.txt, model.log, train_step.json, ops.txt (the profiler's op table),
# long_context.json. Needs data/cache/stdlib.{bin,idx,json} (`make data`; carry them).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

echo "== training step: proxy-h100, 4K, bf16"
rm -rf runs/proxy-h100
timeout -k 10 "$(left 150)" "$PY" bench/train_step.py --json "$OUT/train_step.json" "$@" > "$OUT/model.log" 2>&1
echo "train_step exit $?" >> "$OUT/model.log"
cp runs/proxy-h100/profile/ops_rank0.txt "$OUT/ops.txt" 2>/dev/null
tail -30 "$OUT/model.log"

echo "== longest sequence for one full-width DSA layer (dense FFN)"
timeout -k 10 "$(left 70)" "$PY" bench/long_context_layer.py --layer dense --json "$OUT/long_context.json" >> "$OUT/model.log" 2>&1
echo "long_context exit $?" >> "$OUT/model.log"
tail -12 "$OUT/model.log"

echo "== model GPU test"
timeout -k 10 "$(left 60)" "$PY" -m pytest tests/test_gpu_model.py -m gpu -q -rfE -p no:cacheprovider >> "$OUT/model.log" 2>&1
echo "model test exit $?" >> "$OUT/model.log"
tail -5 "$OUT/model.log"
