"""The training objective of ``MultiVAE`` (``trainer/module.py``): the encoder pass and the loss.

Both choose which rows each network runs on (the "measured-row selection"): an encoder or decoder
runs only on the rows whose modality is measured, where that is exact up to float rounding and pays
(see ``ObjectiveMixin.loss``). Kept apart from ``module.py`` (construction and decoders) so that the
per-step compute path can be read and tuned in one place.

``ObjectiveMixin`` is only used as a base of ``MultiVAE``: it reads the module's attributes
(encoders, decoders, options) and helpers (``_counts``, ``covariates``, ``modality_alpha``,
``_decoder_input``, ``_decode_rna``, ``_compiled_atac``) that ``module.py`` defines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from data import keys
from trainer import distributions as D
from trainer import fused
from trainer.native import ops as native_ops
from trainer.nn import head, multiplies_densely, select_rows


@dataclass
class LossOutput:
    """Scalar objective plus every per-cell term (B,) and the latent used by the adversary."""

    loss: torch.Tensor
    recon_rna: torch.Tensor
    recon_atac: torch.Tensor
    kl: torch.Tensor
    penalty: torch.Tensor
    z: torch.Tensor
    qz_m: torch.Tensor
    qz_v: torch.Tensor
    # model.rna_library=lognormal: the per-cell KL of the log-library posterior to its batch's prior (0 where RNA
    # was not measured), already included in ``kl``; None otherwise
    kl_library: torch.Tensor | None = None
    outputs: dict = field(default_factory=dict, repr=False)  # inference + generative tensors


def bucketing(t: torch.Tensor) -> bool:
    """Whether ``bucketed_rows`` may pad rows for tensors on ``t``'s device: only under CPU autocast
    (the only case where anything checks for padding, so fp32 and GPU steps pay no extra reduction)."""
    return t.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def bucketed_rows(keep: torch.Tensor) -> torch.Tensor:
    """The (sorted) rows to run a network on: the rows where ``keep`` is True and, under CPU autocast,
    the first rows where it is False, up to a multiple of ``max(16, B // 16)``.

    Why: oneDNN (CPU bf16 GEMMs) JIT-compiles and caches a kernel per matrix shape; the number of
    cells measuring a modality changes from batch to batch, and each new row count cost ~2.4 ms of
    compilation per GEMM and ~13 MB of cached kernels per step shape (measured, batch 128; unbounded
    over an atlas run). Buckets leave a handful of shapes for ~8 % more rows on average. The padded
    rows' results are dropped (``_encode_rows``, ``_per_cell``), so the loss is unchanged.
    Without CPU autocast (fp32 MKL GEMMs, GPU) there is no per-shape cost: exactly the kept rows.
    """
    rows = keep.nonzero().squeeze(1)
    B = keep.shape[0]
    if not bucketing(keep) or rows.numel() == B:
        return rows
    multiple = max(16, B // 16)
    target = min(B, -(-rows.numel() // multiple) * multiple)
    if target == rows.numel():
        return rows
    extra = (~keep).nonzero().squeeze(1)[: target - rows.numel()]
    return torch.cat([rows, extra]).sort().values


class ObjectiveMixin:
    """``inference`` / ``loss`` / ``penalty`` of ``MultiVAE`` (see the module docstring)."""

    def inference(
        self, batch: dict, eps: torch.Tensor | None = None, measured_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """Encode both modalities, mix them into the joint posterior and draw z.

        ``eps`` (B, n_noise): standard-normal noise for the reparameterised sample (z's columns, then the lognormal
        library's); drawn if None
        (passing it makes a step reproducible across implementations and lets predictors draw many).

        ``measured_only``: run each encoder only on the rows where its modality is measured (and on
        cells that measure neither, whose joint posterior averages both encoders with weight 1/4).
        The other rows get placeholders qzm = 0, qzv = 1, library 0. They reach the joint posterior
        only through the masked-softmax weight (``modality_alpha``): alpha ~ 1e-30 times the mean and
        sqrt(alpha) ~ 1e-15 times the variance, so qz_m is unchanged to float64 precision and qz_v
        (and the gradients through it) change by <= ~1e-15 relative; the penalty only reads paired
        cells. Ignored (full computation) when the encoders use batch norm, which couples rows.
        The per-modality outputs (``qzm_rna`` ...) then hold placeholders on the unmeasured rows.
        """
        return self._inference(batch, eps, measured_only, measured_only)

    def _inference(self, batch: dict, eps: torch.Tensor | None, rna_rows_only: bool, atac_rows_only: bool):
        """``inference`` with ``measured_only`` chosen per modality (the loss skips rows only where
        that pays, see ``loss``)."""
        x_rna = self._counts(batch, keys.RNA, self.n_genes)
        x_atac = self._counts(batch, keys.ATAC, self.n_regions)
        mask = batch[keys.MASK].bool()
        cov = self.covariates(batch) if self.encode_covariates else None
        extra = self._cont(batch) if self.encode_covariates else None
        bn = self.use_batch_norm in ("encoder", "both")  # couples rows: always the full computation
        neither = ~mask.any(dim=1) if (rna_rows_only or atac_rows_only) and not bn else None
        if neither is not None and rna_rows_only:
            qzm_rna, qzv_rna, lib_rna = self._encode_rows(
                self.rna_encoder, x_rna, mask[:, 0] | neither, cov, extra
            )
        else:
            qzm_rna, qzv_rna, lib_rna = self.rna_encoder(x_rna, cov, extra)
        if neither is not None and atac_rows_only:
            qzm_atac, qzv_atac, lib_atac = self._encode_rows(
                self.atac_encoder, x_atac, mask[:, 1] | neither, cov, extra
            )
        else:
            qzm_atac, qzv_atac, lib_atac = self.atac_encoder(x_atac, cov, extra)
        if self.use_size_factor:
            sf = batch[keys.SIZE_FACTOR].to(self.compute_dtype)
            lib_rna, lib_atac = torch.log(sf[:, [0]] + 1e-6), sf[:, [1]]
        if eps is None:
            eps = torch.randn(mask.shape[0], self.n_noise, dtype=qzm_rna.dtype, device=qzm_rna.device)
        elif eps.shape[-1] != self.n_noise:
            # strict: noise with z's columns only left a lognormal library at its mean in training, silently
            # (its variance then learned nothing but the prior's)
            raise ValueError(f"eps has {eps.shape[-1]} columns, the module needs n_noise={self.n_noise} (n_latent "
                             f"{self.n_latent}{' + 1 for the lognormal library' if self.n_noise > self.n_latent else ''})")
        library = {}
        if self.rna_library == "lognormal":
            # the log-library is latent: a reparameterised draw from N(qlm, qlv) (zero noise: the posterior mean)
            qlm, qlv = lib_rna[:, :1], lib_rna[:, 1:]
            lib_rna = qlm + eps[:, self.n_latent:] * qlv.sqrt()
            library = {"qlm_rna": qlm, "qlv_rna": qlv}
        alpha = self.modality_alpha(mask, batch.get(keys.INDEX))
        # weighted mean of the modality posteriors; variances mix with sqrt(alpha) (spec §2.5-2.6)
        qz_m = alpha[:, 0:1] * qzm_rna + alpha[:, 1:2] * qzm_atac
        sa = alpha.sqrt()
        qz_v = sa[:, 0:1] * qzv_rna + sa[:, 1:2] * qzv_atac
        untran_z = qz_m + eps[:, : self.n_latent] * qz_v.sqrt()
        z = F.softmax(untran_z, dim=-1) if self.latent_distribution == "ln" else untran_z
        return {
            "z": z,
            "qz_m": qz_m,
            "qz_v": qz_v,
            "alpha": alpha,
            "mask": mask,
            "qzm_rna": qzm_rna,
            "qzv_rna": qzv_rna,
            "qzm_atac": qzm_atac,
            "qzv_atac": qzv_atac,
            "lib_rna": lib_rna,
            "lib_atac": lib_atac,
            **library,
        }

    @staticmethod
    def _encode_rows(encoder, x, keep: torch.Tensor, cov, extra):
        """``encoder`` on the rows where ``keep``; placeholders (0, 1, 0) elsewhere (see ``inference``)."""
        rows = bucketed_rows(keep)
        if rows.numel() == keep.shape[0]:
            return encoder(x, cov, extra)
        pick = lambda t: None if t is None else t.index_select(0, rows)
        m, v, lib = encoder(select_rows(x, rows), pick(cov), pick(extra))
        if bucketing(keep) and rows.numel() > int(keep.sum()):  # padded: keep only the kept rows' outputs
            kept = keep[rows].nonzero().squeeze(1)
            rows, m, v = rows[kept], m.index_select(0, kept), v.index_select(0, kept)
            lib = None if lib is None else lib.index_select(0, kept)
        # an empty selection still runs the (0-row) networks: every parameter gets a zero gradient,
        # as in the full computation (AdamW then still decays it, DDP still sees it used)
        B = keep.shape[0]
        m = m.new_zeros(B, m.shape[1]).index_copy(0, rows, m)
        v = v.new_ones(B, v.shape[1]).index_copy(0, rows, v)
        if lib is not None:  # (B, 1), or lognormal (B, 2) = [mean, variance]: placeholder variance 1 (finite KL)
            lib = torch.cat([lib.new_zeros(B, 1), lib.new_ones(B, lib.shape[1] - 1)], 1).index_copy(0, rows, lib)
        return m, v, lib

    def penalty(self, inf: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-cell modality-alignment penalty for paired cells (not KL-warmed)."""
        m, paired = inf["qzm_rna"], inf["mask"].all(dim=1)
        if self.modality_penalty == "None":
            return torch.zeros(m.shape[0], dtype=m.dtype, device=m.device)
        if self.modality_penalty == "MMD":
            dist = torch.linalg.norm(inf["qzm_rna"] - inf["qzm_atac"], dim=1)
            return torch.where(paired, dist, torch.zeros_like(dist))
        # Jeffreys as the reference computes it: the std is used where a variance belongs, so the
        # compared Gaussians have variances a = sqrt(v_rna), b = sqrt(v_atac) (spec §3.4 quirk)
        a, b = inf["qzv_rna"].sqrt(), inf["qzv_atac"].sqrt()
        d2 = (inf["qzm_rna"] - inf["qzm_atac"]) ** 2
        j = 0.5 * (a / b + b / a - 2 + d2 * (1 / a + 1 / b)).sum(dim=1)
        return torch.where(paired, j, torch.zeros_like(j))

    def loss(self, batch: dict, kl_weight: float = 1.0, eps: torch.Tensor | None = None) -> LossOutput:
        """Per-cell mean of recon_rna + recon_atac + kl_weight * KL + penalty (spec §3.5).

        Only what the loss can see is computed (``skip_unmeasured``, on by default): the reference
        decodes RNA and ATAC for every cell and multiplies each per-cell reconstruction by the mask,
        so a quarter of each decoder, of the ZINB and of the dense (cell, region) Bernoulli work
        (benchmark mix) is multiplied by 0 and its gradient is exactly 0 (0 * finite). Here each
        decoder and likelihood runs on the rows that measured its modality, and the per-cell recon is
        scattered back into zeros: the same loss and gradients up to float summation order. Where the
        reference would give 0 * inf = NaN for an unmeasured row (e.g. an overflowing px_rate), we
        give 0: right where it is broken. Decoders with batch norm (rows coupled) decode every row.
        ``outputs`` then holds the RNA heads (px_*, theta) for ``outputs["rna_rows"]`` and ``p`` for
        ``outputs["atac_rows"]`` only; ``generative()`` is the full decode.
        """
        skip = self.skip_unmeasured
        # encoders: rows are skipped only where the first layer multiplies densely (dense input, or
        # CSR RNA at ~35 % density); a sparse first layer costs nothing on an empty row and the
        # selection would only add copies (measured: dense input -3 ms per step, CSR +-0)
        skip_enc = skip and self.skip_unmeasured_encoders
        inf = self._inference(
            batch,
            eps,
            skip_enc and multiplies_densely(batch[keys.RNA]),
            skip_enc and multiplies_densely(batch[keys.ATAC]),
        )
        mask = inf["mask"]
        n = mask.shape[0]
        h_in, cov, codes = self._decoder_input(inf["z"], batch, None)
        by_rows = skip and self.use_batch_norm not in ("decoder", "both")
        rna_rows = bucketed_rows(mask[:, 0]) if by_rows else None
        atac_rows = bucketed_rows(mask[:, 1]) if by_rows else None
        if rna_rows is not None and rna_rows.numel() == n:
            rna_rows = None  # every row measured: no copies
        if atac_rows is not None and atac_rows.numel() == n:
            atac_rows = None

        def pick(t, rows):
            return t if t is None or rows is None else select_rows(t, rows)

        x_rna = self._counts(batch, keys.RNA, self.n_genes)
        gen = self._decode_rna(
            pick(h_in, rna_rows), pick(cov, rna_rows), pick(codes, rna_rows), pick(inf["lib_rna"], rna_rows)
        )
        rl_rna = self._rna_nll(pick(x_rna, rna_rows), gen)

        x_atac = pick(self._counts(batch, keys.ATAC, self.n_regions), atac_rows)
        logits = head(self.atac_out, self.atac_decoder(pick(h_in, atac_rows), pick(cov, atac_rows)))
        lib_atac, s = pick(inf["lib_atac"], atac_rows), self.region_factor_probs()
        # the native and compiled kernels score the logits directly: no (B, R) sigmoid pass, p is None
        gen["p"] = None
        if self.native_kernels and native_ops.available(x_atac, logits, lib_atac, *([] if s is None else [s])):
            rl_atac = native_ops.product_bernoulli_nll_logits(x_atac, logits, lib_atac, s)
        elif self._compiled_atac():
            rl_atac = fused.product_bernoulli_nll_logits(x_atac, logits, lib_atac, s, compiled=True)
        else:  # eager: the hand-fused probability form makes fewer passes than the eager logits kernels
            gen["p"] = torch.sigmoid(logits)
            rl_atac = fused.product_bernoulli_nll(x_atac, gen["p"], lib_atac, s)
        recon_rna = self._per_cell(rl_rna, rna_rows, mask[:, 0])
        recon_atac = self._per_cell(rl_atac, atac_rows, mask[:, 1])
        qz_m, qz_v = inf["qz_m"], inf["qz_v"]
        kl = 0.5 * (qz_v + qz_m**2 - 1 - torch.log(qz_v)).sum(dim=1)
        penalty = self.penalty(inf)
        if self.rna_library == "lognormal":
            # not KL-warmed, as scvi-tools' VAE (kl_local_no_warmup); reported inside ``kl`` (all local KL)
            kl_library = self.library_kl(inf, batch[keys.BATCH])
            loss = torch.mean((recon_rna + recon_atac) + (kl_weight * kl + penalty + kl_library))
            kl = kl + kl_library
        else:
            kl_library = None
            loss = torch.mean((recon_rna + recon_atac) + (kl_weight * kl + penalty))
        all_rows = torch.arange(n, device=mask.device)
        gen["rna_rows"] = all_rows if rna_rows is None else rna_rows
        gen["atac_rows"] = all_rows if atac_rows is None else atac_rows
        return LossOutput(
            loss=loss,
            recon_rna=recon_rna,
            recon_atac=recon_atac,
            kl=kl,
            penalty=penalty,
            kl_library=kl_library,
            z=inf["z"],
            qz_m=qz_m,
            qz_v=qz_v,
            outputs={**inf, **gen},
        )

    def library_kl(self, inf: dict, batch_codes: torch.Tensor) -> torch.Tensor:
        """Per cell KL(N(qlm, qlv) || N(prior mean, prior var) of the cell's batch) of the lognormal RNA
        library (B,), 0 where RNA was not measured (its library never reaches the loss)."""
        codes = batch_codes.reshape(-1).long()
        m = self.library_log_mean.to(self.compute_dtype).index_select(0, codes).unsqueeze(1)
        v = self.library_log_var.to(self.compute_dtype).index_select(0, codes).unsqueeze(1)
        qlm, qlv = inf["qlm_rna"], inf["qlv_rna"]
        kl = 0.5 * (torch.log(v / qlv) + (qlv + (qlm - m) ** 2) / v - 1).sum(dim=1)
        return torch.where(inf["mask"][:, 0], kl, torch.zeros_like(kl))

    def _rna_nll(self, x_rna: torch.Tensor, gen: dict) -> torch.Tensor:
        if self.gene_likelihood == "zinb":
            mu, theta, zi = gen["px_rate"], gen["theta"], gen["px_dropout"]
            # the native ZINB kernel takes one dispersion per gene (dispersion "gene", the default)
            if self.native_kernels and theta.dim() == 1 and native_ops.available(x_rna, mu, theta, zi):
                return native_ops.zinb_nll(x_rna, mu, theta, zi)
            return D.zinb_nll(x_rna, mu, theta, zi)
        if self.gene_likelihood == "nb":
            return D.nb_nll(x_rna, gen["px_rate"], gen["theta"])
        return D.poisson_nll(x_rna, gen["px_rate"])

    @staticmethod
    def _per_cell(rl: torch.Tensor, rows: torch.Tensor | None, measured: torch.Tensor) -> torch.Tensor:
        """Per-cell recon (B,): scattered into zeros from the decoded rows, or masked (full decode).

        Decoded rows that were not measured (bucket padding, see ``bucketed_rows``) get 0: a
        ``where``, so neither their value nor their gradient reaches the loss."""
        if rows is None:
            return rl * measured.to(rl.dtype)  # the reference's product (NaN stays NaN)
        if bucketing(measured) and rows.numel() > int(measured.sum()):
            rl = torch.where(measured.index_select(0, rows), rl, torch.zeros_like(rl))
        return rl.new_zeros(measured.shape[0]).index_copy(0, rows, rl)
