#!/usr/bin/env bash
# Launch `glm52 pretrain` with torchrun on one node or many. Cluster setup only: the model and
# everything else about the run come from --config and key=value overrides.
#
#   launch/torchrun.sh --config configs/tiny.yaml train.iters=50               # one node
#   launch/torchrun.sh --nnodes 4 --rdzv-endpoint node0:29400 --config ...    # run on every node
#   launch/torchrun.sh --dry-run --config ...                                 # print, do not run
#
# Launcher options (each also read from the environment variable in brackets):
#   --nnodes N             nodes in the job [NNODES, SLURM_NNODES]; default 1
#   --nproc-per-node N     training processes per node [NPROC_PER_NODE]; default: the GPUs
#                          visible here, or 1 on a CPU machine
#   --rdzv-endpoint H:P    c10d rendezvous, the same on every node [RDZV_ENDPOINT]; default with
#                          one node: a private one on this machine (torchrun --standalone)
#   --rdzv-id ID           rendezvous id [RDZV_ID, SLURM_JOB_ID]; default glm52
#   --node-rank R          this node's rank [NODE_RANK, SLURM_NODEID]; the node with rank 0 hosts
#                          the rendezvous store (c10d assigns the training ranks themselves)
#   --local-addr ADDR      the address other nodes reach this one at [LOCAL_ADDR]; default:
#                          what the host name resolves to
#   --ifname IF            network interface for gloo and NCCL [GLOO_SOCKET_IFNAME]
#   --max-restarts N       restart the processes of every node this many times after a failure
#                          (each restart resumes from the newest good checkpoint) [MAX_RESTARTS]
#   --dry-run              print the environment and the exact command, then exit
# Everything else (--config FILE, --resume, --init-from, key=value) goes to `glm52 pretrain`,
# which first checks it once, before torchrun starts (`glm52 pretrain --check-config`): a bad
# config, tokenizer or dataset is one sentence and exit status 2, never restarted.
#
# Signals: SIGUSR1 and SIGTERM sent to this script reach every training process, which finishes
# its step, saves a checkpoint and exits 0 (so does this script). torchrun itself ignores them.
# SIGINT (Ctrl-C) reaches them through torchrun, which kills them 30 s later, saved or not.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }

nnodes="${NNODES:-${SLURM_NNODES:-1}}"
nproc="${NPROC_PER_NODE:-}"
endpoint="${RDZV_ENDPOINT:-}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-glm52}}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-}}"
local_addr="${LOCAL_ADDR:-}"
ifname="${GLOO_SOCKET_IFNAME:-}"
max_restarts="${MAX_RESTARTS:-0}"
dry_run=0
train_args=()

need_value() { [ "$2" -ge 2 ] || die "$1 needs a value."; }
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes) need_value "$1" $#; nnodes="$2"; shift 2 ;;
        --nproc-per-node|--nproc_per_node) need_value "$1" $#; nproc="$2"; shift 2 ;;
        --rdzv-endpoint|--rdzv_endpoint) need_value "$1" $#; endpoint="$2"; shift 2 ;;
        --rdzv-id|--rdzv_id) need_value "$1" $#; rdzv_id="$2"; shift 2 ;;
        --node-rank|--node_rank) need_value "$1" $#; node_rank="$2"; shift 2 ;;
        --local-addr|--local_addr) need_value "$1" $#; local_addr="$2"; shift 2 ;;
        --ifname) need_value "$1" $#; ifname="$2"; shift 2 ;;
        --max-restarts|--max_restarts) need_value "$1" $#; max_restarts="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) train_args+=("$1"); shift ;;
    esac
done

has_config=0
for a in "${train_args[@]+"${train_args[@]}"}"; do
    case "$a" in --config|--config=*) has_config=1 ;; esac
done
[ "$has_config" = 1 ] || die "give --config FILE (and any key=value overrides)."
for v in "$nnodes" "$max_restarts" ${nproc:+"$nproc"}; do
    [[ "$v" =~ ^[0-9]+$ ]] || die "'$v' is not a whole number."
