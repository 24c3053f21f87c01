"""mva-synth / mva-build on small inputs: options refused by name, the summary line, inputs with no cells,
integer feature columns under feature_join=union (each case a defect found in review).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_build_small.py -q
"""

from __future__ import annotations

import logging
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import zarr
from anndata.io import read_elem

from data.build import build_store
from data.config import BuildConfig
from data.store import open_store
from data.synthetic import write_synthetic_store
from data.validate import ValidationError
from tests.test_build_inputs import _pair, _write_pair

SMALL = {"n_cells": 10, "n_genes": 5, "n_regions": 5, "progress": False}


@pytest.mark.parametrize("value", [1.5, 0.0])
def test_synth_atac_density_outside_0_1_is_refused_by_name(tmp_path, value):
    # 1.5 was accepted (the docs call it a fraction): more fragments per cell than regions
    with pytest.raises(ValueError, match=f"out of range .*atac_density={value}"):
        write_synthetic_store(tmp_path / "s", atac_density=value, **SMALL)
    assert not list(tmp_path.iterdir())


def test_synth_cli_refuses_atac_density_above_one_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data.synthetic", f"out={tmp_path / 's'}", "atac_density=2.0",
                        "n_cells=10", "progress=false"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 2 and "mva-synth: error:" in r.stderr and "atac_density=2.0" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_synth_atac_density_is_the_nonzero_share_at_realistic_values(tmp_path):
    # what the SynthConfig comment promises: ~atac_density up to ~0.05, less above (fragments pile up)
    kw = {"n_cells": 400, "n_genes": 5, "n_regions": 1000, "progress": False, "paired_fraction": 1.0,
          "rna_only_fraction": 0.0, "atac_only_fraction": 0.0}
    shares = []
    for d in (0.02, 0.5):
        st = open_store(write_synthetic_store(tmp_path / f"s{d}", atac_density=d, **kw))
        atac = st.read_rows("atac", 0, 0, 400)
        shares.append(np.diff(atac.indptr).mean() / 1000)
    assert abs(shares[0] - 0.02) < 0.004
    assert 0.2 < shares[1] < 0.4


def test_summary_line_says_where_the_shards_were_written(tmp_path, caplog):
    # every Dask-path build said "(Dask)", also the default one that runs in this process
    inp = _write_pair(tmp_path, *_pair())
    with caplog.at_level(logging.INFO, logger="mva-build"):
        for pre in (False, True):
            build_store(BuildConfig(out=str(tmp_path / f"s{pre}.zarr"), progress=False, inputs=[inp], preshuffle=pre))
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    assert wrote[0].endswith("(in this process)") and wrote[1].endswith("(in this process, preshuffled)"), wrote
    from data.build import _where

    assert _where(BuildConfig(out="x", dask_scheduler="local", dask_workers=3)) == "Dask LocalCluster of 3 workers"
    assert _where(BuildConfig(out="x", dask_scheduler="tcp://h:8786")) == "Dask cluster tcp://h:8786"


@pytest.mark.parametrize("preshuffle", [False, True])
def test_an_input_with_no_cells_is_skipped_with_a_warning(tmp_path, caplog, preshuffle):
    # one empty sample stopped the whole build ("input has no cells"); its genes must not shrink the
    # intersection of the others, nor add never-measured columns under union
    full = _write_pair(tmp_path, *_pair(prefix="a", g=4), name="full")
    rna, atac = _pair(prefix="z", g=3)
    empty = _write_pair(tmp_path, rna[:0].copy(), atac[:0].copy(), name="empty")
    for join in ("intersection", "union"):
        out = tmp_path / f"{join}.zarr"
        with caplog.at_level(logging.WARNING, logger="mva-build"):
            build_store(BuildConfig(out=str(out), progress=False, inputs=[empty, full], feature_join=join,
                                    preshuffle=preshuffle))
        st = open_store(out)
        assert st.meta.n_cells == 6 and st.meta.gene_names == ["g0", "g1", "g2", "g3"]
        assert st.meta.source["skipped_inputs"] == [f"{empty.rna} + {empty.atac}"]
        assert any("empty/rna.h5ad" in r.getMessage() and "0 cells" in r.getMessage() for r in caplog.records)


