"""UMAP picture of a real embed output (tiny store -> trained model -> job=embed -> draw_umap).

    .venv/bin/python -m pytest tests/test_umap.py -q        # ~20 s (numba compiles UMAP once)
    .venv/bin/python -m pytest tests/test_umap.py -q -m slow   # the >= 8,192-cell (pynndescent) path, ~1 min
"""

from __future__ import annotations

import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest

from tests.train_utils import tiny_config, tiny_store
from trainer.infer import infer
from trainer.infer_config import InferConfig
from trainer.jobs.common import InferError
from trainer.jobs.umap import DPI, PANEL_INCHES, PYNNDESCENT_FROM, category_colours, draw_umap
from trainer.train import train

N_CELLS = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("umap")
    store = tiny_store(root / "store", n_cells=N_CELLS)
    run = train(tiny_config(store, root / "run")).run_dir
    out = root / "emb.zarr"
    infer(InferConfig(model_dir=str(run), store=str(store), output=str(out), batch_size=128, progress=False))
    return out, run


@pytest.fixture(scope="module")
def embedding(embedded):
    return embedded[0]


def _image(png) -> np.ndarray:
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    return mpimg.imread(str(png))  # decodes the whole file: a truncated PNG fails here


def test_three_panels_coloured_by_batch_modality_label(embedding, tmp_path):
    res = draw_umap(str(embedding), str(tmp_path / "u.png"))
    assert res["panels"] == ["batch (batch)", "modality", "label (cell_type)"]  # keys from the model's json
    assert res["n_cells"] == res["n_drawn"] == N_CELLS and "subsample" not in res["title"]
    img = _image(tmp_path / "u.png")
    panel = int(PANEL_INCHES * DPI)
    assert img.shape[:2] == (panel, 3 * panel)
    # every panel holds drawn points in several colours (not blank white)
    for k in range(3):
        tile = img[50:-20, k * panel + 20:(k + 1) * panel - 20, :3].reshape(-1, 3)
        coloured = tile[(tile.max(1) - tile.min(1)) > 0.2]
        assert len(coloured) > 200, k
        assert len(np.unique(np.round(coloured * 8), axis=0)) >= 2, k


def test_large_output_is_subsampled_with_a_seed_and_says_so(embedding, tmp_path):
    a = draw_umap(str(embedding), str(tmp_path / "a.png"), max_cells=250, seed=3)
    draw_umap(str(embedding), str(tmp_path / "b.png"), max_cells=250, seed=3)
    assert a["n_drawn"] == 250 and a["n_cells"] == N_CELLS
    assert "random subsample of 250 of 600 cells (seed 3)" in a["title"]
    np.testing.assert_array_equal(_image(tmp_path / "a.png"), _image(tmp_path / "b.png"))  # same seed, same picture


def test_absent_column_skips_its_panel(embedding, tmp_path):
    res = draw_umap(str(embedding), str(tmp_path / "u.png"), label_key="no_such_column")
    assert res["panels"] == ["batch (batch)", "modality"]
    assert _image(tmp_path / "u.png").shape[1] == 2 * int(PANEL_INCHES * DPI)


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_bad_inputs_fail_with_a_clear_message(embedding, tmp_path):
    with pytest.raises(InferError, match="not an embed output"):
        draw_umap(str(tmp_path / "missing.zarr"), str(tmp_path / "u.png"))
    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(embedding, unfinished)
    import zarr

    zarr.open_group(str(unfinished), mode="r+", use_consolidated=False).attrs["mva_complete"] = False
    zarr.consolidate_metadata(str(unfinished))
    with pytest.raises(InferError, match="not marked complete"):
        draw_umap(str(unfinished), str(tmp_path / "u.png"))


@pytest.mark.slow
def test_atlas_sized_output_uses_pynndescent_and_draws(embedded, tmp_path):
    # From 8,192 cells scanpy 1.11 switches to pynndescent, whose csr_array it cannot read under scipy
    # 1.17 (AttributeError: getnnz): the 600-cell outputs above never reach that path.
    _, run = embedded
    n = PYNNDESCENT_FROM + 300
    store = tiny_store(tmp_path / "big_store", n_cells=n, seed=1)  # same features as the trained model
    out = tmp_path / "big.zarr"
    infer(InferConfig(model_dir=str(run), store=str(store), output=str(out), batch_size=1024, progress=False))
    res = draw_umap(str(out), str(tmp_path / "big.png"), max_cells=PYNNDESCENT_FROM + 100)
    assert res["n_cells"] == n and res["n_drawn"] == PYNNDESCENT_FROM + 100 and "subsample" in res["title"]
    assert _image(tmp_path / "big.png").shape[:2] == (int(PANEL_INCHES * DPI), 3 * int(PANEL_INCHES * DPI))


def test_category_colours_stay_distinct_beyond_twenty():
    """tab20 repeated its colours from the 21st category on (BMMC's 21 cell types: pDC looked like B1 B)."""
    for n in (2, 10, 21, 28, 60, 102):
        c = category_colours(n)
        assert c.shape == (n, 4) and len({tuple(r) for r in c}) == n, n
