"""Query mapping in the trainer (``query.reference``, trainer/query.py): scArches as scvi-tools'
``MULTIVI.load_query_data`` does it, streamed from a store, under torchrun.

    .venv/bin/python -m pytest tests/test_query.py -q

* What trains: every parameter's gradient mask and optimizer membership, the dropout rates and the
  batch-norm momenta equal what scvi-tools' own ``_set_params_online_update`` sets on a ``MULTIVAE``
  holding the same weights (default options and every option flipped; batch norm, covariates, deep
  injection on so that every rule is exercised).
* The new categories' columns go to their own block (the reference's surgery misplaces them when the model
  has categorical covariates).
* A 2-process DDP and a DeepSpeed ZeRO 2 query run: the reference's frozen weights come out bit-identical,
  the new batches' columns trained, the reference cells' latents unchanged, the query cells embed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from tests.train_utils import PY, ROOT, env, tiny_config, tiny_overrides, train_cli
from trainer.config import ConfigError, QueryConfig
from trainer.loop import seed_everything
from trainer.module import MultiVAE
from trainer.query import Reference, freeze, start_from_reference, trainable_masks

ARCH = {"n_genes": 20, "n_regions": 30, "n_hidden": 16, "n_latent": 4, "n_cats_per_cov": [3], "n_continuous_cov": 1,
        "use_batch_norm": "both", "encode_covariates": True, "deeply_inject_covariates": True}
OPTIONS = [QueryConfig(),
           QueryConfig(freeze_expression=False, freeze_decoder_first_layer=False, freeze_batchnorm_encoder=False,
                       freeze_batchnorm_decoder=True, freeze_dropout=True)]


def _scvi_masks(ref_module) -> tuple[dict, dict]:
    """(requires_grad as a tensor, the hooks' effect on a gradient of ones) per scvi-tools parameter."""
    rg, keep = {}, {}
    for key, p in ref_module.named_parameters():
        g = torch.ones_like(p)
        for hook in (p._backward_hooks or {}).values():
            g = hook(g)
        rg[key] = torch.full(p.shape, float(p.requires_grad))
        keep[key] = g if p.requires_grad else torch.zeros_like(p)
    return rg, keep


@pytest.mark.parametrize("q", OPTIONS, ids=["defaults", "flipped"])
def test_what_trains_is_what_scvi_tools_load_query_data_leaves_free(q):
    from scvi.model.base._archesmixin import _set_params_online_update

    from trainer.reference import build_reference, ours_state_from_reference

    torch.manual_seed(0)
    module = MultiVAE(n_batch=4, **ARCH)
    ref = build_reference(module)
    _set_params_online_update(ref, unfrozen=False, freeze_decoder_first_layer=q.freeze_decoder_first_layer,
                              freeze_batchnorm_encoder=q.freeze_batchnorm_encoder,
                              freeze_batchnorm_decoder=q.freeze_batchnorm_decoder, freeze_dropout=q.freeze_dropout,
                              freeze_expression=q.freeze_expression, freeze_classifier=True)
    rg, keep = _scvi_masks(ref)
    params = dict(module.named_parameters())
    want_on = {k: bool(v.all()) for k, v in ours_state_from_reference(rg, params).items()}
    want_keep = ours_state_from_reference(keep, params)
    on, masks = trainable_masks(module, q)
    assert on == want_on
    assert 0 < sum(on.values()) < len(on)  # some train, some not: the comparison says something
    for k, m in masks.items():
        np.testing.assert_array_equal(m.numpy(), want_keep[k].bool().numpy(), err_msg=k)
    assert any(0 < m.sum() < m.numel() for m in masks.values())  # partly trainable weights exist

    got = freeze(module, q)
    for k, p in module.named_parameters():
        assert p.requires_grad == on[k], k
        np.testing.assert_array_equal(got[k].numpy(), (want_keep[k].bool() & on[k]).numpy(), err_msg=k)
    # dropout rates and batch-norm momenta of the same layers
    ref_mods = dict(ref.named_modules())
    for ours, theirs in (("rna_encoder.z_stack", "z_encoder_expression.encoder"),
                         ("atac_encoder.lib_stack", "l_encoder_accessibility.px_decoder"),
                         ("rna_decoder", "z_decoder_expression.px_decoder")):
        stack = module.get_submodule(ours)
        for i, bn in enumerate(stack.batch_norms):
            assert bn.momentum == ref_mods[f"{theirs}.fc_layers.Layer {i}.1"].momentum, (ours, i)
        drop = ref_mods.get(f"{theirs}.fc_layers.Layer 0.4")
        assert (stack.dropout.p if stack.dropout is not None else 0.0) == (drop.p if drop is not None else 0.0), ours


def test_masked_gradients_reach_only_the_trainable_columns():
    torch.manual_seed(0)
    module = MultiVAE(n_batch=4, **ARCH)
    masks = freeze(module, QueryConfig())
    w = module.rna_decoder.linears[0].weight
    (w * torch.randn_like(w)).sum().backward()
    assert torch.equal(w.grad != 0, masks["rna_decoder.linears.0.weight"])
    # the columns that train are the one-hot ones: batch (4) and the covariate (3), not latent nor continuous
    assert masks["rna_decoder.linears.0.weight"][0].tolist() == [False] * 5 + [True] * 7


def test_new_categories_get_columns_in_their_own_block():
    torch.manual_seed(0)
    old = MultiVAE(n_batch=2, **{**ARCH, "n_cats_per_cov": [3]})
    new = MultiVAE(n_batch=3, **{**ARCH, "n_cats_per_cov": [4]})
    init = new.rna_decoder.linears[0].weight.detach().clone()
    start_from_reference(new, Reference(Path("-"), {"model_args": {"n_batch": 2, "n_cats_per_cov": [3]}},
                                        old.state_dict()))
    w_old, w_new = old.rna_decoder.linears[0].weight, new.rna_decoder.linears[0].weight
    # columns: latent (4) + continuous (1), batch [b0 b1 | b2 new], covariate [c0 c1 c2 | c3 new]
    torch.testing.assert_close(w_new[:, [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]], w_old, rtol=0, atol=0)
    torch.testing.assert_close(w_new[:, [7, 11]], init[:, [7, 11]], rtol=0, atol=0)
    torch.testing.assert_close(new.px_scale.weight, old.px_scale.weight, rtol=0, atol=0)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A reference model, and a query store of other cells in two new batches (built with features_from)."""
    import mudata

    from data.synthetic import write_synthetic_store
    from trainer.train import train

    root = tmp_path_factory.mktemp("query_train")
    ref_store = write_synthetic_store(root / "ref", n_cells=240, n_genes=60, n_regions=150, progress=False)
    run = train(tiny_config(ref_store, root / "run")).run_dir
    q = write_synthetic_store(root / "qsyn", n_cells=160, n_genes=60, n_regions=150, seed=7, progress=False)
    md = mudata.read_zarr(open_store(q).shard_path(0))
    md.obs["batch"] = ("query_" + md.obs["batch"].astype(str)).astype("category")
    md.write(root / "query.h5mu")
    qstore = build_store(BuildConfig(out=str(root / "query.zarr"), progress=False, features_from=str(run),
                                     inputs=[InputConfig(kind="h5mu", path=str(root / "query.h5mu"))]))
    return {"ref_store": ref_store, "run": Path(run), "qstore": qstore}


def _embed(store, model, out) -> pd.DataFrame:
    from trainer.infer import infer
    from trainer.infer_config import InferConfig

    infer(InferConfig(model_dir=str(model), store=str(store), output=str(out), batch_size=64, progress=False,
                      modalities=["joint"]))
    a = ad.read_zarr(str(out))
    return pd.DataFrame(np.asarray(a.obsm["X_multivi"]), index=a.obs_names)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_a_two_process_query_run_trains_only_the_new_batches(stores, tmp_path, backend):
    out = tmp_path / "qrun"
    extra = {"query.reference": str(stores["run"]), "optim.weight_decay": 0.0}
    if backend == "deepspeed":
        extra.update({"dist.backend": "deepspeed", "dist.zero_stage": 2})
    train_cli(tiny_overrides(stores["qstore"], out, **extra), nproc=2)
    info = json.loads((out / "model" / "model.json").read_text())
    assert info["batch_categories"] == ["batch_0", "batch_1", "query_batch_0", "query_batch_1"]
    before, after = load_file(stores["run"] / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    seed_everything(0)  # the run's seed: the query model's initial values, new columns included
    init = MultiVAE(**info["model_args"]).state_dict()
    assert before.keys() == after.keys()
    extended = []
    for k, v in before.items():
        if v.shape == after[k].shape:
            assert torch.equal(v, after[k]), k
        else:  # decoder first layers: latent columns and the old batches' columns kept, the new ones trained
            assert torch.equal(after[k][:, : v.shape[1]], v), k
            assert (after[k][:, v.shape[1]:] != init[k][:, v.shape[1]:]).all(), k
            extended.append(k)
    assert sorted(extended) == ["atac_decoder.linears.0.weight", "rna_decoder.linears.0.weight"]
    trained = json.loads((out / "result.json").read_text())
    assert trained["steps"] > 0 and trained["world_size"] == 2
    ref_cells = [_embed(stores["ref_store"], m, tmp_path / f"{i}.zarr") for i, m in enumerate((stores["run"], out))]
    np.testing.assert_array_equal(ref_cells[1].to_numpy(), ref_cells[0].to_numpy())
    assert np.isfinite(_embed(stores["qstore"], out, tmp_path / "q.zarr").to_numpy()).all()


def test_weight_decay_shrinks_hooked_weights_and_not_frozen_ones(stores, tmp_path):
    """As in the reference: a weight whose gradient the rules zero stays in AdamW (decays), a frozen one not."""
    from trainer.train import train

    res = train(tiny_config(stores["qstore"], tmp_path / "r", **{"query.reference": str(stores["run"]),
                                                                 "optim.weight_decay": 0.5}))
    before, after = load_file(stores["run"] / "model" / "model.safetensors"), load_file(Path(res.model_dir) / "model.safetensors")
    hooked, frozen = "rna_decoder.linears.1.weight", "px_scale.weight"
    ratio = (after[hooked] / before[hooked]).flatten()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and 0.99 < float(ratio[0]) < 1  # (1 - lr*wd)^steps
    assert torch.equal(after[frozen], before[frozen])


def test_query_settings_that_cannot_work_are_refused_in_one_line(stores, tmp_path):
    from trainer.train import train

    with pytest.raises(ConfigError, match=r"model.n_latent=7, but query.reference=.* has n_latent=6"):
        train(tiny_config(stores["qstore"], tmp_path / "a", **{"query.reference": str(stores["run"]),
                                                               "model.n_latent": 7}))
    with pytest.raises(ConfigError, match=r"build the query store with mva-build ... features_from="):
        other = tmp_path / "other"
        from data.synthetic import write_synthetic_store
        write_synthetic_store(other, n_cells=60, n_genes=50, n_regions=150, progress=False)
        train(tiny_config(other, tmp_path / "b", **{"query.reference": str(stores["run"])}))
    with pytest.raises(ConfigError, match="neither an exported model"):
        train(tiny_config(stores["qstore"], tmp_path / "c", **{"query.reference": str(tmp_path)}))
    res = subprocess.run([PY, "-m", "trainer.train", f"data.store={stores['qstore']}", f"query.reference={stores['run']}",
                          "dist.backend=deepspeed", "dist.precision=bf16", f"run.output_dir={tmp_path / 'd'}"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2 and "round the frozen reference weights to bf16" in res.stderr, res.stderr[-2000:]


def test_a_query_run_stopped_and_resumed_ends_as_the_uninterrupted_one(stores, tmp_path):
    from trainer.train import train

    q = {"query.reference": str(stores["run"])}
    full = train(tiny_config(stores["qstore"], tmp_path / "full", **q))
    # the reference moved away between the stop and the resume (it was needed to resume): the run's record of it
    # and the checkpoint carry the resume; with no checkpoint left the run says so
    moved = tmp_path / "reference"
    shutil.copytree(stores["run"] / "model", moved)
    q = {"query.reference": str(moved)}
    train(tiny_config(stores["qstore"], tmp_path / "part", **q, **{"run.max_steps": 4}))
    assert json.loads((tmp_path / "part" / "query_reference.json").read_text()) == \
        json.loads((moved / "model.json").read_text())
    shutil.rmtree(moved)
    part = train(tiny_config(stores["qstore"], tmp_path / "part", **q))
    assert part.steps == full.steps == 6
    a, b = load_file(Path(full.model_dir) / "model.safetensors"), load_file(Path(part.model_dir) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"is gone and this run resumes no checkpoint"):
        train(tiny_config(stores["qstore"], tmp_path / "part", **q, **{"run.resume": "none"}))


def test_a_size_factor_query_keeps_the_reference_scale(stores, tmp_path):
    from trainer.train import train

    ref = train(tiny_config(stores["ref_store"], tmp_path / "ref", **{"model.use_size_factor": True}))
    res = train(tiny_config(stores["qstore"], tmp_path / "q", **{"query.reference": ref.run_dir}))
    want = json.loads((Path(ref.model_dir) / "model.json").read_text())["training_store"]["atac_library_max"]
    got = json.loads((Path(res.model_dir) / "model.json").read_text())
    assert got["model_args"]["use_size_factor"] is True  # the reference's architecture, not the config default
    assert got["training_store"]["atac_library_max"] == want


def test_a_single_batch_atlas_keeps_its_cells_latents_under_the_query_model():
    """A 1-batch model has no batch columns; the query's extended model gets one for the atlas's batch too. A
    zero column (what that batch contributed before) keeps the atlas cells where they were; the reference's
    random one moved them (encode_covariates: the encoders read the batch)."""
    from trainer import predict

    torch.manual_seed(0)
    arch = {**ARCH, "n_cats_per_cov": [], "n_continuous_cov": 0, "use_batch_norm": "none"}
    old, new = MultiVAE(n_batch=1, **arch), MultiVAE(n_batch=3, **arch)
    start_from_reference(new, Reference(Path("-"), {"model_args": {"n_batch": 1, "n_cats_per_cov": []}},
                                        old.state_dict()))
    assert (new.rna_decoder.linears[0].weight[:, 4] == 0).all() and (new.rna_decoder.linears[0].weight[:, 5:] != 0).all()
    g = torch.Generator().manual_seed(1)
    n = 12
    batch = {"rna": torch.poisson(torch.full((n, 20), 2.0), generator=g),
             "atac": (torch.rand(n, 30, generator=g) < 0.2).float(), "mask": torch.ones(n, 2, dtype=torch.bool),
             "batch": torch.zeros(n, dtype=torch.long), "cat_covs": torch.zeros(n, 0, dtype=torch.long),
             "cont_covs": torch.zeros(n, 0)}
    with torch.no_grad():
        z_old = predict.latent(old.eval(), batch, "joint")
        z_new = predict.latent(new.eval(), batch, "joint")
    torch.testing.assert_close(z_new, z_old, rtol=0, atol=1e-6)


def test_three_query_steps_leave_the_references_query_weights(monkeypatch):
    """Numerically the reference's query training: the same weights with scvi-tools' own freezing applied to
    its MULTIVAE (``_set_params_online_update``) and ours to ours, three full steps of both training plans
    (VAE AdamW with weight decay 1e-3 + the adversary's Adam) give the same weights, float64."""
    from scvi.model.base._archesmixin import _set_params_online_update

    from tests.test_parity import fixed_noise, load_pbmc_counts, make_batch, randomize, rel_close
    from tests.test_step_parity import _reference_plan, _reference_step
    from trainer.classifier import build_classifier
    from trainer.reference import reference_tensors, to_reference_layout
    from trainer.step import build_optimizers, train_step

    counts = load_pbmc_counts()
    torch.manual_seed(0)
    opts = {"n_batch": 3, "n_cats_per_cov": (2,), "n_continuous_cov": 1, "encode_covariates": True,
            "use_batch_norm": "both", "modality_weights": "universal"}
    ours = MultiVAE(45, 174, dropout_rate=0.0, **opts).double()
    randomize(ours)
    q = QueryConfig(freeze_batchnorm_decoder=True)
    freeze(ours, q)
    classifier = build_classifier(ours)
    # scvi-tools' freezing, applied before its plan builds the optimizers (they take what requires grad)
    from trainer.reference import build_reference

    ref_module = build_reference(ours)
    _set_params_online_update(ref_module, unfrozen=False, freeze_decoder_first_layer=True, freeze_batchnorm_encoder=True,
                              freeze_batchnorm_decoder=True, freeze_dropout=False, freeze_expression=True,
                              freeze_classifier=True)
    monkeypatch.setattr("trainer.reference.build_reference", lambda module, n_obs=None: ref_module)
    ref, plan, ref_opt1, ref_opt2 = _reference_plan(ours, classifier)
    vae_opt, cls_opt = build_optimizers(ours, classifier)
    before = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    ours.train(), ref.train()
    for step in range(3):
        batch = make_batch(counts, n_batch=3, n_cats=(2,), n_cont=1, seed=step, layout="mixed")
        noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
        fixed_noise(monkeypatch, noise)
        torch.manual_seed(100 + step)
        ref_loss = _reference_step(ref, plan, ref_opt1, ref_opt2, reference_tensors(batch, 1), 0.5)
        torch.manual_seed(100 + step)
        terms = train_step(ours, classifier, vae_opt, cls_opt, batch, 0.5, eps=noise)
        assert abs(terms["loss"] - ref_loss) <= 1e-9 * abs(ref_loss)
    ref_state = ref.state_dict()
    for name, value in to_reference_layout(ours.state_dict()).items():
        rel_close(value, ref_state[name], f"after 3 query steps: {name}")
    after = ours.state_dict()
    assert torch.equal(after["px_scale.weight"], before["px_scale.weight"])  # frozen
    moved = after["rna_decoder.linears.0.weight"] - before["rna_decoder.linears.0.weight"]
    assert (moved[:, -5:] != 0).any() and (moved[:, :-5] != 0).all()  # one-hots trained, the rest decayed


def test_a_query_that_could_train_nothing_or_query_options_without_one_are_refused(tmp_path, capsys):
    """A 1-batch reference queried on a store of that same batch has no covariate column to learn: the run only
    decayed frozen weights and said "done". query.* set without query.reference was silently a run from
    scratch. A model.* value equal to the schema default cannot be told from unset: the reference's is used,
    and now said."""
    from data.synthetic import write_synthetic_store
    from trainer.config import load_config
    from trainer.train import train

    with pytest.raises(ConfigError, match=r"query\.unfrozen, query\.freeze_dropout apply only to a query run"):
        load_config({"data": {"store": "s"}, "query": {"unfrozen": True, "freeze_dropout": True}})
    with pytest.raises(ConfigError, match=r"query\.unfrozen apply only to a query run"):  # "" is no reference either
        load_config({"data": {"store": "s"}, "query": {"reference": "", "unfrozen": True}})
    one = write_synthetic_store(tmp_path / "one", n_cells=120, n_genes=40, n_regions=60, n_batches=1, progress=False)
    ref = train(tiny_config(one, tmp_path / "ref", **{"run.epochs": 1, "model.encode_covariates": True})).run_dir
    capsys.readouterr()
    with pytest.raises(ConfigError, match="query: nothing would train: the query's rules leave no weight free"):
        train(tiny_config(one, tmp_path / "q", **{"query.reference": ref, "run.epochs": 1}))
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[query] model.*")]
    assert len(note) == 1 and "encode_covariates=True" in note[0], note
    res = train(tiny_config(one, tmp_path / "q2", **{"query.reference": ref, "query.unfrozen": True, "run.epochs": 1}))
    assert res.epochs == 1  # fine-tuning every weight is still possible


def test_the_runs_record_of_its_reference_follows_moves_and_refuses_another_model(stores, tmp_path):
    """Helper review of query_reference.json: a fresh start kept an earlier run's record (a later resume took that
    reference's categories: wrong batch names in model.json); a resume from a checkpoint of another run directory
    did not find the record; the reference given at its new path after a move was refused as a changed setting."""
    from trainer.train import train

    a = tmp_path / "ref_a"
    shutil.copytree(stores["run"] / "model", a)
    q = {"query.reference": str(a), "run.max_steps": 2}
    other = train(tiny_config(stores["qstore"], tmp_path / "b_run", **q)).model_dir  # another model: reference B
    run = tmp_path / "run"
    train(tiny_config(stores["qstore"], run, **q))
    shutil.rmtree(run / "checkpoints")  # start over in the same directory, from reference B
    train(tiny_config(stores["qstore"], run, **{**q, "query.reference": other}))
    assert json.loads((run / "query_reference.json").read_text()) == \
        json.loads((Path(other) / "model.json").read_text())
    with pytest.raises(ConfigError, match=r"is not the model this run started from \(its record .* differs\)"):
        train(tiny_config(stores["qstore"], run, **{"query.reference": str(a), "run.max_steps": 4}))
    moved = tmp_path / "moved_b"
    shutil.move(other, moved)  # B moved: given at its new path, the resume goes on
    assert train(tiny_config(stores["qstore"], run, **{"query.reference": str(moved), "run.max_steps": 3})).steps == 3
    shutil.rmtree(moved)  # and gone: a resume from this run's checkpoint into another run directory finds the record
    ckpt = max((run / "checkpoints").iterdir())
    res = train(tiny_config(stores["qstore"], tmp_path / "elsewhere", **{"query.reference": str(moved),
                                                                          "run.resume": str(ckpt), "run.max_steps": 4}))
    assert res.steps == 4 and (tmp_path / "elsewhere" / "query_reference.json").is_file()
    with pytest.raises(ConfigError, match=r"query\.reference \(.* -> None\)"):  # a query run is not resumed as a plain one
        train(tiny_config(stores["qstore"], run, **{"run.max_steps": 4}))


def test_a_model_size_equal_to_what_the_reference_built_from_its_formulas_is_accepted(tmp_path):
    """A reference trained with n_hidden / n_latent unset (the reference's formulas: hidden = min(128,
    sqrt(regions)), latent = sqrt(hidden)) refused model.n_latent=4 on a reference of 4 latents as 'has
    n_latent=None'; another value is still refused, and the message gives the size the reference has."""
    from trainer.query import with_reference_model

    args = {"n_genes": 50, "n_regions": 300, "n_batch": 2, "n_hidden": None, "n_latent": None}
    assert (MultiVAE(**args).n_hidden, MultiVAE(**args).n_latent) == (17, 4)
    ref = Reference(tmp_path / "ref", {"model_args": args}, None)
    cfg = tiny_config(tmp_path / "store", tmp_path / "run", **{"query.reference": str(tmp_path / "ref"),
                                                               "model.n_latent": 4, "model.n_hidden": 17})
    out = with_reference_model(cfg, ref)
    assert out.model.n_latent is None and out.model.n_hidden is None  # the reference's own arguments
    cfg = tiny_config(tmp_path / "store", tmp_path / "run", **{"query.reference": str(tmp_path / "ref"),
                                                               "model.n_latent": 5, "model.n_hidden": None})
    with pytest.raises(ConfigError, match=r"model\.n_latent=5, but query\.reference=.* has n_latent=None \(= 4\)"):
        with_reference_model(cfg, ref)


def test_a_query_resumes_after_its_reference_run_re_exported_its_model(stores, tmp_path):
    """Rerunning a finished reference run's command (or a Slurm requeue) exports its model again. With a random
    export id that model.json differed from the query run's record of it, and the query's resume was refused as
    'not the model this run started from'; the id is the weights' digest, so the same weights write the same file."""
    from trainer.train import train

    ref_run = stores["run"]  # (a copy would describe another run.output_dir in its config)
    ref_cfg = tiny_config(stores["ref_store"], ref_run)
    q = {"query.reference": str(ref_run), "run.max_steps": 1, "run.checkpoint_every_steps": 1}
    train(tiny_config(stores["qstore"], tmp_path / "q", **q))
    before = (ref_run / "model" / "model.json").read_text()
    train(ref_cfg)  # the finished reference run's command again: resumes its last checkpoint and re-exports
    assert (ref_run / "model" / "model.json").read_text() == before
    assert train(tiny_config(stores["qstore"], tmp_path / "q", **{**q, "run.max_steps": 3})).steps == 3
