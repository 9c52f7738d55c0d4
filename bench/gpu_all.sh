#!/usr/bin/env bash
# Both GPU checks in one call (a lent machine's time is short): the DSA kernels, then the
# training step, sharing one deadline. `OUT=... bash bench/gpu_all.sh`; BUDGET in seconds.
set -uo pipefail
export DEADLINE=$(( $(date +%s) + ${BUDGET:-480} ))
export OUT="${OUT:-$PWD/gpu_check_out}"
here="$(dirname "$0")"
KERNEL_DEADLINE=$(( $(date +%s) + ${KERNEL_BUDGET:-250} ))
(( KERNEL_DEADLINE > DEADLINE )) && KERNEL_DEADLINE=$DEADLINE
DEADLINE=$KERNEL_DEADLINE bash "$here/gpu_check.sh"
bash "$here/gpu_model_check.sh"
echo "== done at $(date)"
