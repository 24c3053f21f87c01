"""Store codec option (lz4 | zstd | none): every count survives, the codec is really used and recorded,
stores open with plain zarr/anndata, a bad value fails clearly, and every codec streams the same batches.

Run: .venv/bin/python -m pytest tests/test_codec.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pytest
import scipy.sparse as sp
import torch
import zarr
from omegaconf import OmegaConf

from data import keys
from data.build import build_store
from data.config import BuildConfig, InputConfig, SynthConfig
from data.store import open_store
from data.store_format import CODECS, StoreSchema
from data.stream import StoreStream
from data.synthetic import write_synthetic_store
from data.typed_config import to_typed
from data.validate import ValidationError
from data.writer import StoreWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
BMMC = DATA / "neurips2021_bmmc_multiome_starter"
SYNTH = {"n_cells": 900, "n_genes": 80, "n_regions": 400, "block_size": 256, "shard_size": 400, "progress": False,
         "with_covariates": True, "seed": 2}
# what the zarr.json of a count array must name for each codec (inside the sharding codec)
EXPECTED = {"lz4": ("blosc", "lz4"), "zstd": ("zstd", None), "none": (None, None)}


@pytest.fixture(scope="module")
def synth_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec")
    return {c: write_synthetic_store(root / f"{c}.zarr", codec=c, **SYNTH) for c in CODECS}


def _all_rows(st, mod):
    m = st.meta
    return sp.vstack([st.read_rows(mod, i, 0, m.shard_offsets[i + 1] - m.shard_offsets[i])
                      for i in range(m.n_shards)], format="csr")


def _inner_codecs(array_dir: Path) -> list[dict]:
    meta = json.loads((array_dir / "zarr.json").read_text())
    (shard,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    return shard["configuration"]["codecs"]


def _assert_codec_on_disk(store: Path, codec: str) -> None:
    """Every count array (data/indices/indptr, both modalities, every shard) uses ``codec``."""
    name, cname = EXPECTED[codec]
    shards = sorted(p for p in (store / "shards").iterdir() if p.is_dir())
    assert shards
    for sh in shards:
        for mod in keys.MODALITIES:
            for arr in ("data", "indices", "indptr"):
                inner = _inner_codecs(sh / "mod" / mod / "X" / arr)
                assert inner[0]["name"] == "bytes"
                compressors = inner[1:]
                if name is None:
                    assert compressors == [], (sh, mod, arr, compressors)
                else:
                    assert [c["name"] for c in compressors] == [name], (sh, mod, arr, compressors)
                    if cname is not None:
                        assert compressors[0]["configuration"]["cname"] == cname


def test_synth_every_codec_same_counts_recorded_and_on_disk(synth_stores):
    ref = open_store(synth_stores["lz4"])
    sizes = {}
    for codec, path in synth_stores.items():
        st = open_store(path)
        assert st.meta.codec == codec
        assert zarr.open_group(str(path), mode="r").attrs["codec"] == codec
        _assert_codec_on_disk(Path(path), codec)
        for mod in keys.MODALITIES:
            got, want = _all_rows(st, mod), _all_rows(ref, mod)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.nnz > 0 and (got != want).nnz == 0, (codec, mod)
        assert st.read_obs().equals(ref.read_obs())
        # ordinary tools read the same counts (zarr's own codec pipeline or zarrs, whichever is set)
        a = ad.read_zarr(str(Path(path) / "shards" / "00001" / "mod" / "atac"))
        assert (sp.csr_matrix(a.X) != ref.read_rows("atac", 1, 0, 400)).nnz == 0
        sizes[codec] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    # the codec is really applied: uncompressed is the largest, zstd the smallest
    assert sizes["zstd"] < sizes["lz4"] < sizes["none"], sizes


def test_every_codec_streams_the_batches_of_the_lz4_store(synth_stores):
    def epoch(path):
        return list(StoreStream(path, 64, seed=11, chunk_size=128, window_chunks=3, prefetch=2))

    ref = epoch(synth_stores["lz4"])
    assert len(ref) >= 10
    for codec in ("zstd", "none"):
        got = epoch(synth_stores[codec])
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                x, y = a[k], b[k]
                if x.layout != y.layout:
                    raise AssertionError(f"{codec}: {k} layout {x.layout} vs {y.layout}")
                if x.layout == torch.sparse_csr:
                    x, y = x.to_dense(), y.to_dense()
                assert torch.equal(x, y), (codec, k)


def test_bad_codec_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"codec 'gzip' is not supported; choose one of lz4, zstd, none"):
        write_synthetic_store(tmp_path / "s.zarr", n_cells=50, n_genes=5, n_regions=5, codec="gzip", progress=False)
    schema = StoreSchema(gene_names=["g"], region_names=["chr1:1-2"])
    with pytest.raises(ValueError, match="codec 'LZ4' is not supported"):
        StoreWriter(tmp_path / "w.zarr", schema, codec="LZ4")
    cfg = BuildConfig(out=str(tmp_path / "b.zarr"), codec="blosc", progress=False,
                      inputs=[InputConfig(kind="h5ad_pair", rna=str(BMMC / "bmmc_starter_rna.h5ad"))])
    with pytest.raises(ValidationError, match="codec 'blosc' is not supported"):
        build_store(cfg)
    assert list(tmp_path.iterdir()) == []  # no output, no .tmp- directory
    # the Hydra configs carry the key with the default, and a typo'd key is still refused
    root = Path(__file__).resolve().parents[1] / "conf"
    for name, schema_cls in (("synth", SynthConfig), ("build", BuildConfig)):
        raw = OmegaConf.load(root / f"{name}.yaml")
        assert raw.codec == "lz4"
        raw.pop("defaults", None)
        if name == "build":
            raw.out = "x"
        assert to_typed(raw, schema_cls).codec == "lz4"


@pytest.mark.parametrize("preshuffle", [False, True])
def test_build_every_codec_same_counts(tmp_path, preshuffle):
    """mva-build through both write paths: Dask shard tasks (default) and the preshuffle pass."""
    rna = ad.read_h5ad(BMMC / "bmmc_starter_rna.h5ad")[:300].copy()
    atac = ad.read_h5ad(BMMC / "bmmc_starter_atac.h5ad")[100:400].copy()
    rna.write_h5ad(tmp_path / "r.h5ad")
    atac.write_h5ad(tmp_path / "a.h5ad")
    stores = {}
    for codec in CODECS:
        out = tmp_path / f"{codec}.zarr"
        build_store(BuildConfig(out=str(out), codec=codec, shard_size=150, block_size=100, progress=False,
                                preshuffle=preshuffle, seed=1,
                                inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "r.h5ad"),
                                                    atac=str(tmp_path / "a.h5ad"))]))
        stores[codec] = open_store(out)
        assert stores[codec].meta.codec == codec and stores[codec].meta.n_cells == 400
        _assert_codec_on_disk(out, codec)
    ref = stores["lz4"]
    obs = ref.read_obs()
    x = _all_rows(ref, "rna")  # the lz4 store itself against the source, then every codec against it
    rows = obs.index.get_indexer(rna.obs_names)
    assert (x[rows] != sp.csr_matrix(rna.X).astype(x.dtype)).nnz == 0
    for codec, st in stores.items():
        assert st.read_obs().equals(obs)
        for mod in keys.MODALITIES:
            assert (_all_rows(st, mod) != _all_rows(ref, mod)).nnz == 0, (codec, mod)


def test_store_without_codec_attribute_opens_as_lz4(synth_stores, tmp_path):
    """Stores written before the option (no ``codec`` attribute) still open, as lz4."""
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(synth_stores["lz4"], old)
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["codec"]
    (old / "zarr.json").write_text(json.dumps(meta))
    st = open_store(old)
    assert st.meta.codec == "lz4"
    assert (_all_rows(st, "rna") != _all_rows(open_store(synth_stores["lz4"]), "rna")).nnz == 0


def test_cli_refuses_an_unknown_codec_in_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "data.synthetic", f"out={tmp_path / 's.zarr'}", "codec=gzip",
                        "n_cells=10", "progress=false"], cwd=root, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode != 0
    assert "mva-synth: error: codec 'gzip' is not supported; choose one of lz4, zstd, none" in r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []
