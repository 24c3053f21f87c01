"""Edge cases of the mva-infer jobs: tiny stores, cell-id files named by another path, options a mode ignores.

    .venv/bin/python -m pytest tests/test_infer_edges.py -q
"""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.build import build_store
from data.config import BuildConfig, InputConfig
from tests.infer_utils import infer_cfg as _cfg
from tests.infer_utils import trained_model
from trainer.infer import infer
from trainer.infer_config import EmbedOptions
from trainer.jobs.common import InferError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _store_of_cells(store, out, cells: np.ndarray, **build) -> str:
    """A store of some of ``store``'s cells (same features and categories), built by mva-build."""
    from trainer.scvi_io import store_to_mudata

    mdata = store_to_mudata(store)
    obs = mdata.obs.iloc[cells][["batch", "mask_rna", "mask_atac"]].copy()
    obs["batch"] = obs["batch"].astype(str)
    x = sp.hstack([mdata["rna"].X[cells], mdata["atac"].X[cells]], format="csr")
    var = pd.DataFrame({"modality": ["Gene Expression"] * mdata["rna"].n_vars + ["Peaks"] * mdata["atac"].n_vars},
                       index=list(mdata["rna"].var_names) + list(mdata["atac"].var_names))
    h5ad = out.with_suffix(".h5ad")
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(h5ad)
    return build_store(BuildConfig(out=str(out), progress=False, inputs=[InputConfig(kind="scvi", path=str(h5ad))],
                                   **build))


def test_umap_png_of_a_store_too_small_to_draw_is_refused_before_the_job(trained, tmp_path):
    """embed.umap_png on a 2-cell store: the embedding was computed and written, then the job failed ("a
    UMAP needs at least 3"), and the rerun only said the output exists: the picture could never be drawn."""
    store, run = trained
    two = _store_of_cells(store, tmp_path / "two.zarr", np.array([0, 1]))
    png = EmbedOptions(umap_png=str(tmp_path / "u.png"))
    with pytest.raises(InferError, match="at least 3"):
        infer(_cfg(two, run, tmp_path / "e.zarr", embed=png))
    assert not any(tmp_path.glob("e.zarr*"))  # nothing was computed
    infer(_cfg(two, run, tmp_path / "e.zarr"))  # without the picture the embedding works


def test_de_rerun_naming_the_same_cell_files_by_another_path_resumes(trained, tmp_path, monkeypatch):
    """The de/da resume fingerprint held de.cells1 / de.cells2 as typed: a crashed job rerun with the same
    files named by their absolute path (or from another working directory) was refused as "different
    settings", and overwrite=true threw its finished comparisons away. The files count by content."""
    from data.store import open_store
    from trainer.infer_config import DiffOptions, InferConfig
    from trainer.jobs.de import FAIL_AFTER_ENV

    store, run = trained
    ids = open_store(store).read_obs().index
    (tmp_path / "c1.txt").write_text("\n".join(ids[:60]))
    (tmp_path / "c2.txt").write_text("\n".join(ids[60:140]))

    def cfg(c1: str, c2: str, out: str) -> InferConfig:
        return InferConfig(model_dir=str(run), store=str(store), output=str(tmp_path / out), job="da", progress=False,
                           batch_size=96, de=DiffOptions(cells1=c1, cells2=c2, n_samples_overall=100))

    infer(cfg(str(tmp_path / "c1.txt"), str(tmp_path / "c2.txt"), "clean.csv"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")  # dies after its one comparison, before the table
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(cfg("c1.txt", "c2.txt", "o.csv"))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    summary = infer(cfg(str(tmp_path / "c1.txt"), str(tmp_path / "c2.txt"), "o.csv"))
    assert summary["computed"] == 0  # the finished comparison was kept
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "o.csv", index_col=0),
                                  pd.read_csv(tmp_path / "clean.csv", index_col=0))


