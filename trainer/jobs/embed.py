"""embed: the joint latent and the per-modality latents of every cell, as an AnnData Zarr.

Output ``<output>`` (an AnnData that ``anndata.read_zarr`` opens): obs copied from the store in store
order, ``obsm['X_multivi']`` (joint), ``obsm['X_multivi_expression']`` / ``['X_multivi_accessibility']``
(per-modality posteriors, computed for every cell as in the reference: a cell without RNA still gets
an expression latent from its encoder; mask with the store's modality columns if needed).

``give_mean=true`` (default) writes posterior means (the reference's ``give_mean=True``; for ``ln``
latents E[softmax(z)], ``predict.ln_mean``); ``give_mean=false`` writes ``n_samples`` posterior draws:
(cells, d) for one, (cells, n_samples, d) for several; each chunk seeds from (seed, chunk id), and every
modality from that same state, so draws depend neither on world size, restarts, nor on which other
latents the job writes.

Chunking, sharding over ranks, restart and finalize: ``trainer.jobs.runner``. With
``embed.umap_png`` set, rank 0 draws a UMAP picture of the finished output (``trainer.jobs.umap``).
"""

from __future__ import annotations

import numpy as np
import torch
import zarr

from data import keys
from trainer.dist import print0
from trainer.infer_config import LATENTS, InferConfig
from trainer.jobs.common import InferError
from trainer.jobs.runner import FAIL_AFTER_ENV, ChunkJob, JobContext, create_dense, open_job, run_chunked
from trainer.predict import latent, ln_mean, mean_pass

__all__ = ["FAIL_AFTER_ENV", "dist_keys", "obsm_key", "run_embed"]

# predict.latent's posterior means, read from ONE encoder pass (calling it per modality encodes 3x)
_MEAN_KEYS = {"joint": "qz_m", "rna": "qzm_rna", "atac": "qzm_atac"}
_VAR_KEYS = {"joint": "qz_v", "rna": "qzv_rna", "atac": "qzv_atac"}


def obsm_key(modality: str) -> str:
    return "X_multivi" if modality == "joint" else f"X_multivi_{modality}"


def dist_keys(modality: str) -> tuple[str, str]:
    """obsm keys of embed.return_dist: the normal posterior's mean and variance (before an ``ln`` softmax)."""
    return f"{obsm_key(modality)}_qz_m", f"{obsm_key(modality)}_qz_v"


