#!/usr/bin/env bash
# Wheels for the device machine (Python 3.12, x86-64, no network) of what its image lacks and our training and
# inference import: written to .whl/ (git-ignored, ~36 MB), which the device call carries (carry=[".whl"]) and
# scripts/device/check.sh installs with --no-deps into /tmp/site. Versions: the ones installed in .venv here,
# so the device runs what the tests ran. The image already has torch, numpy, pandas, scipy, h5py, pyarrow,
# numba, xarray, toolz, cloudpickle, msgpack, psutil, safetensors, matplotlib, tqdm, pyyaml, ...
# (/work/.library/device/KINDS.md); wandb and scanpy are left out (W&B is disabled there; scanpy only draws
# embed.umap_png).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=.whl
# pandas, packaging and typing_extensions too: anndata wants pandas < 3 and packaging >= 24.2, pydantic (DeepSpeed's
# config) typing_extensions >= 4.16, and the image's versions are not known here
BINARY=(anndata annotated-types array-api-compat dask donfig google-crc32c hjson hydra-core importlib_metadata
        lazy-importer legacy-api-wrap locket natsort numcodecs omegaconf packaging pandas partd pydantic pydantic_core
        pytz scverse-misc session-info2 sparse tblib typing_extensions typing-inspection tzdata zarr zarrs)
SDIST_ONLY=(antlr4-python3-runtime deepspeed)  # no wheel on PyPI: built here (pure Python; DeepSpeed without ops)

pins() { "$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "$@"; }
PLATFORMS=()
for p in manylinux_2_{5,17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
rm -rf "$DEST" && mkdir -p "$DEST"
# shellcheck disable=SC2046  # pins prints one word per package
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" $(pins "${BINARY[@]}")
# shellcheck disable=SC2046
DS_BUILD_OPS=0 "$PY" -m pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation -w "$DEST" \
  $(pins "${SDIST_ONLY[@]}")
ls "$DEST" | wc -l | xargs echo "wheels in $DEST:"
du -sh "$DEST"