done

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        gpus="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)"
    fi
fi
nproc="${nproc:-$(( gpus > 0 ? gpus : 1 ))}"

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi

# ---- environment of the training processes --------------------------------------------------
cores="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# A failed or timed-out NCCL collective ends the process instead of hanging it (older torch
# reads the name without TORCH_); Megatron-Core's overlap of communication and compute needs
# CUDA_DEVICE_MAX_CONNECTIONS=1. Both are harmless on CPUs.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="$TORCH_NCCL_ASYNC_ERROR_HANDLING"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# torch 2.13 shares the rendezvous TCPStore with the workers across restarts without a per-attempt
# prefix: after --max-restarts kicks in, the new processes read the dead ones' gloo/NCCL addresses.
# A fresh store per attempt (hosted by rank 0) avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [ -n "$ifname" ]; then
    export GLOO_SOCKET_IFNAME="$ifname"
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ifname}"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

# ---- the torchrun command -------------------------------------------------------------------
cmd=("$python" -m torch.distributed.run
     --nproc-per-node "$nproc"
     --max-restarts "$max_restarts"
     --signals-to-handle SIGINT,SIGHUP,SIGQUIT)
if [ "$nnodes" = 1 ] && [ -z "$endpoint" ]; then
    cmd+=(--standalone --nnodes 1)
else
    [ -n "$endpoint" ] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the same on every node)."
    [[ "$endpoint" == *:* ]] || die "--rdzv-endpoint '$endpoint' is not HOST:PORT."
    cmd+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id")
    # The store lives on node 0 (or on the node that owns the endpoint's address).
    if [ "$node_rank" = 0 ] || { [ -n "$local_addr" ] && [ "${endpoint%:*}" = "$local_addr" ]; }; then
        cmd+=(--rdzv-conf is_host=1)
    elif [ -n "$node_rank" ] || [ -n "$local_addr" ]; then
        cmd+=(--rdzv-conf is_host=0)
    fi
fi
[ -z "$local_addr" ] || cmd+=(--local-addr "$local_addr")
cmd+=(-m glm52_train.cli pretrain "${train_args[@]}")

if [ "$dry_run" = 1 ]; then
    for v in OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_ASYNC_ERROR_HANDLING \
             CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG TORCH_DISABLE_SHARE_RDZV_TCP_STORE \
             GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME PYTHONPATH; do
        [ -z "${!v:-}" ] || printf '%s=%q \\\n' "$v" "${!v}"
    done
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi

# The config, its tokenizer and data are checked once, here, before torchrun starts: a mistake is
# one sentence and exit status 2, with no torchrun report and no restarts.
WORLD_SIZE="$(( nnodes * nproc ))" LOCAL_WORLD_SIZE="$nproc" \
    "$python" -m glm52_train.cli pretrain --check-config "${train_args[@]}" || exit $?

# A configuration error found later is the same sentence on every process, followed by torchrun's report of
# the failed processes: the processes write it to this file instead, and it is printed once, last.
error_file="$(mktemp "${TMPDIR:-/tmp}/glm52-error.XXXXXX")"
export GLM52_ERROR_FILE="$error_file"

# torchrun ignores SIGUSR1 and SIGTERM (so do the training processes until the driver installs
# its handlers: a signal that early is lost, not fatal); this script forwards them to torchrun's
# children, the training processes, by parent pid.
(trap '' USR1 TERM; exec "${cmd[@]}") &
launcher=$!
trap 'pkill -USR1 -P "$launcher" || true' USR1
trap 'pkill -TERM -P "$launcher" || true' TERM
trap 'kill -INT "$launcher" 2>/dev/null || true' INT

while :; do
    wait "$launcher" && status=0 || status=$?   # returns early when a trapped signal arrives
    kill -0 "$launcher" 2>/dev/null || break
done
if [ -s "$error_file" ]; then
    head -n 1 "$error_file" >&2
    status=2
fi
rm -f "$error_file"
exit "$status"
