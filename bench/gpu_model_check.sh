#!/usr/bin/env bash
# GPU measurements of the model (issues 4 and 7), one H100, under 9 minutes. From the repo root:
#
#     OUT=/some/dir bash bench/gpu_model_check.sh
#
# Needs megatron-core importable (carry its cp312 wheel: see docs/benchmarks.md). Writes under
# $OUT: gpu_model_tests.log, proxy_memory.json (plan estimate vs measured peak for proxy-h100),
# long_context_dense.json / long_context_moe.json (longest sequence for one full-width layer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_model_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== model GPU tests"
timeout 120 "$PY" -m pytest tests/test_gpu_model.py -m gpu -v -rA -p no:cacheprovider > "$OUT/gpu_model_tests.log" 2>&1
tail -15 "$OUT/gpu_model_tests.log"

echo "== proxy-h100 memory: plan estimate vs measured"
timeout 150 "$PY" bench/proxy_memory.py --seq-len 4096 --steps 3 --json "$OUT/proxy_memory.json" 2>&1 | tail -4

echo "== longest sequence for one full-width layer"
timeout 120 "$PY" bench/long_context_layer.py --layer dense --json "$OUT/long_context_dense.json" 2>&1 | tail -25
timeout 120 "$PY" bench/long_context_layer.py --layer moe --experts 32 --json "$OUT/long_context_moe.json" 2>&1 | tail -25
