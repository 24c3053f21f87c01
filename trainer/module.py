"""``MultiVAE``: the MultiVI variational auto-encoder for paired and unpaired scRNA + scATAC cells.

Same architecture, defaults and numbers as the reference ``scvi.module.MULTIVAE`` (scvi-tools 1.5.1;
spec Part B §2-3), proven by ``tests/test_parity.py``. Differences, all deliberate:

* the missing-modality mask is read from ``batch["mask"]`` (never from row sums), so a measured cell
  with an empty row still gets its reconstruction loss;
* ``batch["rna"]`` / ``batch["atac"]`` may be sparse CSR: first layers and losses never densify them;
* the unused reference heads (RNA ``px_r_decoder`` unless ``dispersion="gene-cell"``, the protein
  branch) are not built. The reference's third (protein) softmax slot is reproduced numerically: it
  always enters the softmax denominator with 1e-30, so a cell with no modality gets weights
  (1/4, 1/4) like the reference (whose protein encoder output, absent here, would add a third 1/4 term);
* ``dispersion`` "gene-batch" and "gene-cell" work (broken in the reference);
* ``modality_penalty="MMD"`` is per cell: penalty_c = 1[paired] * ||mu_rna - mu_atac||. The reference
  adds the *minibatch sum* of these norms to every cell, so its loss grows with the batch size (and
  world size); ours equals the reference's divided by the batch size and does not;
* ``rna_library="lognormal"`` (not in the reference; default "deterministic"): a latent RNA log-library with a
  per-batch prior (``library_log_mean`` / ``library_log_var``, trainer/library_prior.py), as scvi-tools' VAE
  with ``use_observed_lib_size=False``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from data import keys
from trainer import fused
from trainer.module_loss import LossOutput, ObjectiveMixin
from trainer.nn import EncoderPair, FCStack, compute_dtype, covariate_width, head, one_hot_covariates

__all__ = ["LossOutput", "MultiVAE"]

_CHOICES = {
    "gene_likelihood": ("zinb", "nb", "poisson"),
    "dispersion": ("gene", "gene-batch", "gene-cell"),
    "use_batch_norm": ("none", "encoder", "decoder", "both"),
    "use_layer_norm": ("none", "encoder", "decoder", "both"),
    "latent_distribution": ("normal", "ln"),
    "modality_weights": ("equal", "universal", "cell"),
    "modality_penalty": ("Jeffreys", "MMD", "None"),
    "rna_library": ("deterministic", "lognormal"),
}


def option_error(options: dict) -> str | None:
    """What is wrong with the MultiVAE ``options`` given (a choice outside ``_CHOICES``, a size < 1, a
    dropout rate outside [0, 1)), or None. One rule for the module and for ``trainer.config.ModelConfig``,
    which refuses the same values before the store is opened."""
    for name, value in options.items():
        if name in _CHOICES and value not in _CHOICES[name]:
            return f"{name} must be one of {list(_CHOICES[name])}, got {value!r}"
        # sizes and rates that would otherwise train silently wrong (dropout_rate < 0 dropped nothing,
        # 1.0 zeroed every encoder activation) or fail later with a shape traceback
        if name in ("n_hidden", "n_latent", "n_layers_encoder", "n_layers_decoder") and value is not None \
                and value < 1:
            return f"{name} must be >= 1 (null = the reference's default for n_hidden / n_latent), got {value}"
        if name == "dropout_rate" and not 0.0 <= value < 1.0:
            return f"dropout_rate must be in [0, 1), got {value}"
    if options.get("rna_library") == "lognormal" and options.get("use_size_factor"):
        return ("rna_library=lognormal needs the library network, which use_size_factor=true replaces by the "
                "given size factors: choose one")
    return None


_SOFTMAX_EPS = 1e-30  # the reference's masked-softmax epsilon (numerator of masked slots and denominator)


def layer_sizes(n_regions: int, n_hidden: int | None, n_latent: int | None) -> tuple[int, int]:
    """(n_hidden, n_latent) as built; None takes the reference's formulas (spec §2.1): hidden from the regions
    capped at 128, latent = sqrt(hidden)."""
    hidden = min(128, int(math.sqrt(n_regions))) if n_hidden is None else n_hidden
    return hidden, int(math.sqrt(hidden)) if n_latent is None else n_latent


class MultiVAE(ObjectiveMixin, nn.Module):
    """Construction, covariates and the decoders live here; ``inference`` (the encoders, with the
    measured-row selection) and ``loss`` in ``trainer/module_loss.py`` (``ObjectiveMixin``)."""

    def __init__(
        self,
        n_genes: int,
        n_regions: int,
        n_batch: int = 1,
        n_cats_per_cov: tuple[int, ...] | list[int] = (),
        n_continuous_cov: int = 0,
        n_obs: int = 0,
        n_hidden: int | None = None,
        n_latent: int | None = None,
        n_layers_encoder: int = 2,
        n_layers_decoder: int = 2,
        dropout_rate: float = 0.1,
        region_factors: bool = True,
        gene_likelihood: str = "zinb",
        dispersion: str = "gene",
        use_batch_norm: str = "none",
        use_layer_norm: str = "both",
        latent_distribution: str = "normal",
        deeply_inject_covariates: bool = False,
        encode_covariates: bool = False,
        modality_weights: str = "equal",
        modality_penalty: str = "Jeffreys",
        use_size_factor: bool = False,
        rna_library: str = "deterministic",
        compile_kernels: bool = False,
        native_kernels: bool = True,
    ):
        super().__init__()
        error = option_error({
            "gene_likelihood": gene_likelihood, "dispersion": dispersion, "use_batch_norm": use_batch_norm,
            "use_layer_norm": use_layer_norm, "latent_distribution": latent_distribution,
            "modality_weights": modality_weights, "modality_penalty": modality_penalty, "n_hidden": n_hidden,
            "rna_library": rna_library, "use_size_factor": use_size_factor,
            "n_latent": n_latent, "n_layers_encoder": n_layers_encoder, "n_layers_decoder": n_layers_decoder,
            "dropout_rate": dropout_rate})  # fmt: skip
        if error:
            raise ValueError(error)
        if n_genes < 1 or n_regions < 1:
            raise ValueError(f"MultiVAE needs n_genes >= 1 and n_regions >= 1, got {n_genes}, {n_regions}")
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_continuous_cov < 0 or any(int(n) < 1 for n in n_cats_per_cov):
            raise ValueError(
                f"n_continuous_cov must be >= 0 and every n_cats_per_cov >= 1, got {n_continuous_cov}, "
                f"{list(n_cats_per_cov)}"
            )
        if modality_weights == "cell" and n_obs < 1:
            raise ValueError(
                "modality_weights='cell' learns one weight row per training cell: pass n_obs > 0"
            )
        self.n_genes, self.n_regions, self.n_batch = n_genes, n_regions, n_batch
        self.n_cats_per_cov = tuple(int(n) for n in n_cats_per_cov)
        self.n_continuous_cov = n_continuous_cov
        self.n_hidden, self.n_latent = layer_sizes(n_regions, n_hidden, n_latent)
        self.gene_likelihood, self.dispersion = gene_likelihood, dispersion
        self.latent_distribution = latent_distribution
        self.modality_weights, self.modality_penalty = modality_weights, modality_penalty
        self.encode_covariates, self.use_size_factor = encode_covariates, use_size_factor
        self.rna_library = rna_library
        # torch.compile the dense ATAC-likelihood kernels (trainer/fused.py): same numbers, opt-in
        self.compile_kernels = compile_kernels
        # compute only what the loss can see (``loss``): decoders/likelihoods on measured rows, and
        # (``skip_unmeasured_encoders``) encoders on measured rows; both exact up to float rounding
        self.skip_unmeasured = True
        self.skip_unmeasured_encoders = True
        self.deeply_inject_covariates, self.dropout_rate = deeply_inject_covariates, dropout_rate
        self.use_batch_norm, self.use_layer_norm = use_batch_norm, use_layer_norm
        self.n_layers_encoder, self.n_layers_decoder = n_layers_encoder, n_layers_decoder
        self.cat_list = [n_batch, *self.n_cats_per_cov]
        n_cov = covariate_width(self.cat_list)
        bn_enc, bn_dec = use_batch_norm in ("encoder", "both"), use_batch_norm in ("decoder", "both")
        ln_enc, ln_dec = use_layer_norm in ("encoder", "both"), use_layer_norm in ("decoder", "both")
        H, d, C, deep = self.n_hidden, self.n_latent, n_continuous_cov, deeply_inject_covariates

        enc = {
            "n_latent": d,
            "n_hidden": H,
            "n_layers": n_layers_encoder,
            "n_cov": n_cov if encode_covariates else 0,
            "n_extra": C if encode_covariates else 0,
            "dropout": dropout_rate,
            "batch_norm": bn_enc,
            "layer_norm": ln_enc,
        }
        # Reference asymmetry (spec §2.3, gotcha 10): the ATAC z-encoder injects covariates into every
        # block whatever `deeply_inject_covariates` says; the RNA z-encoder and both library nets obey it.
        self.rna_encoder = EncoderPair(
            n_genes,
            z_inject_deep=deep,
            lib_inject_deep=deep,
            library_head=None if use_size_factor else ("leaky_relu" if rna_library == "deterministic" else "lognormal"),
            **enc,
        )
        self.atac_encoder = EncoderPair(
            n_regions,
            z_inject_deep=True,
            lib_inject_deep=deep,
            library_head=None if use_size_factor else "sigmoid",
            **enc,
        )
        dec = {"n_cov": n_cov, "inject_deep": deep, "batch_norm": bn_dec, "layer_norm": ln_dec}
        self.rna_decoder = FCStack(d + C, H, n_layers_decoder, activation="relu", **dec)
        self.px_scale = nn.Linear(H, n_genes)
        # zero-inflation logits only where they are used (the reference always builds this head)
        self.px_dropout = nn.Linear(H, n_genes) if gene_likelihood == "zinb" else None
        # No parameter is built that the loss never touches (DDP without find_unused_parameters
        # would stall on it): Poisson has no dispersion at all.
        has_theta = gene_likelihood != "poisson"
        self.px_r_head = nn.Linear(H, n_genes) if has_theta and dispersion == "gene-cell" else None
        self.atac_decoder = FCStack(d + C, H, n_layers_decoder, activation="leaky_relu", **dec)
        self.atac_out = nn.Linear(H, n_regions)

        if has_theta and dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_genes))
        elif has_theta and dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(n_genes, n_batch))
        else:
            self.px_r = None
        self.region_factors = nn.Parameter(torch.zeros(n_regions)) if region_factors else None
        # fused C kernels on the CPU for float32 CSR counts (trainer/native): the likelihoods (same
        # numbers to float32 rounding) and the sparse first layers (same sums in the same order); used
        # wherever they can run, else the eager/compiled code. Set after the encoders: it reaches them.
        self.native_kernels = native_kernels
        # three slots (RNA, ATAC, protein) like the reference, so learned weights map 1:1
        if modality_weights == "equal":
            self.register_buffer("mod_weights", torch.ones(3))
        elif modality_weights == "universal":
            self.mod_weights = nn.Parameter(torch.ones(3))
        else:
            self.mod_weights = nn.Parameter(torch.ones(n_obs, 3))
        if rna_library == "lognormal":
            # the per-batch prior N(mean, var) of the log RNA library: the training store's moments over its
            # RNA-measured cells (trainer/library_prior.py sets them; buffers, so checkpoints and the exported
            # model carry them). Float32, also under DeepSpeed bf16 (which casts the parameters: seen in review).
            self.register_buffer("library_log_mean", torch.zeros(n_batch))
            self.register_buffer("library_log_var", torch.ones(n_batch))

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.atac_out.weight.dtype

    @property
    def n_noise(self) -> int:
        """Columns of the standard-normal noise ``inference`` draws: z's, then the log-library's (lognormal)."""
        return self.n_latent + (self.rna_library == "lognormal")

    @property
    def compute_dtype(self) -> torch.dtype:
        """What the likelihoods, KL and loss run in: float32 even when the weights are bf16/fp16."""
        return compute_dtype(self.dtype)

    def covariates(self, batch: dict, batch_codes: torch.Tensor | None = None) -> torch.Tensor | None:
        """One-hot [batch, *categorical covariates] (single-level ones dropped), as the reference orders them."""
        codes = [batch[keys.BATCH] if batch_codes is None else batch_codes]
        if self.n_cats_per_cov:
            cats = batch[keys.CAT_COVS]
            codes += [cats[:, k] for k in range(len(self.n_cats_per_cov))]
        return one_hot_covariates(codes, self.cat_list, self.dtype)

    def _counts(self, batch: dict, key: str, width: int) -> torch.Tensor:
        x = batch[key]
        if x.shape[-1] != width:
            raise ValueError(f"batch[{key!r}] has {x.shape[-1]} columns, the module expects {width}")
        # the likelihoods' dtype: float32 counts even for a bf16 module (bf16 holds integers exactly only
        # up to 256: a count of 1001 would be scored as 1000); the encoders cast their own input
        want = self.compute_dtype
        return x if x.dtype == want else x.to(want)

    def _cont(self, batch: dict) -> torch.Tensor | None:
        if not self.n_continuous_cov:
            return None
        return batch[keys.CONT_COVS].to(self.dtype)

    def modality_alpha(self, mask: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Masked softmax over the (RNA, ATAC, protein) slots (B, 3); the protein slot is never present."""
        if self.modality_weights == "cell":
            if index is None:
                raise ValueError("modality_weights='cell' needs batch['index'] (global cell index)")
            w = self.mod_weights[index].to(self.compute_dtype)
        else:
            w = self.mod_weights.to(self.compute_dtype).unsqueeze(0).expand(mask.shape[0], -1)
        present = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        e = torch.exp(w).masked_fill(~present, _SOFTMAX_EPS)
        return e / (e.sum(-1, keepdim=True) + _SOFTMAX_EPS)

    # ------------------------------------------------------------------ decoders

    def generative(
        self,
        z: torch.Tensor,
        batch: dict,
        lib_rna: torch.Tensor,
        batch_codes: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Decode z (B, d) into RNA ZINB/NB/Poisson parameters and ATAC probabilities.

        ``batch_codes`` replaces the batch covariate of the decoders (``transform_batch``);
        ``return_logits`` adds the ATAC logits ``p_logits`` (the loss scores them, sigmoid fused in); with
        ``compile_kernels`` it then leaves ``p`` None (the compiled loss never needs it).
        """
        h_in, cov, codes = self._decoder_input(z, batch, batch_codes)
        out = self._decode_rna(h_in, cov, codes, lib_rna)
        p_logits = head(self.atac_out, self.atac_decoder(h_in, cov))
        # the compiled loss scores the logits directly: a (B, R) sigmoid pass nobody reads is skipped
        out["p"] = None if return_logits and self._compiled_atac() else torch.sigmoid(p_logits)
        if return_logits:
            out["p_logits"] = p_logits
        return out

    def _decode_rna(self, h_in, cov, codes, lib_rna) -> dict[str, torch.Tensor | None]:
        """RNA heads of ``generative`` for the rows given (px_scale, px_rate, px_dropout, theta)."""
        h_rna = self.rna_decoder(h_in, cov)
        px_scale = self._px_scale(h_rna)
        if self.gene_likelihood == "poisson":
            theta = None
        elif self.dispersion == "gene":
            theta = torch.exp(self.px_r.to(self.compute_dtype))
        elif self.dispersion == "gene-batch":
            theta = torch.exp(self.px_r.t()[codes.reshape(-1).long()].to(self.compute_dtype))
        else:
            theta = torch.exp(head(self.px_r_head, h_rna))
        return {
            "px_scale": px_scale,
            "px_rate": torch.exp(lib_rna) * px_scale,
            "px_dropout": head(self.px_dropout, h_rna) if self.px_dropout is not None else None,
            "theta": theta,
        }

    def _decoder_input(self, z: torch.Tensor, batch: dict, batch_codes: torch.Tensor | None):
        cont = self._cont(batch)
        h_in = z if cont is None else torch.cat([z, cont], dim=-1)
        codes = batch[keys.BATCH] if batch_codes is None else batch_codes
        return h_in, self.covariates(batch, codes), codes

    def _px_scale(self, h_rna: torch.Tensor) -> torch.Tensor:
        pre = head(self.px_scale, h_rna)
        return F.softplus(pre) if self.use_size_factor else F.softmax(pre, dim=-1)

    def decode_expression_scale(
        self, z: torch.Tensor, batch: dict, batch_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Only the RNA scale rho of ``generative`` (inference jobs skip the 10^4-10^5-wide ATAC head)."""
        h_in, cov, _ = self._decoder_input(z, batch, batch_codes)
        return self._px_scale(self.rna_decoder(h_in, cov))

    def decode_accessibility(
        self, z: torch.Tensor, batch: dict, batch_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Only the ATAC probabilities p of ``generative`` (no RNA heads)."""
        h_in, cov, _ = self._decoder_input(z, batch, batch_codes)
        return torch.sigmoid(head(self.atac_out, self.atac_decoder(h_in, cov)))

    @property
    def native_kernels(self) -> bool:
        return self._native_kernels

    @native_kernels.setter
    def native_kernels(self, on: bool) -> None:
        self._native_kernels = bool(on)
        for encoder in (self.rna_encoder, self.atac_encoder):
            encoder.native_kernels = bool(on)

    def _compiled_atac(self) -> bool:
        return self.compile_kernels and not (fused.atac_forward.failed or fused.atac_backward.failed)

    def region_factor_probs(self) -> torch.Tensor | None:
        return None if self.region_factors is None else torch.sigmoid(self.region_factors.to(self.compute_dtype))
