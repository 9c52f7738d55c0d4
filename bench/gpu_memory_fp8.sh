#!/usr/bin/env bash
# One device call for the third GPU session (default 8 minutes, one shared deadline):
#
#     OUT=/some/dir BUDGET=480 bash bench/gpu_memory_fp8.sh
#
# 1. bench/stage_memory.py (issue 17): what rank 1 of the 352-GPU layout keeps per micro-batch
#    (8 full-width MoE layers, sequence 2048), selective / full / no recomputation, against
#    `glm52 plan` (stage_memory.json);
# 2. tests/test_gpu_model.py with TRITON_F32_DEFAULT=ieee: whether TF32 in the kernels' fp32
#    dots is what failed the check in the first session (model_ieee.log);
# 3. bench/gpu_fp8.sh (issue 13): FP8 vs bf16 GEMMs and training step, with what time is left.
set -uo pipefail
export DEADLINE=$(( $(date +%s) + ${BUDGET:-480} ))
export OUT="${OUT:-$PWD/gpu_check_out}"
source "$(dirname "$0")/gpu_env.sh"

echo "== stage memory: rank 1 of TP1 PP11 EP32, 8 MoE layers at full width"
timeout -k 10 "$(left 150)" "$PY" bench/stage_memory.py --json "$OUT/stage_memory.json" > "$OUT/stage_memory.log" 2>&1
echo "stage_memory exit $?" >> "$OUT/stage_memory.log"
tail -8 "$OUT/stage_memory.log"

echo "== model GPU test, IEEE fp32 dots in Triton"
TRITON_F32_DEFAULT=ieee timeout -k 10 "$(left 80)" "$PY" -m pytest tests/test_gpu_model.py -m gpu -q -rfE \
  -p no:cacheprovider > "$OUT/model_ieee.log" 2>&1
echo "model test (ieee) exit $?" >> "$OUT/model_ieee.log"
tail -4 "$OUT/model_ieee.log"

bash "$(dirname "$0")/gpu_fp8.sh"