def test_a_build_whose_inputs_all_have_no_cells_is_refused(tmp_path):
    rna, atac = _pair(prefix="z")
    a = _write_pair(tmp_path, rna[:0].copy(), atac[:0].copy(), name="e1")
    with pytest.raises(ValidationError, match="e1/rna.h5ad.*no cells in this input, there is nothing to build"):
        build_store(BuildConfig(out=str(tmp_path / "s.zarr"), progress=False, inputs=[a]))
    b = _write_pair(tmp_path, rna[:0].copy(), atac[:0].copy(), name="e2")
    with pytest.raises(ValidationError, match="e1/.*e2/.*no cells in any input"):
        build_store(BuildConfig(out=str(tmp_path / "s.zarr"), progress=False, inputs=[a, b], preshuffle=True))
    assert not list(tmp_path.glob("s.zarr*"))


@pytest.mark.parametrize("preshuffle", [False, True])
def test_an_int_feature_column_with_gaps_stays_integer_under_union(tmp_path, preshuffle):
    # a column only the first input has became float64 (pandas' reindex): 3 read back as 3.0
    r1, a1 = _pair(prefix="a", g=4)
    r1.var["n_cells"] = np.arange(4, dtype=np.int32) * 10
    r2, a2 = _pair(prefix="b", g=4)
    r2.var_names = ["g2", "g3", "g4", "g5"]
    out = build_store(BuildConfig(out=str(tmp_path / "s.zarr"), progress=False, feature_join="union",
                                  preshuffle=preshuffle,
                                  inputs=[_write_pair(tmp_path, r1, a1, "one"), _write_pair(tmp_path, r2, a2, "two")]))
    feats = read_elem(zarr.open_group(str(out))["features/rna"])
    assert str(feats["n_cells"].dtype) == "Int64"
    assert feats["n_cells"].tolist()[:4] == [0, 10, 20, 30] and feats["n_cells"].isna().tolist()[4:] == [True, True]
    shard = ad.read_zarr(out / "shards" / "00000" / "mod" / "rna")  # what anndata / scanpy users read
    assert str(shard.var["n_cells"].dtype) == "Int64"
    shard.write_h5ad(tmp_path / "x.h5ad")  # and what they export
    assert str(ad.read_h5ad(tmp_path / "x.h5ad").var["n_cells"].dtype) == "Int64"
    assert open_store(out).meta.gene_names == ["g0", "g1", "g2", "g3", "g4", "g5"]


@pytest.mark.parametrize(("kw", "match"), [({"seed": -1}, "seed must be >= 0, got -1"),
                                           ({"feature_join": "outer"}, "feature_join must be .* got 'outer'")])
def test_build_options_are_refused_by_name_before_any_input_is_opened(kw, match):
    # seed=-1 with preshuffle reached numpy as "expected non-negative integer"; a feature_join typo was
    # refused only after every input had been opened and checked
    from data.typed_config import ConfigError

    with pytest.raises(ConfigError, match=match):
        BuildConfig(out="x", **kw)


def test_a_continuous_covariate_beyond_float32_is_refused_not_stored_as_inf(tmp_path):
    rna, atac = _pair(obs={"batch": ["b0"] * 6, "umi": [1.0, 2.0, 1e39, 3.0, 4.0, 5.0]})
    with pytest.raises(ValidationError, match="covariate 'umi' is 1e\\+39 for cell 'c2', beyond float32"):
        build_store(BuildConfig(out=str(tmp_path / "s.zarr"), progress=False, cont_cov_keys=["umi"],
                                inputs=[_write_pair(tmp_path, rna, atac)]))
    assert not list(tmp_path.glob("s.zarr*"))
