"""Names shared by the store, the loader and the model.

One place for every key, so the reader, the collate step and the module can never disagree
(scvi-tools keeps the same idea in ``REGISTRY_KEYS``).
"""

from __future__ import annotations

# --- minibatch dictionary (what the loader yields and the module consumes) -------------------
RNA = "rna"  # (B, n_genes) counts: dense float tensor or torch sparse CSR (float32 values)
ATAC = "atac"  # (B, n_regions) counts: dense float tensor or torch sparse CSR (float32 values)
MASK = "mask"  # (B, 2) bool: column 0 = RNA measured, column 1 = ATAC measured
BATCH = "batch"  # (B,) int64 batch code
CAT_COVS = "cat_covs"  # (B, n_cat_keys) int64 codes of extra categorical covariates
CONT_COVS = "cont_covs"  # (B, n_cont_keys) float32 continuous covariates
INDEX = "index"  # (B,) int64 global cell index in the store (row order over all shards)
SIZE_FACTOR = "size_factor"  # (B, 2) float32, only when the store/config provides size factors
LABEL = "label"  # (B,) int64 label code, -1 where unknown (never used for training)
# (3,) int64 store-read counters of a DataLoader worker since its last batch (StoreStream.report_read_stats):
# taken off the batch by the trainer's loader (trainer/streams.py), never seen by the model
READ_STATS = "read_stats"

MODALITIES = (RNA, ATAC)
MASK_COLUMN = {RNA: 0, ATAC: 1}

# --- exported model (trainer/export.py writes it; mva-build features_from reads its feature names) ---
MODEL_WEIGHTS, MODEL_INFO = "model.safetensors", "model.json"
MODEL_FORMAT = "multivi-atlas-model"

# --- store ----------------------------------------------------------------------------------
STORE_FORMAT = "multivi-atlas-store"
SCHEMA_VERSION = 1
