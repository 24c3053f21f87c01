"""Checkpoints and other files handed to us damaged, malformed or crafted (each a case found in review):
one-line errors instead of tracebacks, no path around the pickle check, no rollback that loses work.

    .venv/bin/python -m pytest tests/test_checkpoint_hardening.py -q
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.train_utils import tiny_config, tiny_store
from trainer import checkpoint as ckpt
from trainer import checkpoint_checks as checks
from trainer.config import ConfigError
from trainer.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    store = tiny_store(root / "store", n_cells=400)
    train(tiny_config(store, root / "run", **{"run.epochs": 2, "run.checkpoint_every_steps": 2,
                                              "run.keep_checkpoints": 0}))
    return store, root / "run"


def _copy(run, tmp_path) -> tuple[Path, Path]:
    store, src = run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return store, dst


def _drop_tensor_record(f: Path) -> None:
    tmp = f.with_name("x.zip")
    with zipfile.ZipFile(f) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for i in zin.infolist():
            if not i.filename.endswith("/data/0"):
                zout.writestr(i, zin.read(i.filename))
    tmp.replace(f)


@pytest.mark.parametrize("damage", ["tensor_record", "not_a_dict", "missing_key", "model_without_optimizer"])
def test_a_damaged_checkpoint_is_one_checkpoint_error(run, tmp_path, damage):
    store, dst = _copy(run, tmp_path)
    step = ckpt.complete_checkpoints(dst)[-1]
    if damage == "tensor_record":  # passes the pickle scan (it reads data.pkl only), fails in the zip reader
        _drop_tensor_record(step / "rank_0.pt")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], step / "trainer.pt")
    elif damage == "missing_key":
        state = torch.load(step / "trainer.pt", weights_only=True)
        del state["world_size"]
        torch.save(state, step / "trainer.pt")
    else:
        state = torch.load(step / "model.pt", weights_only=True)
        del state["optimizer"]
        torch.save(state, step / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match=str(step)):
        train(tiny_config(store, dst, **{"run.epochs": 3}))


def test_a_symlink_inside_a_checkpoint_is_refused(run, tmp_path):
    """rglob does not enter a linked directory, so a linked deepspeed/ dir skipped the pickle scan and
    reached DeepSpeed's own (not weights-only) loader."""
    _store, dst = _copy(run, tmp_path)
    step = ckpt.complete_checkpoints(dst)[-1]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, step / "deepspeed")
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        ckpt.load_states(step, 0, 1)


def test_rolling_back_to_an_older_checkpoint_does_not_lose_the_new_run(run, tmp_path):
    """Pruning keeps the highest steps: a run resumed from step 4 in a directory holding steps up to 10 had
    its own checkpoints deleted as written, and resume=auto then loaded the abandoned step 10."""
    store, dst = _copy(run, tmp_path)
    older = ckpt.complete_checkpoints(dst)[1]
    before = ckpt.complete_checkpoints(dst)
    with pytest.raises(ConfigError, match="holds newer checkpoints"):
        train(tiny_config(store, dst, **{"run.resume": str(older), "run.epochs": 3}))
    assert ckpt.complete_checkpoints(dst) == before
    res = train(tiny_config(store, tmp_path / "fresh", **{"run.resume": str(older), "run.epochs": 3}))
    assert res.epochs == 3  # into another run dir the same checkpoint resumes


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_bad_read_retry_settings_are_named(monkeypatch, value):
    from data import retry

    monkeypatch.setenv(retry.RETRIES_ENV, value)
    with pytest.raises(ValueError, match=f"MVA_READ_RETRIES='{value}'"):
        retry.retries()


def test_a_malformed_scvi_save_is_one_error(tmp_path):
    from trainer.scvi_import import import_from_scvi
    from trainer.scvi_io import ScviIOError

    ck = {"model_state_dict": {}, "var_names": [], "attr_dict": {
        "registry_": {"model_name": "MULTIVI", "field_registries": {}}, "init_params_": {"non_kwargs": {}}}}
    (tmp_path / "scvi").mkdir()
    torch.save(ck, tmp_path / "scvi" / "model.pt")
    with pytest.raises(ScviIOError, match="not a complete scvi-tools MULTIVI save"):
        import_from_scvi(tmp_path / "scvi", tmp_path / "ours")


