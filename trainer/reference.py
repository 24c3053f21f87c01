"""Bridge to the reference implementation (scvi-tools 1.5.1) for parity tests and benchmarks.

* ``build_reference(module)`` / ``build_reference_classifier(classifier)`` construct
  ``scvi.module.MULTIVAE`` / ``scvi.module.Classifier`` with exactly the same sizes and options;
* ``reference_state_from_ours`` / ``ours_state_from_reference`` map state dicts in both directions
  (pure renaming: every tensor keeps its shape and column order);
* ``reference_tensors(batch)`` turns one of our minibatches into the reference's tensor dict
  (missing modalities become zero rows, which is how the reference infers them).

scvi-tools is imported lazily: nothing in the training path depends on it.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch.nn import functional as F

from data import keys
from trainer.classifier import BatchClassifier
from trainer.module import MultiVAE

# (our module prefix, reference prefix, kind): "stack" = FCStack <-> FCLayers, "linear" = nn.Linear
_MODULE_MAP = [
    ("rna_encoder.z_stack", "z_encoder_expression.encoder", "stack"),
    ("rna_encoder.mean", "z_encoder_expression.mean_encoder", "linear"),
    ("rna_encoder.var", "z_encoder_expression.var_encoder", "linear"),
    ("rna_encoder.lib_stack", "l_encoder_expression.px_decoder", "stack"),
    ("rna_encoder.lib_out", "l_encoder_expression.output.0", "linear"),
    # model.rna_library=lognormal only, which the reference has not: a name for the query rules (a Linear
    # outside FCLayers, so frozen like output.0); exports to scvi-tools refuse such a model first
    ("rna_encoder.lib_var", "l_encoder_expression.var_output", "linear"),
    ("atac_encoder.z_stack", "z_encoder_accessibility.encoder", "stack"),
    ("atac_encoder.mean", "z_encoder_accessibility.mean_encoder", "linear"),
    ("atac_encoder.var", "z_encoder_accessibility.var_encoder", "linear"),
    ("atac_encoder.lib_stack", "l_encoder_accessibility.px_decoder", "stack"),
    ("atac_encoder.lib_out", "l_encoder_accessibility.output.0", "linear"),
    ("rna_decoder", "z_decoder_expression.px_decoder", "stack"),
    ("px_scale", "z_decoder_expression.px_scale_decoder.0", "linear"),
    ("px_dropout", "z_decoder_expression.px_dropout_decoder", "linear"),
    ("px_r_head", "z_decoder_expression.px_r_decoder", "linear"),
    ("atac_decoder", "z_decoder_accessibility.px_decoder", "stack"),
    ("atac_out", "z_decoder_accessibility.output.0", "linear"),
]
_PARAMS = ("px_r", "region_factors", "mod_weights")
_CLASSIFIER_MAP = [("hidden", "classifier.0", "stack"), ("out", "classifier.1", "linear")]


def _key_to_reference(key: str, table: list, params: tuple = ()) -> str | None:
    if key in params:
        return key
    for ours, ref, kind in table:
        if not key.startswith(ours + "."):
            continue
        rest = key[len(ours) + 1 :]
        if kind == "linear":
            return f"{ref}.{rest}"
        m = re.fullmatch(r"(linears|batch_norms)\.(\d+)\.(.+)", rest)
        if m is None:
            raise KeyError(f"unexpected stack parameter {key!r}")
        slot = 0 if m.group(1) == "linears" else 1  # Sequential(Linear, BatchNorm1d, LayerNorm, act, dropout)
        return f"{ref}.fc_layers.Layer {m.group(2)}.{slot}.{m.group(3)}"
    return None


def reference_key(key: str) -> str:
    """Reference key of one of our keys that maps 1:1 (not the fused encoder input weights)."""
    ref = _key_to_reference(key, _MODULE_MAP, _PARAMS)
    if ref is None:
        raise KeyError(f"no reference counterpart for {key!r}")
    return ref


_FUSED = re.compile(r"(rna_encoder|atac_encoder)\.(z_stack|lib_stack)\.linears\.0\.weight")


def to_reference_layout(ours: dict) -> dict:
    """Our tensors (state dict, or gradients keyed like named_parameters) -> reference keys and shapes.

    Each encoder's fused ``input_weight`` (n_in, k*H) is split and transposed back into the counts
    columns of the reference's two first-layer weights, ahead of their covariate columns (a stack
    without covariates has no weight of its own).
    """
    out = {}
    for key, value in ours.items():
        if key.endswith(".input_weight"):
            enc = key[: -len(".input_weight")]
            H = value.shape[1] // (2 if f"{enc}.lib_stack.linears.0.bias" in ours else 1)
            for i, stack in enumerate(("z_stack", "lib_stack")[: value.shape[1] // H]):
                part = value[:, i * H : (i + 1) * H].t()
                side = ours.get(f"{enc}.{stack}.linears.0.weight")
                out[reference_key(f"{enc}.{stack}.linears.0.weight")] = (
                    part if side is None else torch.cat([part, side], dim=1)
                )
        elif _FUSED.fullmatch(key) is None:
            out[reference_key(key)] = value
    return out


def reference_state_from_ours(ours: dict, reference_template: dict) -> dict:
    """Our state dict -> a full reference state dict (reference-only entries kept from the template)."""
    out = dict(reference_template)
    for ref, value in to_reference_layout(ours).items():
        if ref not in out:
            raise KeyError(f"reference has no {ref!r}; are the options the same?")
        if tuple(out[ref].shape) != tuple(value.shape):
            raise ValueError(
                f"shape mismatch for {ref}: ours {tuple(value.shape)}, reference {tuple(out[ref].shape)}"
            )
        out[ref] = value.detach().clone()
    return out


def ours_state_from_reference(reference: dict, our_template: dict) -> dict:
    """Reference state dict -> ours; ``our_template`` = the target's ``state_dict()`` (for shapes)."""
    out = {}
    for key, value in our_template.items():
        if key.endswith(".input_weight"):
            enc = key[: -len(".input_weight")]
            n_in = value.shape[0]
            parts = [reference[reference_key(f"{enc}.z_stack.linears.0.weight")][:, :n_in].t()]
            # The fused weight holds the library stack's half too, whether or not that stack's
            # Linear has its own covariate columns (it has no weight key without covariates).
            if value.shape[1] > parts[0].shape[1]:
                parts.append(reference[reference_key(f"{enc}.lib_stack.linears.0.weight")][:, :n_in].t())
            out[key] = torch.cat(parts, dim=1).contiguous()
        elif _FUSED.fullmatch(key):
            n_in = our_template[key.split(".")[0] + ".input_weight"].shape[0]
            out[key] = reference[reference_key(key)][:, n_in:].clone()
        else:
            out[key] = reference[reference_key(key)].clone()
    return out


