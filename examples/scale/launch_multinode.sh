#!/usr/bin/env bash
# One node's part of a multi-node run: ROLE=train runs torchrun for the actor, ROLE=rollout runs
# SGLang servers for the trainer to attach to (disaggregated configs). Run it on every node.
#
#   examples/scale/launch_multinode.sh CONFIG.yaml [section.field=value ...]
#
# ROLE=train (default) needs:
#   NNODES          training nodes (not counting rollout nodes)
#   NODE_RANK       this node's rank among them, 0 .. NNODES-1
#   MASTER_ADDR     address of training node 0;  MASTER_PORT (default 29500)
#   ROLLOUT_URLS    disaggregated configs: comma-separated SGLang servers, http://host:port,...
#                   (becomes rollout.sglang.server_urls); ROUTER_URL optional (generate requests
#                   then go through the router; weight updates still reach every server)
#   GPUS_PER_NODE   default 8
# ROLE=rollout needs:
#   MODEL_PATH      the same HF checkpoint as model.path
#   ENGINE_TP       GPUs per server (rollout.sglang.tp_size); GPUS_PER_NODE / ENGINE_TP servers
#   SGLANG_PORT     first server's port (default 30000); server i listens on SGLANG_PORT + i
#   SGLANG_ARGS     extra sglang.launch_server arguments (optional)
# Disaggregated configs sync weights through rollout.sglang.disk_dir: it must be the same path
# on every node (a shared filesystem).
set -euo pipefail

die() { echo "launch_multinode.sh: $*" >&2; exit 2; }
need() { [[ -n "${!1:-}" ]] || die "$1 is not set: $2"; }
integer() { [[ "${!1}" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer; got '${!1}'"; }

ROLE="${ROLE:-train}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
integer GPUS_PER_NODE

# NCCL / runtime hints; values already in the environment win.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"          # nothing is downloaded at run time
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"        # long collectives on busy fabrics
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron TP overlap
# Set NCCL_SOCKET_IFNAME (e.g. ib0, eth0) and NCCL_IB_HCA (e.g. mlx5) for your cluster if NCCL
# picks the wrong interface; NCCL_DEBUG=INFO shows what it chose.

wait_healthy() {  # url timeout_s
  local deadline=$((SECONDS + $2))
  until curl -fsS -m 10 "$1/health" > /dev/null 2>&1; do
    (( SECONDS < deadline )) || die "$1/health did not answer within $2 s"
    sleep 5
  done
}

case "$ROLE" in
  rollout)
    need MODEL_PATH "the HF checkpoint directory the servers load"
    need ENGINE_TP "GPUs per SGLang server (rollout.sglang.tp_size)"
    integer ENGINE_TP
    (( ENGINE_TP >= 1 && GPUS_PER_NODE % ENGINE_TP == 0 )) \
      || die "ENGINE_TP=$ENGINE_TP must divide GPUS_PER_NODE=$GPUS_PER_NODE"
    SGLANG_PORT="${SGLANG_PORT:-30000}"
    integer SGLANG_PORT
    read -r -a extra <<< "${SGLANG_ARGS:-}"
    pids=()
    trap 'kill "${pids[@]}" 2> /dev/null || true' EXIT
    for ((i = 0; i < GPUS_PER_NODE / ENGINE_TP; i++)); do
      python -m sglang.launch_server --model-path "$MODEL_PATH" --host 0.0.0.0 \
        --port $((SGLANG_PORT + i)) --tp-size "$ENGINE_TP" --base-gpu-id $((i * ENGINE_TP)) \
        "${extra[@]}" &
      pids+=($!)
      echo "sglang server $i: http://$(hostname):$((SGLANG_PORT + i)) (pid ${pids[-1]})"
    done
    wait -n "${pids[@]}"   # one server exiting ends this node's part (and stops the others)
    die "an SGLang server exited"
    ;;
  train)
    [[ $# -ge 1 ]] || die "usage: launch_multinode.sh CONFIG.yaml [section.field=value ...]"
    [[ -f "$1" ]] || die "config $1 does not exist"
    need NNODES "number of training nodes"
    need NODE_RANK "this node's rank among the training nodes (0 .. NNODES-1)"
    need MASTER_ADDR "address of training node 0"
    MASTER_PORT="${MASTER_PORT:-29500}"
    integer NNODES; integer NODE_RANK; integer MASTER_PORT
    (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
    config="$1"; shift
    overrides=()
    if [[ -n "${ROLLOUT_URLS:-}" ]]; then
      IFS=, read -r -a urls <<< "$ROLLOUT_URLS"
      for url in "${urls[@]}"; do wait_healthy "$url" "${ROLLOUT_WAIT_S:-1800}"; done
      overrides+=("rollout.sglang.server_urls=[$ROLLOUT_URLS]")
      [[ -z "${ROUTER_URL:-}" ]] || overrides+=("rollout.sglang.router_url=$ROUTER_URL")
    fi
    exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
      --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
      -m megatron_archer.cli train "$config" "${overrides[@]}" "$@"
    ;;
  *) die "ROLE must be train or rollout; got '$ROLE'" ;;
esac