def test_resuming_with_other_settings_is_refused_by_name(run, tmp_path):
    """The optimizer state carries the learning rate: resumed with optim.lr=0.5 the run silently kept the
    old rate while config.yaml said 0.5. Settings that shape training are refused by name; how long and
    where the run goes may change."""
    store, dst = _copy(run, tmp_path)
    cfg_before = (dst / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.001 -> 0\.5\), run\.seed \(0 -> 3\)"):
        train(tiny_config(store, dst, **{"run.epochs": 3, "optim.lr": 0.5, "run.seed": 3}))
    assert (dst / "config.yaml").read_text() == cfg_before  # refused before anything was rewritten
    res = train(tiny_config(store, dst, **{"run.epochs": 3, "run.keep_checkpoints": 1, "logger.log_every": 1}))
    assert res.epochs == 3


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(run, tmp_path):
    """A checkpoint's config lacks the settings added after it was written (data.remainder came later than
    the first checkpoints): it was refused as "data.remainder (None -> 'drop')", a value nobody can set
    back. An absent key counts as its default (the behaviour before it existed); another value is still
    refused by name, with the value to set back."""
    store, dst = run[0], tmp_path / "old"
    train(tiny_config(store, dst, **{"run.epochs": 1, "data.remainder": "drop"}))  # the default of that time
    step = ckpt.complete_checkpoints(dst)[-1]
    state = torch.load(step / "trainer.pt", weights_only=True)
    old = json.loads(state["config"])
    del old["data"]["remainder"]
    torch.save({**state, "config": json.dumps(old)}, step / "trainer.pt")
    with pytest.raises(ConfigError, match=r"data\.remainder \('drop' -> 'pad'\)"):
        train(tiny_config(store, dst, **{"run.epochs": 3, "data.remainder": "pad"}))
    # remainder's default is now even: such a checkpoint ran drop, which is what it is compared with
    with pytest.raises(ConfigError, match=r"data\.remainder \('drop' -> 'even'\)"):
        train(tiny_config(store, dst, **{"run.epochs": 3}))
    res = train(tiny_config(store, dst, **{"run.epochs": 3, "data.remainder": "drop"}))
    assert res.epochs == 3


def test_a_copy_of_a_checkpoint_beside_it_is_neither_resumed_nor_pruned(run, tmp_path):
    """Every directory under checkpoints/ named step_* with a trainer.pt counted as a checkpoint: a copy kept
    as step_000000010.bak sorted after step_000000010, so resume=auto loaded the copy, pruning then deleted
    it as an old checkpoint, and a rollback (run.resume=<older>) crashed on its name (int('000000010.bak'))."""
    store, dst = _copy(run, tmp_path)
    newest = ckpt.complete_checkpoints(dst)[-1]
    backup = newest.with_name(newest.name + ".bak")
    shutil.copytree(newest, backup)
    assert ckpt.complete_checkpoints(dst)[-1] == newest
    assert ckpt.find_resume(dst, "auto") == newest
    with pytest.raises(ConfigError, match="holds newer checkpoints"):
        train(tiny_config(store, dst, **{"run.resume": str(ckpt.complete_checkpoints(dst)[0]), "run.epochs": 3}))
    res = train(tiny_config(store, dst, **{"run.epochs": 3, "run.keep_checkpoints": 1}))
    assert res.epochs == 3 and backup.is_dir() and (backup / "trainer.pt").is_file()


def _flip_a_bit(f: Path, member_suffix: str, offset: int) -> None:
    """Flip one bit inside the stored bytes of the zip member ending with ``member_suffix`` (in place,
    sizes and headers unchanged: what a bad disk, cable or copy does)."""
    with zipfile.ZipFile(f) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    raw = bytearray(f.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[info.header_offset + 30 + name_len + extra_len + offset] ^= 0x10
    f.write_bytes(raw)


def _step_value_offset(f: Path) -> int:
    """Offset in trainer.pt's pickle of the bytes of the value stored under "step"."""
    with zipfile.ZipFile(f) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(pkl))
    at = next(i for i, (_op, arg, _pos) in enumerate(ops) if arg == "step")
    value = next(pos for op, _arg, pos in ops[at + 1:] if op.name.startswith("BININT"))  # past the memo op
    return value + 1  # past the opcode byte


@pytest.mark.parametrize(("name", "member"), [("model.pt", "/data/0"), ("trainer.pt", "data.pkl")])
def test_a_flipped_bit_in_a_checkpoint_is_refused_not_resumed(run, tmp_path, name, member):
    """torch.save records a CRC-32 of every record of its zip, but torch.load never checks them: a flipped
    bit in a stored weight (model.pt) or in a pickled number (trainer.pt: the step) resumed silently."""
    store, dst = _copy(run, tmp_path)
    step = ckpt.complete_checkpoints(dst)[-1]
    clean = torch.load(step / name, weights_only=True)
    _flip_a_bit(step / name, member, 5 if name == "model.pt" else _step_value_offset(step / name))
    damaged = torch.load(step / name, weights_only=True)  # not vacuous: torch loads it, with other values
    if name == "model.pt":
        assert not torch.equal(_first_tensor(clean), _first_tensor(damaged))
    else:
        assert damaged["step"] != clean["step"]
    with pytest.raises(ckpt.CheckpointError, match=rf"{name} is damaged .*CRC"):
        ckpt.load_states(step, 0, 1)
    with pytest.raises(ckpt.CheckpointError, match=str(step)):
        train(tiny_config(store, dst, **{"run.epochs": 3}))


