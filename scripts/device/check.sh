#!/usr/bin/env bash
# The one prepared GPU check (issue #4): everything only a GPU shows, in one call of the device tool.
#
#   here, once:  bash scripts/device/fetch_wheels.sh      (wheels of what the device image lacks -> .whl/)
#   device run:  command="bash scripts/device/check.sh", carry=[".whl"], timeout_s=560
#
# Steps (each timed and logged; a failing step is recorded and the next one still runs):
#   env        nvidia-smi, torch / CUDA / bf16 support
#   parity     tests/test_gpu.py: loss, gradients (float64) and one float32 train step on the GPU = on the CPU
#   gpu_step   scripts/bench/gpu_step.py: cells/s of the training step, fp32 and bf16 autocast, batch 1,024,
#              2,000 x 10,000 and 20,000 x 100,000 (-> gpu_step.json)
#   synth      a synthetic store (mva-synth)
#   ddp        mva-train under torchrun on one GPU (NCCL), bf16 autocast, LR plateau on, early stopping on
#   resume     the same run continued for more epochs (resume=auto)
#   deepspeed  mva-train with DeepSpeed ZeRO 2, bf16 weights, LR plateau on, the lognormal RNA library
#   ds_cpu     DeepSpeed with dist.device=cpu on the GPU node: a few steps on DeepSpeed's CPU accelerator
#   embed      mva-infer job=embed on the GPU, and the same with device=cpu: the latents compared
#   sample     the same with posterior samples (give_mean=false, one seed) on both devices: compared
#   api        the notebook API (trainer.api) on its default device vs the CPU: latents and ELBO
#   expression mva-infer job=expression on the GPU
# Results: $OUT/check.log (every step's output), $OUT/summary.json (per step: rc, seconds; per run: the last
# records of metrics.jsonl; the GPU-vs-CPU latent difference), $OUT/gpu_step.json.
#
# The GPU steps run with device=cuda (dist.device=cuda): a silent fall-back to the CPU would fail them.
# On the CPU (tests/test_device_check_script.py): SMALL=1 PRECISION=fp32 PY=.venv/bin/python NO_WHEELS=1 DEVICE=auto.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/device_check}
PY=${PY:-python3}
PRECISION=${PRECISION:-bf16}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$(mktemp -d /tmp/mva-check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/check.log
STEPS=$OUT/steps.tsv
: >"$LOG"
: >"$STEPS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} WANDB_MODE=disabled PYTHONUNBUFFERED=1

if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  # the device image has torch, numpy, pandas, scipy, h5py, ... but not zarr, hydra, anndata, DeepSpeed, ...
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "${SMALL:-}" ]; then
  CELLS=600 GENES=60 REGIONS=200 BATCH=64 EPOCHS=2 MORE=3 SIZES=40x300 STEPS_N=2 WARM=1 GPU_BATCH=32
else
  CELLS=20000 GENES=2000 REGIONS=10000 BATCH=1024 EPOCHS=3 MORE=5 SIZES=2000x10000,20000x100000 STEPS_N=30 WARM=5
  GPU_BATCH=1024
fi
STORE=$WORK/store
TRAIN=("data.store=$STORE" "data.batch_size=$BATCH" "logger.wandb_mode=disabled" "run.seed=0"
       "optim.reduce_lr_on_plateau=true" "optim.lr_patience=1" "dist.device=$DEVICE")

STEP_TIMEOUT=${STEP_TIMEOUT:-150}  # seconds per step: a hung step (an NCCL wait, say) must not eat the whole call

step() {  # step NAME CMD...: run, time, log; never stops the script (rc 124: the step ran past STEP_TIMEOUT)
  local name=$1 t0 rc
  shift
  echo "=== $name: $*" >>"$LOG"
  t0=$(date +%s%N)
  timeout -k 10 "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1
  rc=$?
  printf "%s\t%s\t%s\n" "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$STEPS"
  echo "=== $name: rc $rc" >>"$LOG"
  echo "$name: rc $rc"
}

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)

