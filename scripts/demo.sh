#!/usr/bin/env bash
# make demo: write a synthetic multiome store, train MultiVI briefly on 2 processes, embed every cell.
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
echo "[demo] writing the joint embedding (mva-infer job=embed, 2 processes)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m trainer.infer \
  model_dir="$RUN" store="$STORE" output="$RUN/embed.zarr"
echo "[demo] done. run directory: $RUN"
echo "[demo]   model:    $RUN/model/ (model.safetensors + model.json)"
echo "[demo]   embedding: $RUN/embed.zarr (anndata.read_zarr; obsm['X_multivi'])"
echo "[demo]   metrics:  $RUN/metrics.jsonl, loss curves: $RUN/loss.png"
