#!/usr/bin/env bash
# Train with torchrun: the same command for 1 process, N processes and N nodes.
#
#   scripts/train.sh +experiment=demo                         # all local GPUs (or 1 CPU process)
#   NPROC_PER_NODE=2 scripts/train.sh +experiment=demo dist=deepspeed
#   NNODES=4 NODE_RANK=$i RDZV_ENDPOINT=host:29500 scripts/train.sh +experiment=atlas_1m   # see slurm/
#
# The run directory is chosen ONCE here, before the ranks start (RUN_DIR, or run.output_dir=...,
# else outputs/train-<timestamp>); each rank computing its own timestamp could split a run in two.
# MAX_RESTARTS=n lets torchrun restart failed workers; they resume from the newest checkpoint (resume=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
RUN_DIR=${RUN_DIR:-}
ARGS=()
for a in "$@"; do
  case "$a" in
    run.output_dir=*) RUN_DIR=${a#run.output_dir=} ;;
    *) ARGS+=("$a") ;;
  esac
done
RUN_DIR=${RUN_DIR:-outputs/train-$(date +%Y%m%d-%H%M%S)}

NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  LAUNCH=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --rdzv_backend=c10d
          --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" --rdzv_id="${RDZV_ID:-mva}")
else
  LAUNCH=(--standalone)
fi
echo "[train.sh] $NNODES node(s) x $NPROC_PER_NODE process(es); run dir $RUN_DIR"
exec "$PY" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-0}" -m trainer.train "${ARGS[@]}" run.output_dir="$RUN_DIR"