step env "$PY" -c "
import subprocess, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
    print(subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout)
import zarr, anndata, hydra, omegaconf; print('zarr', zarr.__version__, 'anndata', anndata.__version__)
"
step parity "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step gpu_step "$PY" scripts/bench/gpu_step.py --sizes "$SIZES" --batch-size "$GPU_BATCH" --steps "$STEPS_N" \
  --warmup "$WARM" --out "$OUT/gpu_step.json"
step synth "$PY" -m data.synthetic out="$STORE" n_cells=$CELLS n_genes=$GENES n_regions=$REGIONS progress=false \
  hydra.run.dir="$WORK/.synth" hydra.output_subdir=null
step ddp "${TORCHRUN[@]}" -m trainer.train "${TRAIN[@]}" dist.precision="$PRECISION" run.epochs=$EPOCHS \
  run.output_dir="$WORK/ddp"
step resume "${TORCHRUN[@]}" -m trainer.train "${TRAIN[@]}" dist.precision="$PRECISION" run.epochs=$MORE \
  run.output_dir="$WORK/ddp"
step deepspeed "${TORCHRUN[@]}" -m trainer.train "${TRAIN[@]}" dist=deepspeed dist.zero_stage=2 \
  dist.precision="$PRECISION" model.rna_library=lognormal run.epochs=$EPOCHS run.output_dir="$WORK/ds"
step ds_cpu "${TORCHRUN[@]}" -m trainer.train "${TRAIN[@]}" dist=deepspeed dist.device=cpu run.epochs=1 run.max_steps=3 \
  run.output_dir="$WORK/ds_cpu"
step embed "$PY" -m trainer.infer model_dir="$WORK/ddp" store="$STORE" output="$WORK/embed_gpu.zarr" progress=false \
  device="$DEVICE"
step embed_cpu "$PY" -m trainer.infer model_dir="$WORK/ddp" store="$STORE" output="$WORK/embed_cpu.zarr" \
  progress=false device=cpu
# posterior samples (give_mean=false): the same draws on both devices for the same seed (trainer.predict.std_normal)
step sample "$PY" -m trainer.infer model_dir="$WORK/ddp" store="$STORE" output="$WORK/sample_gpu.zarr" progress=false \
  give_mean=false seed=3 "modalities=[joint]" device="$DEVICE"
step sample_cpu "$PY" -m trainer.infer model_dir="$WORK/ddp" store="$STORE" output="$WORK/sample_cpu.zarr" \
  progress=false give_mean=false seed=3 "modalities=[joint]" device=cpu
# the notebook API on its default device (the GPU) against the CPU: latents and ELBO of the store's cells
step api "$PY" -c "
import json, sys, numpy as np
from trainer import api
gpu, cpu = api.load(sys.argv[1]), api.load(sys.argv[1], 'cpu')
zg, zc = gpu.latent(sys.argv[2]), cpu.latent(sys.argv[2])
eg, ec = gpu.elbo(sys.argv[2]), cpu.elbo(sys.argv[2])
json.dump({'device': str(gpu.device), 'latent_max_abs_diff': float(np.abs(zg - zc).max()),
           'elbo_gpu': float(eg), 'elbo_cpu': float(ec)}, open(sys.argv[3], 'w'))
" "$WORK/ddp" "$STORE" "$WORK/api.json"
step expression "$PY" -m trainer.infer job=expression model_dir="$WORK/ddp" store="$STORE" \
  output="$WORK/expr_gpu.zarr" progress=false device="$DEVICE"

"$PY" scripts/device/summarize.py --steps "$STEPS" --work "$WORK" --out "$OUT/summary.json" >>"$LOG" 2>&1
cat "$OUT/summary.json" 2>/dev/null || echo "no summary (see $LOG)"