def _first_tensor(state):
    """The first tensor of a nested state (dicts and lists in order)."""
    if isinstance(state, torch.Tensor):
        return state
    for v in state.values() if isinstance(state, dict) else state if isinstance(state, list | tuple) else ():
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def test_a_checkpoint_file_written_without_crcs_still_loads(tmp_path):
    """torch can be told not to compute the CRCs (they are then 0): such a file has nothing to check."""
    import torch.utils.serialization as ser

    ser.config.save.compute_crc32 = False
    try:
        torch.save({"w": torch.arange(10.0)}, tmp_path / "x.pt")
    finally:
        ser.config.save.compute_crc32 = True
    checks.check_intact(tmp_path / "x.pt")
    assert torch.equal(ckpt.safe_load(tmp_path / "x.pt")["w"], torch.arange(10.0))


def test_resuming_on_a_store_of_other_cells_is_refused(run, tmp_path):
    """A store of other cells with the same features and batch names (a new dataset trained into the same
    run.output_dir, e.g. the default one) continued the old run on it: at an epoch boundary without a word
    (re-exporting model.json with the new store's facts), mid-epoch with the loader's ValueError traceback."""
    store, dst = _copy(run, tmp_path)
    other = tiny_store(tmp_path / "other", n_cells=300, seed=7)
    for extra in ({"run.epochs": 3}, {"run.epochs": 2}):  # trains on / "nothing left": re-export only
        model_json = (dst / "model" / "model.json").read_text()
        with pytest.raises(checks.CheckpointError, match=r"was trained on other cells than data\.store=.*other.*300 cells"):
            train(tiny_config(other, dst, **extra))
        assert (dst / "model" / "model.json").read_text() == model_json
    mid = tmp_path / "mid"
    train(tiny_config(store, mid, **{"run.epochs": 2, "run.max_steps": 3}))  # stopped inside epoch 0
    with pytest.raises(checks.CheckpointError, match="was trained on other cells"):
        train(tiny_config(other, mid, **{"run.epochs": 2}))
    assert train(tiny_config(store, mid, **{"run.epochs": 2})).epochs == 2  # its own store resumes


def test_the_settings_refusal_blames_the_optimizer_only_for_optimizer_keys(run, tmp_path):
    store, dst = _copy(run, tmp_path)
    with pytest.raises(ConfigError, match=r"model\.n_hidden \(32 -> 16\)\. A resumed run continues with its "
                                          r"checkpoint's settings; set them back"):
        train(tiny_config(store, dst, **{"run.epochs": 3, "model.n_hidden": 16}))
    with pytest.raises(ConfigError, match=r"optim\.n_epochs_kl_warmup \(2 -> 5\)\. .*checkpoint's settings; set"):
        train(tiny_config(store, dst, **{"run.epochs": 3, "optim.n_epochs_kl_warmup": 5}))
    with pytest.raises(ConfigError, match=r"checkpoint's settings \(its optimizer state would keep the old value\)"):
        train(tiny_config(store, dst, **{"run.epochs": 3, "optim.lr": 0.5}))


def test_an_early_stopped_run_resumed_with_more_epochs_says_why_it_ends(tmp_path, capsys):
    store = tiny_store(tmp_path / "store", n_cells=200)
    over = {"run.epochs": 10, "run.patience": 1, "run.min_delta": 1e9, "run.early_stopping": True}
    first = train(tiny_config(store, tmp_path / "es", **over))
    assert first.epochs < 10
    capsys.readouterr()
    again = train(tiny_config(store, tmp_path / "es", **{**over, "run.epochs": 50}))
    assert again.epochs == first.epochs
    assert f"the run stopped early at epoch {first.epochs}" in capsys.readouterr().out


def test_an_empty_validation_split_names_only_what_reads_it(tmp_path):
    """It named run.keep='last' and optim.reduce_lr_on_plateau=False as readers of the validation."""
    store = tiny_store(tmp_path / "store", n_cells=12)
    with pytest.raises(ConfigError, match=r"is empty \(data\.val_fraction=0\.01\), but run\.early_stopping=True reads "
                                          r"it: set run\.early_stopping=false, or raise data\.val_fraction$"):
        train(tiny_config(store, tmp_path / "run", **{"data.val_fraction": 0.01, "run.early_stopping": True}))