def classifier_state_to_reference(ours: dict) -> dict:
    return {_key_to_reference(k, _CLASSIFIER_MAP): v.clone() for k, v in ours.items()}


def classifier_state_from_reference(reference: dict, our_keys: list[str]) -> dict:
    return {k: reference[_key_to_reference(k, _CLASSIFIER_MAP)].clone() for k in our_keys}


def build_reference(module: MultiVAE, n_obs: int | None = None):
    """A ``scvi.module.MULTIVAE`` with the same sizes and options as ``module`` (dtype and mode copied)."""
    from scvi.module import MULTIVAE

    ref = MULTIVAE(
        n_input_regions=module.n_regions,
        n_input_genes=module.n_genes,
        modality_weights=module.modality_weights,
        modality_penalty=module.modality_penalty,
        n_batch=module.n_batch,
        n_obs=module.mod_weights.shape[0] if module.modality_weights == "cell" else (n_obs or 0),
        gene_likelihood=module.gene_likelihood,
        gene_dispersion=module.dispersion,
        n_hidden=module.n_hidden,
        n_latent=module.n_latent,
        n_layers_encoder=module.n_layers_encoder,
        n_layers_decoder=module.n_layers_decoder,
        n_continuous_cov=module.n_continuous_cov,
        n_cats_per_cov=list(module.n_cats_per_cov),  # a list, never None: None would drop the batch covariate
        dropout_rate=module.dropout_rate,
        region_factors=module.region_factors is not None,
        use_batch_norm=module.use_batch_norm,
        use_layer_norm=module.use_layer_norm,
        latent_distribution=module.latent_distribution,
        deeply_inject_covariates=module.deeply_inject_covariates,
        encode_covariates=module.encode_covariates,
        use_size_factor_key=module.use_size_factor,
    )
    ref = ref.to(module.dtype)
    ref.load_state_dict(reference_state_from_ours(module.state_dict(), ref.state_dict()))
    ref.train(module.training)
    return ref


