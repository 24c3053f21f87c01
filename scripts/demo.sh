#!/usr/bin/env bash
# make demo: write a synthetic multiome store, train MultiVI briefly on 2 processes, show the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-disabled}
STORE=outputs/demo/store
RUN=outputs/demo/run-$(date +%Y%m%d-%H%M%S)

if [ ! -f "$STORE/zarr.json" ]; then
  echo "[demo] writing a synthetic store (4,000 cells, 500 genes, 2,000 peaks) to $STORE"
  "$PY" -m data.synthetic out="$STORE" overwrite=true progress=false \
    hydra.run.dir=outputs/demo/.synth hydra.output_subdir=null
fi
echo "[demo] training on 2 processes (torchrun, gloo)"
NPROC_PER_NODE=2 bash scripts/train.sh +experiment=demo data.store="$STORE" run.output_dir="$RUN"
if [ -f trainer/infer.py ] && "$PY" -m trainer.infer --help >/dev/null 2>&1; then
  echo "[demo] inference entry point found: see README (mva-infer) to write the embedding"
fi
echo "[demo] done. run directory: $RUN"
echo "[demo]   model:    $RUN/model/ (model.safetensors + model.json)"
echo "[demo]   metrics:  $RUN/metrics.jsonl, loss curves: $RUN/loss.png"
