#!/usr/bin/env bash
# GPU check of the DSA kernels: the GPU tests, then the benchmark table (and a kernel-config
# sweep at 32K). One H100, under 9 minutes. Run from the repository root:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Writes under $OUT: env.txt, gpu_tests.log, bench.log, dsa_bench.json (rewritten after every
# row, so a run cut short keeps what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Megatron-Core for baseline (c): install a carried wheel if it is not importable yet.
if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  whl=$(ls shared/megatron_core-*.whl megatron_core-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] && "$PY" -m pip install --no-deps --quiet "$whl" >> "$OUT/env.txt" 2>&1
fi

echo "== GPU tests"
timeout 180 "$PY" -m pytest tests/test_dsa_kernels.py -m gpu -v -rA --durations=10 -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.log"
tail -25 "$OUT/gpu_tests.log"

echo "== benchmark"
timeout 320 "$PY" bench/dsa.py --seqs 4096,16384,65536,131072 --sweep 32768 --json "$OUT/dsa_bench.json" \
  > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
cat "$OUT/bench.log"
