"""Pure tensor functions for inference on one minibatch (reused by the inference jobs).

Every function runs the module without gradients and returns tensors; callers put the module in eval
mode and iterate over batches. Differences from the reference accessors (spec §5, Part A.3), each
tested in ``tests/test_improvements.py``:

* ``n_samples > 1`` really draws posterior samples (the reference silently decodes one z);
* ``library_size`` scales normalized expression (a number, or ``"observed"`` = the cell's own RNA count);
* ``transform_batch`` accepts batch labels or integer codes, and a list is averaged (also for
  accessibility, where the reference used only the first element).

As in the reference, ``use_z_mean=True`` decodes the joint mean mu itself (for ``ln`` latents the
decoder then sees mu, not softmax(mu): spec gotcha 22). The *reported* mean of an ``ln`` latent is
E[softmax(z)] (``ln_mean``), on the simplex like its samples; the reference softmaxes one random draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from data import keys
from trainer.distributions import row_totals
from trainer.module import MultiVAE

BatchSpec = int | str | Sequence[int | str] | None


def resolve_batch_codes(
    transform_batch: BatchSpec, categories: Sequence[str] | None = None
) -> list[int | None]:
    """Normalise ``transform_batch`` to a list of integer codes ([None] = the cells' own batches).

    Labels are looked up in ``categories`` (the store's batch categories); integers are codes.
    """
    if transform_batch is None:
        return [None]
    items = [transform_batch] if isinstance(transform_batch, (int, str)) else list(transform_batch)
    if not items:
        raise ValueError("transform_batch is an empty list")
    codes = []
    for item in items:
        if isinstance(item, str):
            if categories is None or item not in list(categories):
                raise ValueError(f"unknown batch label {item!r}; known: {list(categories or [])}")
            codes.append(list(categories).index(item))
        else:
            codes.append(int(item))
    return codes


def _check_codes(module: MultiVAE, codes: list[int | None]) -> None:
    for c in codes:
        if c is not None and not 0 <= c < module.n_batch:
            raise ValueError(f"batch code {c} out of range [0, {module.n_batch})")


LN_MEAN_DRAWS = 1000  # standard-normal draws of ln_mean: MC error ~3 % of a proportion's posterior sd


def ln_mean(m: torch.Tensor, v: torch.Tensor, draws: int = LN_MEAN_DRAWS) -> torch.Tensor:
    """E[softmax(z)] for z ~ N(m, v) (B, d): the posterior mean of an ``ln`` latent.

    Monte Carlo over ``draws`` fixed standard-normal vectors (seed 0, shared by every cell), so a cell's
    value depends only on its own posterior: not on the chunking, the world size, other RNG use or the
    device. The vectors come from a CPU generator and are then moved (a few kB): a generator on
    ``m.device`` gave other numbers on a GPU than on the CPU (CUDA's Philox stream), and none at all
    on devices without one.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    eps = torch.randn(draws, m.shape[-1], generator=g, device="cpu", dtype=m.dtype).to(m.device)
    sd, out = v.sqrt(), torch.zeros_like(m)
    for part in eps.split(100):  # (100, B, d) at a time: bounded memory at any batch size
        out += F.softmax(m.unsqueeze(0) + part.unsqueeze(1) * sd.unsqueeze(0), dim=-1).sum(0)
    return out / draws


def std_normal(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Standard-normal draws from the global CPU generator (the jobs seed it per chunk), moved to ``like``'s
    device: the same numbers for the same seed on any device (drawn on a GPU they came from CUDA's Philox
    generator: other posterior samples than on the CPU for the same seed)."""
    return torch.randn(shape, dtype=like.dtype).to(like.device)


def _latent_draws(module: MultiVAE, inf: dict, n_samples: int, use_z_mean: bool) -> torch.Tensor:
    """(S, B, d) latents to decode: the mean once, or S independent posterior samples."""
    if use_z_mean:
        if n_samples != 1:
            raise ValueError("n_samples > 1 draws posterior samples: pass use_z_mean=False")
        return inf["qz_m"].unsqueeze(0)
    qz_m, qz_v = inf["qz_m"], inf["qz_v"]
    untran = qz_m + std_normal((n_samples, *qz_m.shape), qz_m) * qz_v.sqrt()
    return F.softmax(untran, dim=-1) if module.latent_distribution == "ln" else untran


def _repeat_batch(batch: dict, n: int) -> dict:
    """The covariate entries of ``batch`` tiled n times along cells (to decode S samples at once)."""
    out = {}
    for key in (keys.BATCH, keys.CAT_COVS, keys.CONT_COVS):
        if key in batch:
            t = batch[key]
            out[key] = t.repeat(n, *([1] * (t.dim() - 1)))
    return out


def _decode_head(module: MultiVAE, batch: dict, z: torch.Tensor, code: int | None, head: str) -> torch.Tensor:
    """One decoder head for S x B latents: "rna" -> rho (S, B, G), "atac" -> p (S, B, R).

    Only the requested head runs (the other modality's decoder would cost as much again: the ATAC
    output layer is the widest in the model).
    """
    s, b = z.shape[:2]
    tiled = _repeat_batch(batch, s) if s > 1 else batch
    codes = None if code is None else torch.full((s * b,), code, dtype=torch.long, device=z.device)
    decode = module.decode_expression_scale if head == "rna" else module.decode_accessibility
    out = decode(z.reshape(s * b, -1), tiled, batch_codes=codes)
    return out.reshape(s, b, -1)


def _mean_over_codes(module: MultiVAE, batch: dict, z: torch.Tensor, codes: list[int | None], head: str):
    """(S, B, F) averaged over the transform_batch codes (no stacked copy for the usual single code)."""
    out = _decode_head(module, batch, z, codes[0], head)
    for c in codes[1:]:
        out = out + _decode_head(module, batch, z, c, head)
    return out / len(codes) if len(codes) > 1 else out


def _reduce_draws(x: torch.Tensor, return_mean: bool) -> torch.Tensor:
    if not return_mean:
        return x
    return x[0] if x.shape[0] == 1 else x.mean(0)


@torch.no_grad()
def latent(
    module: MultiVAE, batch: dict, modality: str = "joint", give_mean: bool = True, n_samples: int = 1
) -> torch.Tensor:
    """Latent means (B, d), or ``n_samples`` posterior samples (S, B, d) when ``give_mean=False``
    (``ln`` latents: E[softmax(z)] and softmax(z) samples).

    ``modality``: "joint", "rna" or "atac" (per-modality posteriors are computed for every cell,
    including cells lacking that modality: mask with ``batch["mask"]``).
    """
    m, v = posterior(module, batch, modality)
    if give_mean:
        return ln_mean(m, v) if module.latent_distribution == "ln" else m
    untran = m + std_normal((n_samples, *m.shape), m) * v.sqrt()
    return F.softmax(untran, dim=-1) if module.latent_distribution == "ln" else untran


@torch.no_grad()
def mean_pass(module: MultiVAE, batch: dict) -> dict[str, torch.Tensor]:
    """One encoder pass with zero noise: every latent's posterior mean and variance and both libraries.
    The noise lives on the batch's device (a CPU eps next to a CUDA posterior raised on every GPU
    inference job but the default embedding)."""
    mask = batch[keys.MASK]
    return module.inference(batch, eps=torch.zeros(mask.shape[0], module.n_noise, dtype=module.dtype,
                                                   device=mask.device))


@torch.no_grad()
def posterior(module: MultiVAE, batch: dict, modality: str = "joint") -> tuple[torch.Tensor, torch.Tensor]:
    """The normal posterior of ``modality``'s latent: (mean, variance), each (B, d), before the ``ln``
    softmax -- what the reference's ``get_latent_representation(return_dist=True)`` returns."""
    if modality not in ("joint", "rna", "atac"):
        raise ValueError(f"modality must be 'joint', 'rna' or 'atac', got {modality!r}")
    inf = mean_pass(module, batch)
    if modality == "joint":
        return inf["qz_m"], inf["qz_v"]
    return inf[f"qzm_{modality}"], inf[f"qzv_{modality}"]


@torch.no_grad()
def normalized_expression(
    module: MultiVAE,
    batch: dict,
    transform_batch: BatchSpec = None,
    categories: Sequence[str] | None = None,
    library_size: float | str | None = None,
    n_samples: int = 1,
    use_z_mean: bool = True,
    gene_index: torch.Tensor | Sequence[int] | None = None,
    return_mean: bool = True,
) -> torch.Tensor:
    """Decoded expression scale rho (B, G) (rows sum to 1 without size factors).

    ``library_size``: None -> rho (reference); a number L -> L * rho (rows sum to L); "observed" ->
    rho times the cell's observed RNA count (cells without RNA: the model's library exp(l_rna)).
    ``n_samples`` > 1 with ``use_z_mean=False`` decodes that many posterior samples; with
    ``return_mean`` they are averaged, else (S, B, G) is returned. A list ``transform_batch`` averages.
    """
    codes = resolve_batch_codes(transform_batch, categories)
    _check_codes(module, codes)
    reencode = module.encode_covariates and codes != [None]
    # the cells' own encoding: to decode from, or (re-encoded case) only for an "observed" library
    inf = mean_pass(module, batch) if not reencode or library_size == "observed" else None
    if reencode:
        scale = _expression_reencoded(module, batch, codes, n_samples, use_z_mean)
    else:
        z = _latent_draws(module, inf, n_samples, use_z_mean)
        scale = _mean_over_codes(module, batch, z, codes, "rna")  # (S, B, G)
    if library_size is not None:
        if library_size == "observed":
            x = batch[keys.RNA]
            total = row_totals(x).to(scale.dtype)
            lib = torch.where(inf["mask"][:, 0], total, torch.exp(inf["lib_rna"][:, 0]))
        elif isinstance(library_size, (int, float)) and library_size > 0:
            lib = torch.full((scale.shape[1],), float(library_size), dtype=scale.dtype, device=scale.device)
        else:
            raise ValueError(
                f"library_size must be None, a positive number or 'observed', got {library_size!r}"
            )
        scale = scale * lib.view(1, -1, 1)
    if gene_index is not None:
        scale = scale[..., torch.as_tensor(gene_index, dtype=torch.long, device=scale.device)]
    return _reduce_draws(scale, return_mean)


def _expression_reencoded(module: MultiVAE, batch: dict, codes: list[int], n_samples: int,
                          use_z_mean: bool) -> torch.Tensor:
    """(S, B, G) scale averaged over ``codes``, each decoded from the posterior of the cells re-encoded
    *as if from that batch*: the reference's ``get_normalized_expression`` overwrites the batch in the
    minibatch, so with ``encode_covariates`` its encoders see ``transform_batch`` too (its accessibility
    estimates change only the decoder's batch, as ``normalized_accessibility`` does)."""
    out = None
    for c in codes:
        moved = {**batch, keys.BATCH: torch.full_like(batch[keys.BATCH], c)}
        inf = mean_pass(module, moved)
        part = _decode_head(module, batch, _latent_draws(module, inf, n_samples, use_z_mean), c, "rna")
        out = part if out is None else out + part
    return out / len(codes) if len(codes) > 1 else out


@torch.no_grad()
def normalized_accessibility(
    module: MultiVAE,
    batch: dict,
    transform_batch: BatchSpec = None,
    categories: Sequence[str] | None = None,
    normalize_cells: bool = False,
    normalize_regions: bool = False,
    n_samples: int = 1,
    use_z_mean: bool = True,
    region_index: torch.Tensor | Sequence[int] | None = None,
    return_mean: bool = True,
) -> torch.Tensor:
    """Accessibility probability p (B, R); optionally times l_acc (cells) and sigmoid(r) (regions)."""
    codes = resolve_batch_codes(transform_batch, categories)
    _check_codes(module, codes)
    if normalize_regions and module.region_factors is None:
        raise ValueError("normalize_regions=True needs a model trained with region_factors=True")
    inf = mean_pass(module, batch)
    z = _latent_draws(module, inf, n_samples, use_z_mean)
    p = _mean_over_codes(module, batch, z, codes, "atac")
    if normalize_cells:
        p = p * inf["lib_atac"].view(1, -1, 1)
    if normalize_regions:
        # in the likelihoods' dtype, as the loss reads them (a bf16 module's sigmoid was rounded to bf16)
        p = p * module.region_factor_probs().view(1, 1, -1)
    if region_index is not None:
        p = p[..., torch.as_tensor(region_index, dtype=torch.long, device=p.device)]
    return _reduce_draws(p, return_mean)
