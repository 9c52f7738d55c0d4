# Sourced by the GPU check scripts: Python, PYTHONPATH, the carried Megatron-Core wheel, a
# deadline, and env.txt. The GPU image has torch, Triton and transformers but no Megatron-Core:
# carry its cp312 wheel in .whl/ (see docs/benchmarks.md).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$OUT/env.txt" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi
# DEADLINE (epoch seconds) bounds the whole session: each step gets min(its own limit, time left).
DEADLINE="${DEADLINE:-$(( $(date +%s) + 480 ))}"
left() { local t=$(( DEADLINE - $(date +%s) )); local want=$1; (( t < want )) && want=$t; (( want < 1 )) && want=1; echo "$want"; }
if [ ! -s "$OUT/env.txt" ] || ! grep -q '^torch' "$OUT/env.txt"; then
  {
    date
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -1
  } >> "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
fi
