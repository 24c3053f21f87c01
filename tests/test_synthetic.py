"""mva-synth: determinism, modality mix, biology that a model can find, bounded-memory block path.

Run: .venv/bin/python -m pytest tests/test_synthetic.py -q
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data.store import open_store
from data.synthetic import write_synthetic_store


def _all_rows(st, modality):
    m = st.meta
    return sp.vstack([st.read_rows(modality, i, 0, m.shard_offsets[i + 1] - m.shard_offsets[i])
                      for i in range(m.n_shards)], format="csr")


def test_deterministic_by_seed_and_independent_of_shard_size(tmp_path):
    kw = {"n_cells": 1500, "n_genes": 120, "n_regions": 600, "block_size": 512, "progress": False}
    a = open_store(write_synthetic_store(tmp_path / "a", seed=3, shard_size=400, **kw))
    b = open_store(write_synthetic_store(tmp_path / "b", seed=3, shard_size=1000, **kw))
    c = open_store(write_synthetic_store(tmp_path / "c", seed=4, shard_size=400, **kw))
    assert a.meta.shard_offsets == [0, 400, 800, 1200, 1500] and b.meta.n_shards == 2
    for mod in ("rna", "atac"):
        assert (_all_rows(a, mod) != _all_rows(b, mod)).nnz == 0
        assert (_all_rows(a, mod) != _all_rows(c, mod)).nnz > 0
    assert a.read_obs().equals(b.read_obs())


def test_modality_mix_density_and_library_sizes(tmp_path):
    st = open_store(write_synthetic_store(tmp_path / "s", n_cells=3000, n_genes=300, n_regions=2000, seed=0,
                                          paired_fraction=0.6, rna_only_fraction=0.3, atac_only_fraction=0.1,
                                          progress=False))
    obs = st.read_obs()
    mr, ma = obs["mask_rna"].values, obs["mask_atac"].values
    assert (mr | ma).all()
    assert abs((mr & ma).mean() - 0.6) < 0.04 and abs((mr & ~ma).mean() - 0.3) < 0.04
    rna, atac = _all_rows(st, "rna"), _all_rows(st, "atac")
    assert np.diff(rna.indptr)[~mr].max() == 0 and np.diff(atac.indptr)[~ma].max() == 0
    density = np.diff(atac.indptr)[ma].mean() / 2000
    assert 0.03 <= density <= 0.05
    lib = obs["lib_rna"].values[mr]
    assert 1000 < np.median(lib) < 2500 and lib.min() > 0
    assert list(st.meta.label_categories) == [f"type_{i}" for i in range(6)]


def test_cell_types_and_batches_are_visible_in_the_counts(tmp_path):
    st = open_store(write_synthetic_store(tmp_path / "s", n_cells=2000, n_genes=200, n_regions=800, seed=1,
                                          n_batches=2, paired_fraction=1.0, rna_only_fraction=0.0,
                                          atac_only_fraction=0.0, batch_effect=0.5, progress=False))
    obs = st.read_obs()
    rna = _all_rows(st, "rna").astype(np.float64)
    norm = np.log1p(sp.diags_array(1e4 / rna.sum(1).A1) @ rna).toarray()
    t = obs["cell_type"].cat.codes.values
    b = obs["batch"].cat.codes.values

    # Nearest-centroid classification on log-normalised RNA: types must be well separated.
    def accuracy(codes):
        cents = np.stack([norm[codes == k].mean(0) for k in np.unique(codes)])
        pred = np.argmin(((norm[:, None] - cents[None]) ** 2).sum(-1), axis=1)
        return (pred == codes).mean()

    assert accuracy(t) > 0.9
    assert accuracy(b) > 0.7  # batch effect present (chance = 0.5)


@pytest.mark.slow
def test_cli_module_entry_point(tmp_path):
    out = tmp_path / "demo.zarr"
    r = subprocess.run([sys.executable, "-m", "data.synthetic", f"out={out}", "n_cells=500", "n_genes=50",
                        "n_regions=100", "progress=false"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert open_store(out).meta.n_cells == 500
    r = subprocess.run([sys.executable, "-m", "data.synthetic", f"out={out}", "n_cells=50"],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode != 0 and "already exists" in r.stderr
    r = subprocess.run([sys.executable, "-m", "data.synthetic", f"out={out}", "n_cels=50"],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode != 0


def test_every_generator_knob_can_be_overridden_on_the_command_line():
    # conf/synth.yaml lacked batch_effect, atac_density, ...: `mva-synth batch_effect=0.5` was refused by Hydra
    from hydra import compose, initialize_config_dir

    from data.config import SynthConfig
    from data.typed_config import to_typed

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="synth", overrides=["batch_effect=0.5", "atac_density=0.1", "n_markers=3",
                                                      "marker_fold=2.0", "n_type_peaks=4", "peak_fold=3.0",
                                                      "rna_library_median=900.0"])
    c = to_typed(cfg, SynthConfig)
    assert (c.batch_effect, c.atac_density, c.n_markers, c.n_type_peaks) == (0.5, 0.1, 3, 4)
    assert c == SynthConfig(**{**asdict(SynthConfig()), "batch_effect": 0.5, "atac_density": 0.1, "n_markers": 3,
                               "marker_fold": 2.0, "n_type_peaks": 4, "peak_fold": 3.0, "rna_library_median": 900.0})


@pytest.mark.parametrize("bad", ["n_batches", "n_cell_types", "block_size"])
def test_zero_sizes_are_refused_by_name(tmp_path, bad):
    with pytest.raises(ValueError, match=f"must be >= 1: {bad}=0"):
        write_synthetic_store(tmp_path / "s", n_cells=10, n_genes=5, n_regions=5, progress=False, **{bad: 0})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [{"atac_density": -0.1}, {"batch_effect": -1.0}, {"rna_library_median": -5.0},
                                 {"n_markers": -2}, {"peak_fold": 0.0}])
def test_out_of_range_generator_knobs_are_refused_by_name(tmp_path, bad):
    # they reached numpy as "lam < 0", "scale < 0", "negative dimensions..." (or, peak_fold=0, NaN-free nonsense)
    (key, value), = bad.items()
    with pytest.raises(ValueError, match=f"out of range .*{key}={value}"):
        write_synthetic_store(tmp_path / "s", n_cells=10, n_genes=5, n_regions=5, progress=False, **bad)
    assert not list(tmp_path.iterdir())


def test_modality_fractions_accepted_within_the_tolerance_are_drawn_not_refused_by_numpy(tmp_path):
    # 0.3333333 x 3 sums to 0.9999999: inside the documented 1e-6 tolerance, so the check let it through, and
    # numpy's choice then stopped the build with "Probabilities do not sum to 1" (its tolerance is ~1.5e-8)
    third = 0.3333333
    st = open_store(write_synthetic_store(tmp_path / "s", n_cells=3000, n_genes=20, n_regions=50, progress=False,
                                          paired_fraction=third, rna_only_fraction=third, atac_only_fraction=third))
    obs = st.read_obs()
    mr, ma = obs["mask_rna"].values, obs["mask_atac"].values
    for got in ((mr & ma).mean(), (mr & ~ma).mean(), (~mr & ma).mean()):
        assert abs(got - 1 / 3) < 0.04
    with pytest.raises(ValueError, match="sum to 1"):
        write_synthetic_store(tmp_path / "b", n_cells=10, n_genes=5, n_regions=5, progress=False,
                              paired_fraction=0.5, rna_only_fraction=0.25, atac_only_fraction=0.2)


def test_a_negative_seed_is_refused_by_name(tmp_path):
    # reached numpy's SeedSequence as "expected non-negative integer", naming no key (mva-synth seed=-1)
    with pytest.raises(ValueError, match="out of range .*seed=-1"):
        write_synthetic_store(tmp_path / "s", n_cells=10, n_genes=5, n_regions=5, progress=False, seed=-1)
    assert not list(tmp_path.iterdir())