@pytest.mark.parametrize("job, fmt", [("de", "csv"), ("da", "parquet")])
def test_a_table_from_cell_files_is_replaced_by_overwrite(trained, tmp_path, job, fmt):
    """overwrite=true replaced only tables with comparison / group1 / group2 columns, which the reference (and
    we) write in groupby mode only: a finished de/da table from cell-id files was refused as "not an mva-infer
    de/da table". A file that is no such table is still refused."""
    from data.store import open_store
    from trainer.infer_config import DiffOptions, InferConfig

    store, run = trained
    ids = open_store(store).read_obs().index
    (tmp_path / "c1.txt").write_text("\n".join(ids[:60]))
    out = tmp_path / f"t.{fmt}"

    def run_job(n: int, overwrite: bool = False) -> pd.DataFrame:
        infer(InferConfig(model_dir=str(run), store=str(store), output=str(out), job=job, progress=False,
                          batch_size=96, overwrite=overwrite,
                          de=DiffOptions(cells1=str(tmp_path / "c1.txt"), n_samples_overall=n, format=fmt)))
        return pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out, index_col=0)

    first = run_job(50)
    assert "comparison" not in first.columns
    with pytest.raises(InferError, match="already exists"):
        run_job(80)
    second = run_job(80, overwrite=True)
    assert list(second.columns) == list(first.columns) and not second.equals(first)  # replaced: other draws
    notes = tmp_path / "notes.csv"
    notes.write_text("gene,comment\nCD3E,mine\n")
    with pytest.raises(InferError, match="is not an mva-infer de/da table"):
        infer(InferConfig(model_dir=str(run), store=str(store), output=str(notes), job=job, progress=False,
                          batch_size=96, overwrite=True, de=DiffOptions(cells1=str(tmp_path / "c1.txt"))))
    assert notes.read_text() == "gene,comment\nCD3E,mine\n"


def test_fdr_target_with_vanilla_mode_is_refused_naming_the_key():
    """de.mode=vanilla has no FDR flag (de: no is_de_fdr column, da: is_da_fdr empty): de.fdr_target=0.1 was
    accepted and silently ignored, as de.delta / de.pseudocounts / de.test_mode were before they were refused."""
    from data.typed_config import ConfigError
    from trainer.infer_config import DiffOptions

    with pytest.raises(ConfigError, match=r"de\.fdr_target=0\.1 .*de\.mode=change"):
        DiffOptions(groupby="cell_type", mode="vanilla", fdr_target=0.1)
    DiffOptions(groupby="cell_type", mode="vanilla")  # the default is fine
    DiffOptions(groupby="cell_type", fdr_target=0.1)  # and change mode reads it


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_de_overwrite_replaces_only_a_table_it_wrote(trained, tmp_path, fmt):
    """de/da overwrite=true deleted whatever file sat at ``output`` (a mistyped output= naming the user's notes
    became a DE table), while the chunked jobs replace only their own outputs. Now only a table with the
    job's columns is replaced; anything else is refused and left as it was."""
    from trainer.infer_config import DiffOptions, InferConfig

    store, run = trained

    def cfg(out) -> InferConfig:
        return InferConfig(model_dir=str(run), store=str(store), output=str(out), job="de", progress=False,
                           batch_size=96, overwrite=True,
                           de=DiffOptions(groupby="batch", n_samples_overall=50, format=fmt))

    notes = tmp_path / f"notes.{fmt}"
    notes.write_text("gene,comment\nCD3E,check later\n")
    with pytest.raises(InferError, match="not an mva-infer de/da table"):
        infer(cfg(notes))
    assert notes.read_text() == "gene,comment\nCD3E,check later\n"
    folder = tmp_path / "run_dir"
    folder.mkdir()
    with pytest.raises(InferError, match="not an mva-infer de/da table"):
        infer(cfg(folder))
    table = tmp_path / f"t.{fmt}"
    infer(cfg(table))
    first = table.stat().st_mtime_ns
    infer(cfg(table))  # its own table: replaced
    assert table.stat().st_mtime_ns != first


def test_read_groups_count_the_loaders_chunks_which_restart_at_every_shard():
    """read_groups counted chunks as row // 256 over the whole store, but the loader's chunks restart at
    every shard: with 300-cell shards one read held 8 loader chunks where the bound was 4."""
    from data.plan import chunk_bounds
    from trainer.jobs.de_sampling import read_groups

    starts = chunk_bounds([300] * 10, 256)[0]
    cells = np.arange(3000)
    groups = read_groups(cells, 10_000, chunk_starts=starts, max_chunks=4)
    assert sum(g.stop - g.start for g in groups) == len(cells) and groups[0].start == 0
    assert all(a.stop == b.start for a, b in itertools.pairwise(groups))
    for g in groups:
        touched = np.unique(np.searchsorted(starts, cells[g], side="right") - 1)
        assert len(touched) <= 4, (g, touched)
    # shards that are multiples of the chunk: the same groups as counting row // 256
    starts2, _ = chunk_bounds([512] * 4, 256)
    assert read_groups(np.arange(2048), 10_000, chunk_starts=starts2, max_chunks=3) == \
        [slice(0, 768), slice(768, 1536), slice(1536, 2048)]
