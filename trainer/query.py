"""Query mapping (scArches) in the trainer: a trained model, new cells, new batches.

``query.reference=<model>`` trains on ``data.store`` starting from a trained model, as scvi-tools'
``MULTIVI.load_query_data`` followed by ``train`` does (its ``_set_params_online_update``):

* categories: the model's batch (and categorical-covariate) categories, then the store's new ones in the
  store's order; the stream renumbers the store's codes to the model's (``StoreStream.recode``).
* weights: the model's, with fresh (seeded) columns for the new categories wherever a weight has a column
  per category (the covariate one-hot columns of the layers that receive covariates; the gene-batch
  dispersion). Each new column goes to the end of its own category's block. The reference appends them at
  the end of the whole weight, which with categorical covariates puts them inside the last covariate's
  block and shifts the old columns (its surgery is right only for a model without categorical covariates).
* what trains: the reference's rules, evaluated on the reference's parameter names (through
  ``trainer.reference``'s name mapping, which also splits our fused encoder input weights). A parameter the
  rules freeze (``requires_grad=False`` there) is out of the optimizer; one they "hook" stays in it with its
  gradient zeroed outside the trainable columns, so AdamW's weight decay still shrinks it, as in the
  reference (``optim.weight_decay=0`` keeps it exactly). ``tests/test_query.py`` compares every mask, dropout
  rate and batch-norm momentum with what scvi-tools sets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from trainer.config import ConfigError, ModelConfig, QueryConfig, TrainConfig
from trainer.dist import print0
from trainer.export import load_model, training_atac_library_max
from trainer.jobs.common import InferError, code_maps, data_mismatch, resolve_model_dir
from trainer.module import layer_sizes
from trainer.nn import FCStack, covariate_width
from trainer.reference import _MODULE_MAP, ours_state_from_reference, to_reference_layout

# model options that do not change the architecture (how the arithmetic runs): a query may set them
_EXECUTION_OPTIONS = ("compile_kernels", "native_kernels")
_LAYER = re.compile(r"(.+)\.fc_layers\.Layer (\d+)\.0\.(weight|bias)")


RECORD = "query_reference.json"  # the reference's model.json, kept in the run directory with the first checkpoint


@dataclass
class Reference:
    path: Path
    info: dict
    state: dict[str, torch.Tensor] | None  # None: read from the run's record (a resume takes every weight from its checkpoint)


def _records(cfg: TrainConfig) -> list[Path]:
    """Where a resume finds the run's record: beside the checkpoint it was given (run.resume=<checkpoint>, which
    may sit in another run directory), then in run.output_dir."""
    given = [] if cfg.run.resume in ("auto", "none") else [Path(cfg.run.resume).parent.parent / RECORD]
    return [*given, Path(cfg.run.output_dir) / RECORD]


def load_reference(path: str, records: list[Path] = ()) -> Reference:
    try:
        d = resolve_model_dir(path, "query.reference")
    except InferError as exc:
        record = next((r for r in records if r.is_file()), None)
        if record is not None:
            # moved or deleted since the run started: a resume needs only the reference's description
            # (architecture, categories, ATAC scale); the loop refuses it where no checkpoint is left to resume
            print0(f"[query] query.reference={path} is gone; the run continues from its record of it ({record})")
            return Reference(Path(path), json.loads(record.read_text()), None)
        raise ConfigError(f"query.reference: {exc}") from None
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: not from the run's seed
        module, info = load_model(d)
    return Reference(d, info, {k: v.detach().clone() for k, v in module.state_dict().items()})


def with_reference_model(cfg: TrainConfig, ref: Reference) -> TrainConfig:
    """``cfg`` with the reference's architecture as ``model.*``; a ``model.*`` set to another value is refused
    (a query trains the reference's network, and any other value would be silently dropped)."""
    args, default = ref.info["model_args"], ModelConfig()
    arch = [f.name for f in fields(ModelConfig) if f.name not in _EXECUTION_OPTIONS]
    # a reference trained with n_hidden / n_latent unset has the sizes the formulas gave: model.n_latent=4 on a
    # reference of 4 latents was refused as "has n_latent=None"
    built = dict(zip(("n_hidden", "n_latent"),
                     layer_sizes(args.get("n_regions", 1), args.get("n_hidden"), args.get("n_latent")), strict=True))
    for k in arch:
        mine, theirs = getattr(cfg.model, k), args.get(k)
        if mine != getattr(default, k) and mine != theirs and not (theirs is None and mine == built.get(k)):
            has = f"{theirs!r} (= {built[k]})" if theirs is None and k in built else repr(theirs)
            raise ConfigError(f"model.{k}={mine!r}, but query.reference={cfg.query.reference} has {k}={has}: "
                              "a query trains the reference's architecture (leave model.* unset)")
    if args.get("modality_weights") == "cell":
        # per-cell weights are rows of the reference's training cells; the query's cells have none
        raise ConfigError(f"query.reference={cfg.query.reference} learned per-cell modality weights "
                          "(modality_weights=cell): they belong to its training cells, a query cannot use them")
    taken = [f"{k}={args[k]!r}" for k in arch if k in args and getattr(cfg.model, k) != args[k]]
    if taken:  # a value set to the default cannot be told from an unset one: say which values the query uses
        print0(f"[query] model.* from query.reference={cfg.query.reference}: {', '.join(taken)} (a query trains "
               "the reference's architecture)")
    return replace(cfg, model=replace(cfg.model, **{k: args[k] for k in arch if k in args}))


def query_meta(meta, ref: Reference):
    """The store's meta with the model's categories (the reference's, then the store's new ones)."""
    info = ref.info
    why = data_mismatch(meta, info)
    if why:
        raise ConfigError(f"data.store {why} (query.reference={ref.path}; build the query store with mva-build ... "
                          f"features_from={ref.path})")

    def extended(old: list[str], store: list[str]) -> list[str]:
        return list(old) + [c for c in store if c not in set(old)]

    return replace(meta, batch_key=info["batch_key"],
                   batch_categories=extended(info["batch_categories"], meta.batch_categories),
                   cat_cov_categories={k: extended(info["cat_cov_categories"][k], meta.cat_cov_categories[k])
                                       for k in meta.cat_cov_keys})


def start_from_reference(module: nn.Module, ref: Reference) -> None:
    """Load the reference's weights into ``module`` (built with the extended categories); the columns of new
    categories keep the module's own (seeded) initial values."""
    old_cats = [ref.info["model_args"]["n_batch"], *ref.info["model_args"]["n_cats_per_cov"]]
    new_cats = list(module.cat_list)
    stacks = {n: m for n, m in module.named_modules() if isinstance(m, FCStack)}
    state = module.state_dict()
    missing = set(ref.state) - set(state)
    if missing:
        raise ConfigError(f"query.reference: the query model has no {sorted(missing)[:3]}")
    for key, new in state.items():
        # a fused encoder's covariate weight exists only with covariate columns: a 1-batch reference has none
        old = ref.state.get(key, new[:, :0] if new.dim() == 2 else None)
        if old is not None and new.shape == old.shape:
            new.copy_(old)
            continue
        m = re.fullmatch(r"(.+)\.linears\.(\d+)\.weight", key)
        if old is not None and m and m.group(1) in stacks and stacks[m.group(1)].inject[int(m.group(2))]:
            cols, unseen = _old_columns(new.shape[1] - covariate_width(new_cats), old_cats, new_cats)
            new[:, cols] = old
            new[:, unseen] = 0
        elif key == "px_r" and new.dim() == 2:  # gene-batch dispersion: one column per batch
            new[:, : old.shape[1]] = old
        elif key in ("library_log_mean", "library_log_var"):  # lognormal library prior: one entry per batch
            new[: old.shape[0]] = old  # the new batches' from the query store (trainer/library_prior.py)
        else:
            had = "no such weight" if old is None else f"shape {tuple(old.shape)}"
            raise ConfigError(f"query.reference: {key} has {had} in the reference, {tuple(new.shape)} in the query "
                              "model; no rule extends it")


def _old_columns(n_main: int, old_cats: list[int], new_cats: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the extended weight of the old weight's columns, columns to zero). The old columns: the
    main input, then each category block's old columns at the start of its (wider) new block. A block of
    one category has no columns (the reference's rule, covariate_width): its category gets a column only
    now, and a zero one, which is what it contributed before (the reference draws it at random, so a
    single-batch atlas's own cells got other latents from the query model)."""
    cols, zero, pos = list(range(n_main)), [], n_main
    for o, n in zip(old_cats, new_cats, strict=True):
        w_old, w_new = (o if o > 1 else 0), (n if n > 1 else 0)
        cols += range(pos, pos + w_old)
        if w_old == 0 and w_new:
            zero.append(pos)  # the old single category is code 0 of the extended list
        pos += w_new
    return torch.tensor(cols, dtype=torch.long), torch.tensor(zero, dtype=torch.long)


def _requires_grad(key: str, q: QueryConfig) -> bool:
    """scvi-tools' ``_set_params_online_update`` ``requires_grad(key)`` on a reference parameter name."""
    mod = key.split(".")[0]
    return (("fc_layers" in key and ".0." in key and mod not in ("encoder_z2_z1", "decoder_z1_z2"))
            or mod == "l_encoder"
            or "background_pro_alpha" in key or "background_pro_log_beta" in key
            or ("fc_layers" in key and ".1." in key and "encoder" in key and not q.freeze_batchnorm_encoder)
            or ("fc_layers" in key and ".1." in key and "decoder" in key and not q.freeze_batchnorm_decoder)
            or "_embeddings_dict." in key)


def _hooks_first_layer(prefix: str, q: QueryConfig) -> bool:
    return not ((not q.freeze_expression and "encoder" in prefix)
                or (not q.freeze_decoder_first_layer and "px_decoder" in prefix))


def trainable_masks(module: nn.Module, q: QueryConfig) -> tuple[dict[str, bool], dict[str, torch.Tensor]]:
    """(in the optimizer, gradient mask) per parameter name of ``module``, by the reference's rules."""
    params = dict(module.named_parameters())
    stacks = _stacks(module)
    rg, keep = {}, {}
    for key, t in to_reference_layout(params).items():
        on = _requires_grad(key, q)
        mask = torch.full(t.shape, on, dtype=torch.float32)
        m = _LAYER.fullmatch(key)
        if on and m and m.group(1) in stacks and m.group(1).split(".")[0] != "l_encoder":
            stack, i = stacks[m.group(1)], int(m.group(2))
            if i > 0 or _hooks_first_layer(m.group(1), q):
                mask.zero_()
                if m.group(3) == "weight" and stack.inject[i] and stack.n_cov:
                    mask[:, -stack.n_cov:] = 1  # the one-hot columns: the new categories' embedding
        rg[key], keep[key] = torch.full(t.shape, float(on)), mask
    on_ours = ours_state_from_reference(rg, params)
    return ({k: bool(v.all()) for k, v in on_ours.items()},
            {k: v.bool() for k, v in ours_state_from_reference(keep, params).items()})


def _stacks(module: nn.Module) -> dict[str, FCStack]:
    """Our FCStacks by the reference's name of the same FCLayers (a library net absent with size factors)."""
    out = {}
    for ours, ref, kind in _MODULE_MAP:
        if kind == "stack":
            with contextlib.suppress(AttributeError):  # get_submodule of a None attribute
                out[ref] = module.get_submodule(ours)
    return out


class _KeepColumns:
    """Gradient hook: zero outside ``mask`` (NaN there included, as the reference's copy into zeros)."""

    def __init__(self, mask: torch.Tensor):
        self.mask, self._on = mask, {}

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        m = self._on.get(grad.device)
        if m is None:
            m = self._on[grad.device] = self.mask.to(grad.device)
        return torch.where(m, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def freeze(module: nn.Module, q: QueryConfig) -> dict[str, torch.Tensor]:
    """Apply the query's freezing to ``module`` (before it is wrapped); return the gradient masks."""
    if q.unfrozen:
        return {}
    on, masks = trainable_masks(module, q)
    params = dict(module.named_parameters())
    if not any(on[k] and bool(masks[k].any()) for k in params):
        # a 1-batch reference without categorical covariates and a store of that same batch: no covariate column
        # exists, so the run only decayed the frozen weights (weight decay) and said "done"
        raise ConfigError("query: nothing would train: the query's rules leave no weight free (a reference of one "
                          "batch and no categorical covariate, queried on a store that adds no new batch or category, "
                          "has no covariate column to learn); query a store of new batches, or set "
                          "query.unfrozen=true to fine-tune every weight")
    for name, p in params.items():
        p.requires_grad_(on[name])
        if on[name] and not masks[name].all():
            p.register_hook(_KeepColumns(masks[name]))
    for m in module.modules():
        if isinstance(m, nn.Dropout) and q.freeze_dropout:
            m.p = 0.0
    for ref, stack in _stacks(module).items():
        for i, bn in enumerate(stack.batch_norms or []):
            key = f"{ref}.fc_layers.Layer {i}.1"
            if ("decoder" in key and q.freeze_batchnorm_decoder) or ("encoder" in key and q.freeze_batchnorm_encoder):
                bn.momentum = 0.0  # running statistics stay the reference's
    return {k: v if on[k] else torch.zeros_like(v) for k, v in masks.items()}


def start(module: nn.Module, ref: Reference, q: QueryConfig) -> None:
    """The query model's starting point: the reference's weights (none from a record: the checkpoint's follow),
    then what trains."""
    if ref.state is not None:
        start_from_reference(module, ref)
    freeze(module, q)


def keep_record(ref: Reference, run_dir: Path) -> None:
    """Rank 0, with each checkpoint (once): the reference's model.json into the run directory, so that a resume
    does not depend on the reference directory still being there."""
    dst = Path(run_dir) / RECORD
    if not dst.is_file():
        tmp = dst.with_name(f".{RECORD}.tmp")
        tmp.write_text(json.dumps(ref.info))
        os.replace(tmp, dst)


def check_resumable(ref: Reference | None, checkpoint: str, run_dir: Path, main: bool) -> None:
    """The run's reference against its record, once the checkpoint to resume (or none) is known. A reference read
    from the record has no weights: only a checkpoint can supply them. A resume must query the model the run
    started from (given at any path: query.reference may move): its model.json equals the record beside the
    checkpoint. A fresh start drops an earlier run's record (``keep_record`` writes this one's)."""
    if ref is None:
        return
    if ref.state is None and not checkpoint:
        raise ConfigError(f"query.reference={ref.path} is gone and this run resumes no checkpoint (none in the run "
                          "directory, or run.resume=none): give the reference model")
    record = Path(checkpoint).parent.parent / RECORD if checkpoint else Path(run_dir) / RECORD
    if not checkpoint:
        if main:
            record.unlink(missing_ok=True)
    elif record.is_file() and json.loads(record.read_text()) != json.loads(json.dumps(ref.info)):
        raise ConfigError(f"query.reference={ref.path} is not the model this run started from (its record {record} "
                          "differs): give that model, or start a new run.output_dir")


def for_query(cfg: TrainConfig, meta):
    """(config, the model's meta, Reference or None): the run's config and categories with query.reference
    applied; unchanged without it."""
    if not cfg.query.reference:
        return cfg, meta, None
    if cfg.dist.backend == "deepspeed" and cfg.dist.precision == "bf16":
        # DeepSpeed casts the whole module to bf16 and keeps fp32 masters only of what trains: the frozen
        # reference weights would be exported rounded to bf16 (DDP's bf16 autocast keeps them fp32)
        raise ConfigError("query.reference with dist.backend=deepspeed and dist.precision=bf16 would round the frozen "
                          "reference weights to bf16: use dist.backend=ddp (bf16 autocast) or precision fp32")
    ref = load_reference(cfg.query.reference, _records(cfg))
    return with_reference_model(cfg, ref), query_meta(meta, ref), ref


def adapt_streams(streams, meta, model_meta, ref: Reference) -> None:
    """Renumber the streams' category codes from the store's lists to the model's (extended) ones, and give
    them the reference's ATAC size-factor scale (a fixed scale of a use_size_factor model, not the query
    store's largest ATAC total; inference does the same, trainer/jobs/common.py)."""
    maps = code_maps(meta, {"batch_categories": model_meta.batch_categories,
                            "cat_cov_categories": model_meta.cat_cov_categories})
    scale = training_atac_library_max(ref.info)
    for s in streams:
        s.recode(*maps)
        if s.size_factor and scale is not None:
            s.table.atac_library_max = scale