def build_reference_classifier(classifier: BatchClassifier):
    """``scvi.module.Classifier`` as the reference training plan builds it, with our weights."""
    from scvi.module import Classifier

    drop = classifier.hidden.dropout
    ref = Classifier(
        n_input=classifier.hidden.n_in,
        n_hidden=classifier.hidden.linears[0].out_features,
        n_labels=classifier.n_batch,
        n_layers=len(classifier.hidden.linears),
        dropout_rate=drop.p if drop is not None else 0.0,
        logits=True,
    ).to(classifier.out.weight.dtype)
    ref.load_state_dict(classifier_state_to_reference(classifier.state_dict()))
    ref.train(classifier.training)
    return ref


def reference_tensors(batch: dict, n_cats: int = 0) -> dict:
    """Our minibatch -> the reference's tensor dict (dense, zero rows for missing modalities)."""

    def dense(t):
        return t.to_dense() if t.layout == torch.sparse_csr else t

    mask = batch[keys.MASK].bool()
    rna = dense(batch[keys.RNA]) * mask[:, :1]
    atac = dense(batch[keys.ATAC]) * mask[:, 1:]
    n = rna.shape[0]
    out = {
        "X": rna,
        "atac": atac,
        "batch": batch[keys.BATCH].reshape(n, 1),
        "labels": torch.zeros(n, 1, dtype=torch.long),
        "ind_x": batch.get(keys.INDEX, torch.arange(n)).reshape(n, 1),
    }
    if n_cats:
        out["extra_categorical_covs"] = batch[keys.CAT_COVS]
    if keys.CONT_COVS in batch and batch[keys.CONT_COVS].shape[-1] > 0:
        out["extra_continuous_covs"] = batch[keys.CONT_COVS]
    if keys.SIZE_FACTOR in batch:
        out["size_factor"] = batch[keys.SIZE_FACTOR]
    return out


def reference_forward(ref, tensors: dict, kl_weight: float = 1.0):
    """(inference outputs, generative outputs, LossOutput) of the reference module."""
    # region_factors or px_r may be absent (region_factors=False; dispersion=gene-cell has no px_r): any parameter
    with float64_compat(next(ref.parameters()).dtype):
        inf = ref.inference(**ref._get_inference_input(tensors))
        gen = ref.generative(**ref._get_generative_input(tensors, inf))
        return inf, gen, ref.loss(tensors, inf, gen, kl_weight=kl_weight)


@contextlib.contextmanager
def float64_compat(dtype: torch.dtype):
    """Let the reference run in float64 without changing its math.

    Two float32 literals in the reference break a float64 module: its empty protein input is made with
    the default dtype (so the default dtype is set to ``dtype``), and its ATAC target is ``.float()``
    (so ``BCELoss`` casts the target to the input's dtype; the values are 0/1 either way).
    """
    previous = torch.get_default_dtype()
    original = torch.nn.BCELoss.forward

    def forward(self, input, target):
        return F.binary_cross_entropy(
            input, target.to(input.dtype), weight=self.weight, reduction=self.reduction
        )

    torch.set_default_dtype(dtype)
    torch.nn.BCELoss.forward = forward
    try:
        yield
    finally:
        torch.nn.BCELoss.forward = original
        torch.set_default_dtype(previous)


def reference_training_plan(ref, adversarial: bool, n_epochs_kl_warmup: int = 50):
    """The reference's ``AdversarialTrainingPlan`` configured as ``MULTIVI.train()`` hard-codes it
    (AdamW 1e-4 / 1e-3 / 1e-8, kappa 1), with its own optimizers: ``(plan, vae_opt, classifier_opt|None)``."""
    from scvi.train import AdversarialTrainingPlan

    plan = AdversarialTrainingPlan(
        ref,
        lr=1e-4,
        weight_decay=1e-3,
        eps=1e-8,
        optimizer="AdamW",
        adversarial_classifier=adversarial,
        scale_adversarial_loss=1,
        n_epochs_kl_warmup=n_epochs_kl_warmup,
    )
    opts = plan.configure_optimizers()
    opts = opts if isinstance(opts, list | tuple) else [opts]
    opts = [o["optimizer"] if isinstance(o, dict) else o for o in opts]
    return plan, opts[0], (opts[1] if len(opts) > 1 else None)
