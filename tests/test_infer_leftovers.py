"""What a killed mva-infer job leaves, and that rerunning the same command clears it (review, session 21; the
kills there were real SIGKILLs at random moments, here each is the state it left or the failure at that point):

* a chunk write killed mid-way left its temporary file (``<chunk>.<uuid>.partial``, a full chunk) inside the
  finished output;
* a job killed after renaming its complete output, before emptying its progress directory: every rerun said
  "already exists", and the progress (thousands of markers) and the stale lock stayed for ever; the same for
  de/da between writing the table and emptying ``<output>.parts``, and for the embed job's UMAP picture (drawn
  after the rename: never drawn);
* de/da's temporary table was named by the pid, so a killed write's file stayed beside the table;
* de/da refused a rerun with another setting without naming it.

    .venv/bin/python -m pytest tests/test_infer_leftovers.py -q
"""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from tests.infer_utils import infer_cfg, read_obsm, trained_model
from trainer.infer import infer
from trainer.infer_config import DiffOptions, EmbedOptions
from trainer.jobs import de as de_job
from trainer.jobs import embed as embed_job
from trainer.jobs.common import InferError
from trainer.jobs.runner import FAIL_AFTER_ENV


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_killed_chunk_writes_temporary_file_is_not_left_in_the_output(trained, tmp_path, monkeypatch):
    store, run = trained
    clean = tmp_path / "clean.zarr"
    infer(infer_cfg(store, run, clean, job="accessibility"))
    out = tmp_path / "acc.zarr"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(infer_cfg(store, run, out, job="accessibility"))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    partial = tmp_path / "acc.zarr.partial"
    chunk = next(p for p in (partial / "X").rglob("*") if p.is_file() and p.name != "zarr.json")
    # what a write killed after its temporary file and before the rename leaves (direct_io.write_file's name)
    stray = chunk.with_name(f"{chunk.name}.{uuid.uuid4().hex}.partial")
    stray.write_bytes(chunk.read_bytes())
    infer(infer_cfg(store, run, out, job="accessibility"))
    assert not list(out.rglob("*.partial")), _files(out)
    assert _files(out) == _files(clean)
    assert all((out / f).read_bytes() == (clean / f).read_bytes() for f in _files(clean))


def test_a_job_killed_after_its_output_was_complete_is_finished_by_its_rerun(trained, tmp_path, monkeypatch):
    store, run = trained
    out, png = tmp_path / "emb.zarr", tmp_path / "pic" / "umap.png"
    cfg = infer_cfg(store, run, out, embed=EmbedOptions(umap_png=str(png)))
    real = embed_job.EmbedJob.after_output

    def killed_while_drawing(self, final):
        raise RuntimeError("killed while drawing the picture")

    monkeypatch.setattr(embed_job.EmbedJob, "after_output", killed_while_drawing)
    with pytest.raises(RuntimeError, match="killed while drawing"):
        infer(cfg)
    monkeypatch.setattr(embed_job.EmbedJob, "after_output", real)
    progress = tmp_path / "emb.zarr.progress"
    assert out.is_dir() and (progress / "job.json").is_file() and not png.exists()
    want = read_obsm(out)
    summary = infer(cfg)  # it said "already exists: pass overwrite=true" (a full recompute) for ever
    assert png.is_file() and summary["umap"]["png"] == str(png)
    assert not progress.exists()
    assert read_obsm(out).keys() == want.keys()
    # another setting is still refused: the output is complete, and it is not this command's
    with pytest.raises(InferError, match="already exists: pass overwrite=true"):
        infer(infer_cfg(store, run, out, embed=EmbedOptions(umap_png=str(tmp_path / "other.png"))))


def _de(trained, out, **kw):
    store, run = trained
    return infer_cfg(store, run, out, job="de", seed=0, de=DiffOptions(groupby="cell_type", n_samples_overall=200,
                                                                       **kw))


def _kill_after_the_table(monkeypatch):
    """de/da killed between writing its table and emptying <output>.parts; returns the real writer."""
    real = de_job._write_table

    def written_then_killed(table, final, fmt):
        real(table, final, fmt)
        raise RuntimeError("killed after the table")

    monkeypatch.setattr(de_job, "_write_table", written_then_killed)
    return real


def test_de_killed_between_its_table_and_its_cleanup_is_finished_by_its_rerun(trained, tmp_path, monkeypatch):
    out = tmp_path / "de.csv"
    real = _kill_after_the_table(monkeypatch)
    with pytest.raises(RuntimeError, match="killed after the table"):
        infer(_de(trained, out))
    monkeypatch.setattr(de_job, "_write_table", real)
    table = pd.read_csv(out, index_col=0)
    parts = tmp_path / "de.csv.parts"
    assert list(parts.glob("comp-*.parquet"))
    infer(_de(trained, out))
    assert not parts.exists()
    pd.testing.assert_frame_equal(pd.read_csv(out, index_col=0), table)


def test_de_temporary_table_has_one_name_that_the_rerun_replaces(trained, tmp_path, monkeypatch):
    out = tmp_path / "de.csv"

    def killed_mid_write(self, path, *args, **kwargs):
        with open(path, "w") as f:
            f.write("half a table")
        raise RuntimeError("killed while writing the table")

    monkeypatch.setattr(pd.DataFrame, "to_csv", killed_mid_write)
    with pytest.raises(RuntimeError, match="killed while writing"):
        infer(_de(trained, out))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("de.csv.tmp")] == ["de.csv.tmp"]  # not per pid
    infer(_de(trained, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["de.csv"]


def test_de_rerun_with_another_setting_names_it(trained, tmp_path, monkeypatch):
    out = tmp_path / "de.csv"
    monkeypatch.setenv(de_job.FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(_de(trained, out))
    monkeypatch.delenv(de_job.FAIL_AFTER_ENV)
    with pytest.raises(InferError, match=r"different settings \(de\.delta \(None -> 0\.5\)\) is in .*de\.csv\.parts"):
        infer(_de(trained, out, delta=0.5))


@pytest.mark.slow
def test_two_ranks_finish_what_a_killed_de_job_left(trained, tmp_path, monkeypatch):
    """The leftover check is rank 0's, broadcast: every rank takes the same branch (no rank waits alone)."""
    from tests.infer_utils import BATCH
    from tests.train_utils import torchrun

    store, run = trained
    out = tmp_path / "de.csv"
    _kill_after_the_table(monkeypatch)
    with pytest.raises(RuntimeError, match="killed after the table"):
        infer(_de(trained, out))
    res = torchrun(["-m", "trainer.infer", "job=de", f"model_dir={run}", f"store={store}", f"output={out}",
                    f"batch_size={BATCH}", "progress=false", "seed=0", "de.groupby=cell_type",
                    "de.n_samples_overall=200"])
    assert "was already complete; removed what the killed job that wrote it left" in res.stdout + res.stderr
    assert not (tmp_path / "de.csv.parts").exists()
