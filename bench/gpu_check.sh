#!/usr/bin/env bash
# GPU check of the DSA kernels (issue 15), one H100, inside a deadline (default 8 minutes):
#
#     OUT=/some/dir bash bench/gpu_check.sh [--dsa-case SPEC ...]
#
# 1. `pytest -m gpu tests/test_dsa_kernels.py` against float64 references (the built-in shapes,
#    or those given as --dsa-case, e.g. 'seq=8192,cp=1/4,docs=3,heads=64,topk=2048');
# 2. bench/dsa.py: indexer, sparse MLA fwd/bwd, indexer KL, one DSA layer vs dense SDPA, at
#    S = 4K..128K (SEQS to change), peak memory for each;
# 3. a short kernel-configuration sweep at 32K.
# Writes under $OUT: env.txt, kernel_tests.log, bench.log, dsa_bench.json (rewritten after each
# row, so a run cut short keeps what it measured).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
SEQS="${SEQS:-4096,16384,32768,65536,131072}"

echo "== DSA kernel GPU tests"
timeout -k 10 "$(left 170)" "$PY" -m pytest tests/test_dsa_kernels.py -m gpu -q -rfE --timeout 90 --durations=8 \
  -p no:cacheprovider "$@" > "$OUT/kernel_tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/kernel_tests.log"
tail -25 "$OUT/kernel_tests.log"

echo "== DSA benchmark"
timeout -k 10 "$(left 150)" "$PY" bench/dsa.py --seqs "$SEQS" --json "$OUT/dsa_bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
cat "$OUT/bench.log"

echo "== kernel configuration sweep (32K)"
timeout -k 10 "$(left 60)" "$PY" bench/dsa.py --seqs "" --sweep 32768 >> "$OUT/bench.log" 2>&1
echo "sweep exit $?" >> "$OUT/bench.log"
grep "^sweep" "$OUT/bench.log"
