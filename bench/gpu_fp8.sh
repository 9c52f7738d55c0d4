#!/usr/bin/env bash
# GPU half of issue 13 in one call (default 8 minutes): blockwise FP8 vs bf16.
#
#     OUT=/some/dir bash bench/gpu_fp8.sh
#
# 1. bench/fp8_gemm.py: each FP8 GEMM checked against its dequantised product, then TFLOP/s of
#    the dense (6144 x 12288) and expert (6144 -> 2x2048 -> 6144) GEMMs, FP8 vs bf16
#    (fp8_gemm.json); whether torch's grouped scaled GEMM takes blockwise scales;
# 2. bench/train_step.py on proxy-h100 twice, bf16 then train.fp8=blockwise (train_step_bf16.json,
#    train_step_fp8.json): the step time FP8 vs bf16.
# Needs the Megatron-Core wheel in .whl/ and data/cache/stdlib.* carried (see gpu_env.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

echo "== FP8 vs bf16 GEMMs"
timeout -k 10 "$(left 150)" "$PY" bench/fp8_gemm.py --json "$OUT/fp8_gemm.json" > "$OUT/fp8.log" 2>&1
echo "fp8_gemm exit $?" >> "$OUT/fp8.log"
tail -20 "$OUT/fp8.log"

for run in bf16 fp8; do
  echo "== training step: proxy-h100, $run"
  extra=(); [ "$run" = fp8 ] && extra=(train.fp8=blockwise)
  rm -rf runs/proxy-h100
  timeout -k 10 "$(left 150)" "$PY" bench/train_step.py --json "$OUT/train_step_$run.json" train.iters=12 \
    logging.profile_at=10 logging.profile_steps=2 "${extra[@]}" >> "$OUT/fp8.log" 2>&1
  echo "train_step $run exit $?" >> "$OUT/fp8.log"
  tail -6 "$OUT/fp8.log"
done
echo "== done at $(date)"
