#!/usr/bin/env bash
# One node's torchrun, started by srun from scripts/slurm/*.sbatch on EVERY node. What differs between
# nodes is worked out here, on the node: the batch step runs on the first node only, so an address
# expanded there would be that node's for all of them.
#
#   LOCAL_ADDR_CMD   a command printing this node's address as the others reach it, run on each node
#                    (e.g. 'hostname -i', or "ip -4 -o addr show ib0 | awk '{print \$4}' | cut -d/ -f1")
#   LOCAL_ADDR       one fixed address (right only where the step runs once per host, as in our tests)
# Arguments: torchrun's, then -m trainer.train / trainer.infer and its overrides. $PY: the Python to use.
set -euo pipefail
ADDR=()
if [ -n "${LOCAL_ADDR_CMD:-}" ]; then
  ADDR=(--local-addr="$(eval "$LOCAL_ADDR_CMD")")
elif [ -n "${LOCAL_ADDR:-}" ]; then
  ADDR=(--local-addr="$LOCAL_ADDR")
fi
# torchrun without its launcher traceback on a refused setting (trainer/launch.py)
exec "${PY:-python3}" -m trainer.launch "${ADDR[@]}" "$@"