class EmbedJob(ChunkJob):
    name = "embed"
    section = None  # embed.umap_png only draws a picture of the finished output: not a setting

    def __init__(self, ctx: JobContext):
        super().__init__(ctx)
        self.arrays: dict[str, zarr.Array] = {}

    def settings(self) -> dict:
        # return_dist decides which arrays the output holds (the section as a whole is not fingerprinted:
        # umap_png only draws a picture of the finished output)
        return {"embed.return_dist": self.ctx.cfg.embed.return_dist}

    def uns(self) -> dict:
        # which latents (obsm keys) the output holds and whether their posteriors' mean/variance are there
        return {"modalities": list(self.ctx.cfg.modalities), "return_dist": self.ctx.cfg.embed.return_dist}

    def _keys(self) -> list[str]:
        cfg = self.ctx.cfg
        return [obsm_key(m) for m in cfg.modalities] + \
            ([k for m in cfg.modalities for k in dist_keys(m)] if cfg.embed.return_dist else [])

    def create_arrays(self, root: zarr.Group) -> None:
        cfg, n, d = self.ctx.cfg, self.ctx.n_cells, self.ctx.module.n_latent
        extra = () if (cfg.give_mean or cfg.n_samples == 1) else (cfg.n_samples,)
        for key in self._keys():
            shape = (n, *extra, d) if key in {obsm_key(m) for m in cfg.modalities} else (n, d)
            create_dense(root, f"obsm/{key}", shape, "float32", rows=cfg.batch_size, fill_value=np.nan)

    def open_arrays(self, root: zarr.Group, work_dir) -> None:
        self.arrays = {key: root[f"obsm/{key}"] for key in self._keys()}

    umap: dict | None = None  # what draw_umap drew (rank 0)

    def after_output(self, final) -> None:
        # drawn before the progress directory goes: a job killed while drawing is finished by its rerun (the
        # picture was drawn after it, and a rerun found the output existing and never drew it)
        if self.ctx.cfg.embed.umap_png:
            from trainer.jobs.umap import draw_umap

            self.umap = draw_umap(str(final), self.ctx.cfg.embed.umap_png)
            print0(f"[embed] UMAP picture: {self.umap['png']}")

    def compute_chunk(self, k: int, lo: int, hi: int, batch: dict):
        module, cfg = self.ctx.module, self.ctx.cfg
        # one encoder pass serves the means and the posteriors (a pass per use would encode twice)
        inf = mean_pass(module, batch) if cfg.give_mean or cfg.embed.return_dist else None
        out = {obsm_key(m): z for m, z in _latents(module, batch, cfg, inf).items()}
        if cfg.embed.return_dist:
            for m in cfg.modalities:
                for key, name in zip(dist_keys(m), (_MEAN_KEYS[LATENTS[m]], _VAR_KEYS[LATENTS[m]]), strict=True):
                    out[key] = inf[name]
        out = {key: z.to("cpu", torch.float32).numpy() for key, z in out.items()}

        def store() -> None:
            for key, z in out.items():
                self.arrays[key][lo:hi] = z

        return store


@torch.no_grad()
def _latents(module, batch: dict, cfg: InferConfig, inf: dict | None) -> dict[str, torch.Tensor]:
    """modality -> (B, d) means (from ``inf``, the batch's ``mean_pass``), (B, d) one sample, or (B, S, d)
    samples."""
    if cfg.give_mean:
        if module.latent_distribution == "ln":  # E[softmax(z)], as predict.latent reports it
            return {m: ln_mean(inf[_MEAN_KEYS[LATENTS[m]]], inf[_VAR_KEYS[LATENTS[m]]]) for m in cfg.modalities}
        return {m: inf[_MEAN_KEYS[LATENTS[m]]] for m in cfg.modalities}
    out = {}
    device = batch[keys.MASK].device
    for m in cfg.modalities:
        # every modality draws from the chunk's seed (the RNG state is restored after each), so its
        # samples do not depend on which other latents are requested, and equal api.latent's
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            z = latent(module, batch, modality=LATENTS[m], give_mean=False, n_samples=cfg.n_samples)
        out[m] = z[0] if cfg.n_samples == 1 else z.transpose(0, 1)  # (S, B, d) -> (B, S, d)
    return out


def run_embed(cfg: InferConfig) -> dict:
    if cfg.embed.umap_png:
        # the picture is drawn from the finished output's joint means: refused now, not after the whole job
        # (a rerun would then find the output existing and draw nothing)
        if "joint" not in cfg.modalities:
            raise InferError(f"embed.umap_png draws the joint latent: add 'joint' to modalities (now {cfg.modalities})")
        if not cfg.give_mean and cfg.n_samples > 1:
            raise InferError("embed.umap_png needs one point per cell: give_mean=true or n_samples=1")
    ctx = open_job(cfg)
    if cfg.embed.umap_png:
        from trainer.jobs.umap import MIN_CELLS

        if ctx.n_cells < MIN_CELLS:  # else the embedding is written first and the picture then refused
            raise InferError(f"embed.umap_png needs at least {MIN_CELLS} cells; store {ctx.store.path} has "
                             f"{ctx.n_cells}: leave embed.umap_png unset for this store")
    job = EmbedJob(ctx)
    summary = run_chunked(job)
    if job.umap is not None:
        summary["umap"] = job.umap
    return summary
