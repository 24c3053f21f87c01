#!/usr/bin/env bash
# Train with torchrun: the same command for 1 process, N processes and N nodes.
#
#   scripts/train.sh +experiment=demo                         # all local GPUs (or 1 CPU process)
#   NPROC_PER_NODE=2 scripts/train.sh +experiment=demo dist=deepspeed
#   # multi-node (run the same line on every node; see docs/cluster.md and slurm/train.sbatch):
#   NNODES=2 RDZV_ENDPOINT=node1:29400 RUN_DIR=/shared/runs/r1 scripts/train.sh +experiment=atlas_1m
#   scripts/train.sh --nnodes=2 --rdzv-endpoint=node1:29400 run.output_dir=/shared/runs/r1 +experiment=...
#
# Launcher options, as env or as leading --flags: NNODES (--nnodes, N; MIN:MAX only with MIN = MAX), RDZV_ENDPOINT
# (--rdzv-endpoint, host:port of the c10d rendezvous, on one of the nodes), RDZV_ID (--rdzv-id, same on
# all nodes of one job), LOCAL_ADDR (--local-addr, this node's address as the others reach it; needed
# when the hostname does not resolve to it), RDZV_CONF (--rdzv-conf, e.g. is_host=true on the node
# that serves the rendezvous store when torchrun cannot tell from its hostname), NODE_RANK (--node-rank, optional: c10d assigns node ranks),
# NPROC_PER_NODE (--nproc-per-node), MAX_RESTARTS (--max-restarts). Node rank, local rank and world size
# reach the trainer only through torchrun's env.
#
# The run directory is chosen ONCE, before the ranks start (RUN_DIR, or run.output_dir=...). Single node:
# default outputs/train-<timestamp> (under the current directory). Multi-node: required and on a disk every node shares, because each
# node computing its own timestamp would split the run in two.
# MAX_RESTARTS=n lets torchrun restart failed workers; they resume from the newest checkpoint (resume=auto).
set -euo pipefail
# No cd: relative paths in the overrides (data.store=, run.output_dir=, RUN_DIR) mean what they mean in
# the caller's directory, as for mva-train itself; the project is found from this script's location.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

RUN_DIR=${RUN_DIR:-}
ARGS=()   # overrides
FLAGS=()  # Hydra's flags: before every override (its parser takes no override after a flag)
while [ $# -gt 0 ]; do
  a=$1; shift
  case "$a" in
    --nnodes=*) NNODES=${a#*=} ;;
    --rdzv-endpoint=*|--rdzv_endpoint=*) RDZV_ENDPOINT=${a#*=} ;;
    --rdzv-id=*|--rdzv_id=*) RDZV_ID=${a#*=} ;;
    --local-addr=*|--local_addr=*) LOCAL_ADDR=${a#*=} ;;
    --node-rank=*|--node_rank=*) NODE_RANK=${a#*=} ;;
    --rdzv-conf=*|--rdzv_conf=*) RDZV_CONF=${a#*=} ;;
    --nproc-per-node=*|--nproc_per_node=*) NPROC_PER_NODE=${a#*=} ;;
    --max-restarts=*|--max_restarts=*) MAX_RESTARTS=${a#*=} ;;
    # Hydra's own flags go to mva-train (those with a value take the next argument along)
    --multirun|-m|--help|--hydra-help|--resolve|--shell-completion) FLAGS+=("$a") ;;
    --cfg|--info|--package|--config-name|--config-path|--config-dir|-c|-cn|-cp|-cd|-p|-i)
      FLAGS+=("$a"); [ $# -eq 0 ] || { FLAGS+=("$1"); shift; } ;;
    --cfg=*|--info=*|--package=*|--config-name=*|--config-path=*|--config-dir=*) FLAGS+=("$a") ;;
    --*) echo "train.sh: unknown launcher option $a" >&2; exit 2 ;;
    run.output_dir=*|++run.output_dir=*|+run.output_dir=*) RUN_DIR=${a#*run.output_dir=} ;;
    *) ARGS+=("$a") ;;
  esac
done

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  # one rank per GPU this job may use: nvidia-smi lists them all, CUDA_VISIBLE_DEVICES (set by Slurm or
  # the user; empty = none) is what torch sees, and a rank past it fails in torch.cuda.set_device
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    VISIBLE=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
    [ "$VISIBLE" -ge "$NPROC_PER_NODE" ] || NPROC_PER_NODE=$VISIBLE
  fi
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
case "$NNODES" in
  *:*) if [ "${NNODES%%:*}" != "${NNODES#*:}" ]; then
         # a run resumes only at the world size its checkpoints were written with (the stream position and
         # per-rank states are per rank): a job that re-formed with fewer nodes was refused at its resume anyway
         echo "train.sh: NNODES=$NNODES: an elastic node count cannot continue a run once it changes (a checkpoint" \
              "resumes only at its own world size); give one number and relaunch after losing a node" >&2
         exit 2
       fi
       NNODES=${NNODES%%:*} ;;
esac
if [ "$NNODES" != 1 ]; then
  # status 2 as every other refusal here (${VAR:?} exits 1)
  [ -n "${RDZV_ENDPOINT:-}" ] || { echo "train.sh: multi-node: set RDZV_ENDPOINT=host:port (or --rdzv-endpoint=) of the c10d rendezvous" >&2; exit 2; }
  [ -n "${RUN_DIR:-}" ] || { echo "train.sh: multi-node: set RUN_DIR (or run.output_dir=) to a directory all nodes share" >&2; exit 2; }
  LAUNCH=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-mva}")
  [ -z "${NODE_RANK:-}" ] || LAUNCH+=(--node-rank="$NODE_RANK")
  [ -z "${LOCAL_ADDR:-}" ] || LAUNCH+=(--local-addr="$LOCAL_ADDR")
  [ -z "${RDZV_CONF:-}" ] || LAUNCH+=(--rdzv-conf="$RDZV_CONF")
else
  LAUNCH=(--standalone)
  RUN_DIR=${RUN_DIR:-outputs/train-$(date +%Y%m%d-%H%M%S)}
fi
echo "[train.sh] $NNODES node(s) x $NPROC_PER_NODE process(es); run dir $RUN_DIR"
# torchrun without its launcher traceback: a failed rank's status (2 for a one-line mva-train error)
# becomes this script's (trainer/launch.py)
# (flags first: Hydra's parser takes no override after one of its flags, e.g. before a trailing --multirun
# the run dir came after it)
exec "$PY" -m trainer.launch "${LAUNCH[@]}" --nproc-per-node="$NPROC_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-0}" -m trainer.train "${FLAGS[@]}" "${ARGS[@]}" run.output_dir="$RUN_DIR"
