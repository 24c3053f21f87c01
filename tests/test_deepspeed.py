"""DeepSpeed ZeRO 1 and 2 on CPU, 2 processes under torchrun: train, checkpoint, resume exactly.

    .venv/bin/python -m pytest tests/test_deepspeed.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import NEEDS_BF16_CPU, PRECISIONS, tiny_config, tiny_overrides, tiny_store, train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store")


@pytest.mark.parametrize(("stage", "precision"), [(1, "fp32"), (2, "fp32"), pytest.param(0, "bf16", marks=NEEDS_BF16_CPU),
                                                  pytest.param(2, "bf16", marks=NEEDS_BF16_CPU)])
def test_zero_stage_trains_and_resumes_exactly(store, tmp_path, stage, precision):
    """bf16: the fp32 masters must survive the checkpoint (ZeRO 0 keeps them in FP16_UnfusedOptimizer, ZeRO 2 in
    its partitions); a resume from the bf16 weights alone would export other weights than the full run."""
    ds = {"dist.backend": "deepspeed", "dist.zero_stage": stage, "run.epochs": 2, "run.keep_checkpoints": 2,
          "dist.precision": precision}
    full = tmp_path / "full"
    res = train_cli(tiny_overrides(store, full, **ds), nproc=2)
    assert "backend deepspeed" in res.stdout
    result = json.loads((full / "result.json").read_text())
    assert result["epochs"] == 2 and result["world_size"] == 2
    first, _last = sorted((full / "checkpoints").glob("step_*"))
    shards = sorted(p.name for p in (first / "deepspeed").glob("*zero_pp_rank_*_optim_states.pt"))  # bf16_...: bf16
    assert len(shards) == 2 or stage == 0, shards  # ZeRO partitions the optimizer state over the 2 ranks
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "validation"]
    assert val[1]["reconstruction_loss_validation"] < val[0]["reconstruction_loss_validation"]  # it trains

    # resume from the end of epoch 1 into a fresh directory: epoch 2 must reproduce the full run
    resumed = tmp_path / "resumed"
    res = train_cli(tiny_overrides(store, resumed, **ds, **{"run.resume": str(first)}), nproc=2)
    assert "resumed from" in res.stdout
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=f"{k} differs after resume")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_guard_skips_a_nan_gradient_on_every_rank_under_every_zero_stage(store, tmp_path, precision):
    """A finite loss with a NaN gradient on rank 1 only: ZeRO 0 used to apply it (NaN weights), ZeRO 1/2
    skipped it inside DeepSpeed while the loop counted the step as good and stepped the classifier."""
    from tests.train_utils import ROOT, torchrun

    torchrun([str(ROOT / "tests" / "workers" / "guard_ranks.py"), str(store), str(tmp_path / "out"), "deepspeed",
              precision], nproc=2)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for stage in ("0", "1", "2"):
        for r in ranks:
            steps = r[stage]["steps"]
            assert [s["skipped"] for s in steps] == [False, True, False], (stage, steps)
            assert steps[1]["unchanged"] and not steps[0]["unchanged"] and not steps[2]["unchanged"], (stage, steps)
            assert r[stage]["skipped_total"] == 1 and r[stage]["nan_params"] == 0, (stage, r[stage])
        assert ranks[0][stage]["checksum"] == ranks[1][stage]["checksum"], stage  # the ranks stayed in step


def test_one_process_without_torchrun_trains_and_resumes(store, tmp_path):
    """dist.backend=deepspeed in a plain `python -m trainer.train` (or torchrun with one process) crashed:
    DeepSpeed needs a process group even for one rank; a group of one with an in-process store is made."""
    run = tmp_path / "one"
    train_cli(tiny_overrides(store, run, **{"dist.backend": "deepspeed", "run.epochs": 1}))
    res = train_cli(tiny_overrides(store, run, **{"dist.backend": "deepspeed", "run.epochs": 2}))
    assert "resumed from" in res.stdout
    assert json.loads((run / "result.json").read_text())["epochs"] == 2


def test_full_weights_gather_the_master_copies_under_every_zero_stage(store, tmp_path):
    """The export of a DeepSpeed bf16 run takes the fp32 master weights (``DeepSpeedWrapped.full_weights``),
    not the module's bf16 ones. This is the gather in fp32, where the masters equal the module's weights: ZeRO
    1/2 gather every parameter's partitions over the 2 ranks (an all-reduce each), ZeRO 0 holds no separate
    copy; names, shapes and values must match exactly. (bf16: the test below.)"""
    from tests.train_utils import ROOT, torchrun

    torchrun([str(ROOT / "tests" / "workers" / "ds_master_weights.py"), str(store), str(tmp_path / "out")], nproc=2)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for stage in ("0", "1", "2"):
        r0, r1 = ranks[0][stage], ranks[1][stage]
        assert r0["same_keys"] and r0["same_layout"], (stage, r0)
        assert r0["max_abs_diff"] == 0.0, (stage, r0)
        assert r1["gathered"] is None  # the weights land on rank 0 only
        if stage != "0":  # the ZeRO 1/2 path really gathered (every parameter linked to its fp32 partition)
            assert r0["linked_params"] == r0["n_params"] and r1["linked_params"] == r0["n_params"], (stage, r0)


@NEEDS_BF16_CPU
def test_a_bf16_run_exports_the_fp32_masters_under_every_zero_stage(store, tmp_path):
    """DeepSpeed bf16 (here on a CPU with native bf16, as on a GPU): the module's weights are bf16 and the AdamW
    updates go to fp32 masters. ZeRO 0 keeps them in FP16_UnfusedOptimizer, unlinked from the parameters, and
    its export was the module's bf16 roundings (every exported value bf16-representable, "not_bf16" 0). Now
    every stage exports the masters: fp32 values that round to the module's, most not bf16-representable."""
    from tests.train_utils import ROOT, torchrun

    torchrun([str(ROOT / "tests" / "workers" / "ds_master_weights.py"), str(store), str(tmp_path / "out"), "bf16"],
             nproc=2)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for stage in ("0", "1", "2"):
        r0, r1 = ranks[0][stage], ranks[1][stage]
        assert r0["module_dtypes"] == ["torch.bfloat16"], (stage, r0)
        assert r0["same_keys"] and r0["same_layout"], (stage, r0)
        assert r0["not_bf16"] > 0.9 * r0["n_values"], (stage, r0)
        assert 0 < r0["max_rel_diff"] <= 2.0**-8, (stage, r0)
        assert r1["gathered"] is None


@NEEDS_BF16_CPU
def test_a_bf16_checkpoint_resumed_where_bf16_does_not_run_is_refused_in_one_line(store, tmp_path, monkeypatch):
    """The same config trains bf16 weights on a GPU or native-bf16 CPU and fp32 ones elsewhere, with optimizer
    states of other layouts: resumed on the other kind of machine it failed inside DeepSpeed's loader. The
    second attempt runs in this process with the CPU's native bf16 switched off, as on such a machine."""
    from trainer import precision
    from trainer.checkpoint_checks import CheckpointError
    from trainer.train import train

    run = tmp_path / "bf16"
    ds = {"dist.backend": "deepspeed", "dist.precision": "bf16"}
    train_cli(tiny_overrides(store, run, **ds, **{"run.epochs": 1}))
    state = torch.load(max((run / "checkpoints").glob("step_*")) / "trainer.pt", weights_only=True)
    assert state["weights_dtype"] == "torch.bfloat16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(CheckpointError, match=r"holds bfloat16 weights but this run trains float32 ones here"):
        train(tiny_config(store, run, **ds, **{"run.epochs": 2}))
