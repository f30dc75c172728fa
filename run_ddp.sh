#!/usr/bin/env bash
# Launch train_ddp.py under torchrun (DDP) for one config. See README_DDP.md.
#
#   ./run_ddp.sh CONFIG [train_ddp.py args...]
#
#   ./run_ddp.sh configs/default.yaml                      # every GPU of this machine
#   NPROC=2 ./run_ddp.sh configs/quick_test.yaml --dry-run # plan for 2 processes, trains nothing
#   ./run_ddp.sh configs/default.yaml --set phase2.temperature=0.05 --log-level DEBUG
#
# Environment (all optional):
#   NPROC          processes per node (default: GPUs listed by `nvidia-smi -L`, limited to CUDA_VISIBLE_DEVICES;
#                  1 process on CPU when there is no GPU)
#   NNODES         nodes, or MIN:MAX for an elastic range (default 1). 1 -> torchrun --standalone
#   RDZV_BACKEND   c10d (default) or static, used when NNODES > 1
#   RDZV_ENDPOINT  HOST:PORT of the c10d rendezvous, same on every node (default MASTER_ADDR:MASTER_PORT)
#   RDZV_ID        rendezvous id, same on every node (default slurm-$SLURM_JOB_ID, else distill-<config name>)
#   RDZV_CONF      extra c10d rendezvous settings, e.g. join_timeout=1800 (torch's default join timeout: 600 s)
#   MASTER_ADDR    first node's address (multi-node; with RDZV_BACKEND=static it is torchrun's --master-addr)
#   MASTER_PORT    default 29500
#   NODE_RANK      this node's rank, 0..NNODES-1 (only RDZV_BACKEND=static uses it; c10d assigns ranks itself)
#   MAX_RESTARTS   times torchrun restarts all workers after a failure (default 0); the restarted trainer
#                  resumes from the newest checkpoint automatically (so --overwrite is refused then)
#   OMP_NUM_THREADS default: CPU cores of this node / NPROC (at least 1)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits after forwarding SIGTERM before SIGKILL (default
#                  here 90, torch's own default is 30): time for the trainer to finish its step and save
#   PYTHON         interpreter to run `python -m torch.distributed.run` with (default: `torchrun` from PATH,
#                  else python3)
set -euo pipefail

prog=run_ddp.sh

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
    echo "$prog: error: $*" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

