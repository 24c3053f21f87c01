"""Three full training steps of ours vs the reference's training-plan math leave identical weights.

What drives the reference: ``scvi.module.MULTIVAE`` inside a real ``scvi.train.AdversarialTrainingPlan``
built with the arguments ``MULTIVI.train()`` hard-codes (AdamW lr 1e-4, wd 1e-3, eps 1e-8, adversarial
classifier, kappa 1). We take the plan's own classifier (``scvi.module.Classifier``), its own
``configure_optimizers()`` (fused AdamW + Adam lr 1e-3, eps 0.01, wd 1e-3), its own
``loss_adversarial_classifier`` and the reference ``_compute_kl_weight``, and replay the body of its
manual-optimisation ``training_step`` (VAE loss + kappa * fool loss -> AdamW step; classifier loss on
detached z -> Adam step) without Lightning's Trainer.

Identical randomness: float64; dropout 0 in the VAE; the reference's reparameterisation noise is
patched to a fixed tensor that ours receives as ``eps``; the classifier keeps its dropout 0.1 and both
implementations are re-seeded before each step, so they draw identical dropout masks (the classifier
calls are the only consumers of the RNG in both; the reference's protein-decoder dropout, which acts
only on the unused protein branch, is replaced by Identity for that reason). Run: ``.venv/bin/python -m pytest tests/test_step_parity.py -q``
"""

from __future__ import annotations

import pytest
import torch

from tests.test_parity import fixed_noise, load_pbmc_counts, make_batch, randomize, rel_close
from trainer.classifier import build_classifier
from trainer.module import MultiVAE
from trainer.reference import (
    classifier_state_to_reference,
    reference_forward,
    reference_tensors,
    to_reference_layout,
)
from trainer.schedules import kl_weight
from trainer.step import build_optimizers, train_step

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors", "ignore:.*fused.*")


@pytest.fixture
def pbmc_counts():
    return load_pbmc_counts()


def _reference_plan(ours: MultiVAE, classifier):
    from trainer.reference import build_reference, reference_training_plan

    ref = build_reference(ours)
    # The protein decoder has a hard-coded dropout 0.1 whose outputs never reach the loss without
    # proteins, but whose masks consume the RNG; make it Identity so the classifier's masks line up.
    for name, mod in list(ref.z_decoder_pro.named_modules()):
        if isinstance(mod, torch.nn.Dropout):
            parent = ref.z_decoder_pro.get_submodule(name.rsplit(".", 1)[0])
            parent[int(name.rsplit(".", 1)[1])] = torch.nn.Identity()
    plan, opt_vae, opt_cls = reference_training_plan(ref, classifier is not None, n_epochs_kl_warmup=2)
    if classifier is not None:
        plan.adversarial_classifier.double()
        plan.adversarial_classifier.load_state_dict(classifier_state_to_reference(classifier.state_dict()))
        # the optimizers hold the parameter objects; .double() and load_state_dict update them in place
    return ref, plan, opt_vae, opt_cls


def _reference_step(ref, plan, opt1, opt2, tensors, beta):
    """The body of AdversarialTrainingPlan.training_step (manual optimisation), kappa = 1."""
    inf, _, scvi_loss = reference_forward(ref, tensors, kl_weight=beta)
    loss = scvi_loss.loss
    if opt2 is not None:
        loss = loss + plan.loss_adversarial_classifier(inf["z"], tensors["batch"], False) * 1
    opt1.zero_grad()
    loss.backward()
    opt1.step()
    if opt2 is not None:
        cls_loss = plan.loss_adversarial_classifier(inf["z"].detach(), tensors["batch"], True) * 1
        opt2.zero_grad()
        cls_loss.backward()
        opt2.step()
    return loss.item()


MIXED = ("mixed",) * 3
# a paired/unpaired minibatch, then one without ATAC cells, then one without RNA cells
ONE_MODALITY = ("mixed", "rna_only", "atac_only")


@pytest.mark.parametrize(
    ("options", "layouts"),
    [
        ({"n_batch": 3, "n_cats_per_cov": (2,), "n_continuous_cov": 1, "encode_covariates": True}, MIXED),
        ({"n_batch": 1}, MIXED),
        # BatchNorm running statistics (VAE and classifier) over the steps, per-cell weights, ln latent
        (
            {"n_batch": 2, "use_batch_norm": "both", "modality_weights": "cell", "n_obs": 40,
             "latent_distribution": "ln"},
            ONE_MODALITY,
        ),
        ({"n_batch": 2, "use_size_factor": True, "gene_likelihood": "nb", "region_factors": False}, ONE_MODALITY),
    ],
    ids=["3-batches-adversarial", "single-batch-no-classifier", "batch-norm-cell-ln-one-modality",
         "size-factors-one-modality"],
)  # fmt: skip
def test_three_steps_leave_identical_weights(pbmc_counts, monkeypatch, options, layouts):
    from scvi.train._trainingplans import _compute_kl_weight

    torch.manual_seed(0)
    options = {"modality_weights": "universal", **options}
    ours = MultiVAE(45, 174, dropout_rate=0.0, **options).double()
    randomize(ours)
    classifier = build_classifier(ours)
    assert (classifier is None) == (options["n_batch"] == 1)
    ref, plan, ref_opt1, ref_opt2 = _reference_plan(ours, classifier)
    vae_opt, cls_opt = build_optimizers(ours, classifier)
    ours.train(), ref.train()
    initial = ours.atac_out.weight.detach().clone()

    for step in range(3):
        batch = make_batch(
            pbmc_counts,
            n_batch=options["n_batch"],
            n_cats=options.get("n_cats_per_cov", ()),
            n_cont=options.get("n_continuous_cov", 0),
            seed=step,
            size_factor=options.get("use_size_factor", False),
            layout=layouts[step],
        )
        beta = kl_weight(epoch=step, n_epochs_kl_warmup=2)
        assert beta == _compute_kl_weight(step, step, 2, None)
        noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
        fixed_noise(monkeypatch, noise)
        torch.manual_seed(100 + step)
        ref_loss = _reference_step(
            ref, plan, ref_opt1, ref_opt2, reference_tensors(batch, len(ours.n_cats_per_cov)), beta
        )
        torch.manual_seed(100 + step)
        terms = train_step(ours, classifier, vae_opt, cls_opt, batch, beta, eps=noise)
        assert abs(terms["loss"] - ref_loss) <= 1e-9 * abs(ref_loss)
        assert set(terms) == {"recon_rna", "recon_atac", "kl", "penalty", "adversarial", "classifier", "loss"}
        assert (terms["adversarial"] > 0) == (classifier is not None)

    ref_state = ref.state_dict()
    for name, value in to_reference_layout(ours.state_dict()).items():
        rel_close(value, ref_state[name], f"after 3 steps: {name}")
    if classifier is not None:
        ref_cls = classifier_state_to_reference(classifier.state_dict())
        cls_state = plan.adversarial_classifier.state_dict()
        for k, v in ref_cls.items():
            rel_close(v, cls_state[k], f"classifier after 3 steps: {k}")
    # the steps really moved the weights (a test that cannot fail would pass without training)
    assert (ours.atac_out.weight - initial).abs().max() > 1e-5