if [[ $# -lt 1 ]]; then
    usage >&2
    die "missing CONFIG (a YAML file, e.g. configs/default.yaml)"
fi
case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    --config)  # tolerate the train_ddp.py spelling: run_ddp.sh --config FILE ...
        shift
        [[ $# -ge 1 ]] || die "--config needs a file"
        ;;
esac
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file not found: $CONFIG"
for arg in "$@"; do
    if [[ $arg == --config || $arg == --config=* ]]; then
        die "give the config once, as the first argument (got $arg too)"
    fi
done

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
train_script=$script_dir/train_ddp.py
[[ -f $train_script ]] || die "train_ddp.py not found next to $prog (looked for $train_script)"

# ---- processes per node ----------------------------------------------------------------------------------------
count_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if [[ $n -gt 0 && -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local visible=0 ids=()
        if [[ -n $CUDA_VISIBLE_DEVICES && $CUDA_VISIBLE_DEVICES != -1 ]]; then
            IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
            visible=${#ids[@]}
        fi
        if ((visible < n)); then n=$visible; fi
    fi
    echo "$n"
}

gpus=$(count_gpus)
if [[ -n ${NPROC:-} ]]; then
    is_uint "$NPROC" && ((NPROC >= 1)) || die "NPROC must be a positive integer, got '$NPROC'"
    if ((gpus > 0 && NPROC > gpus)); then
        die "NPROC=$NPROC but only $gpus GPU(s) are visible; every process needs its own GPU"
    fi
elif ((gpus > 0)); then
    NPROC=$gpus
else
    NPROC=1
fi
if ((gpus > 0)); then
    device_note="GPU, NCCL backend ($gpus GPU(s) visible)"
else
    device_note="CPU, gloo backend: no GPU found by nvidia-smi"
fi

# ---- threads ------------------------------------------------------------------------------------------------------
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$((cores / NPROC))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}

# ---- nodes and rendezvous -----------------------------------------------------------------------------------------
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be N or MIN:MAX (positive integers), got '$NNODES'"
is_uint "$MASTER_PORT" || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
is_uint "$MAX_RESTARTS" || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"

if ((MAX_RESTARTS > 0)); then
    for arg in "$@"; do
        if [[ $arg == --overwrite ]]; then
            die "--overwrite with MAX_RESTARTS=$MAX_RESTARTS would delete the run again at every restart instead of" \
                "resuming; delete the run folder (paths.output_dir/<experiment>) yourself, or use MAX_RESTARTS=0"
        fi
    done
fi

config_name=$(basename "$CONFIG")
config_name=${config_name%.*}
if [[ $NNODES == 1 || $NNODES == 1:1 ]]; then
    # A private rendezvous on a free local port: concurrent single-node jobs never collide (MASTER_PORT unused).
    launch=(--standalone --nnodes=1)
    node_note="1 node (standalone rendezvous on a free local port)"
else
    RDZV_BACKEND=${RDZV_BACKEND:-c10d}
    case "$RDZV_BACKEND" in
        static)
            [[ $NNODES != *:* ]] || die "RDZV_BACKEND=static needs a fixed NNODES, got '$NNODES'"
            [[ -n ${MASTER_ADDR:-} ]] ||
                die "NNODES=$NNODES with RDZV_BACKEND=static needs MASTER_ADDR (the node with NODE_RANK=0)"
            [[ -n ${NODE_RANK:-} ]] ||
                die "NNODES=$NNODES with RDZV_BACKEND=static needs NODE_RANK (0..$((NNODES - 1))) on every node"
            is_uint "$NODE_RANK" && ((NODE_RANK < NNODES)) ||
                die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
            launch=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR"
                --master-port="$MASTER_PORT")
            node_note="$NNODES nodes, static rendezvous at $MASTER_ADDR:$MASTER_PORT, this is node $NODE_RANK"
            ;;
        *)
            endpoint=${RDZV_ENDPOINT:-}
            if [[ -z $endpoint ]]; then
                [[ -n ${MASTER_ADDR:-} ]] ||
                    die "NNODES=$NNODES needs RDZV_ENDPOINT=HOST:PORT or MASTER_ADDR (a host every node can reach)"
                endpoint=$MASTER_ADDR:$MASTER_PORT
            fi
            RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:+slurm-$SLURM_JOB_ID}}
            RDZV_ID=${RDZV_ID:-distill-$config_name}
            launch=(--nnodes="$NNODES" --rdzv-backend="$RDZV_BACKEND" --rdzv-endpoint="$endpoint" --rdzv-id="$RDZV_ID")
            if [[ -n ${RDZV_CONF:-} ]]; then
                launch+=(--rdzv-conf="$RDZV_CONF")
            fi
            node_note="$NNODES nodes, $RDZV_BACKEND rendezvous at $endpoint (id $RDZV_ID)"
            ;;
    esac
fi

# ---- launcher -----------------------------------------------------------------------------------------------------
if [[ -n ${PYTHON:-} ]]; then
    runner=("$PYTHON" -m torch.distributed.run)
elif command -v torchrun >/dev/null 2>&1; then
    runner=(torchrun)
elif command -v python3 >/dev/null 2>&1; then
    runner=(python3 -m torch.distributed.run)
elif command -v python >/dev/null 2>&1; then
    runner=(python -m torch.distributed.run)
else
    die "neither torchrun nor python3/python found on PATH (set PYTHON=/path/to/python)"
fi

extra_launch=()
for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then
        extra_launch=(--local-ranks-filter=0)  # every rank prints the same plan: show local rank 0's only
    fi
done

cmd=("${runner[@]}" "${launch[@]}" --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" "${extra_launch[@]}"
    "$train_script" --config "$CONFIG" "$@")

echo "$prog: config $CONFIG"
echo "$prog: $node_note; $NPROC process(es) per node on $device_note"
echo "$prog: OMP_NUM_THREADS=$OMP_NUM_THREADS, MAX_RESTARTS=$MAX_RESTARTS (restarts resume from the newest checkpoint)"
printf '%s: running:' "$prog"
printf ' %q' "${cmd[@]}"
printf '\n'
exec "${cmd[@]}"
