"""Bad input through the real CLIs (subprocesses): exit status non-zero, ONE line on stderr naming the
problem, and no output that looks valid. Cases already covered elsewhere are not repeated here:
store validation (tests/test_validate.py), features differing from the model's and a missing model
(tests/test_infer_embed.py), an unknown train key (tests/test_train.py), corrupted chunks
(tests/test_reliability_reads.py), tampered checkpoints/models (tests/test_reliability_untrusted.py).

Cases that fail for a reason outside the files this suite's owner may edit are ``xfail(strict=True)``
with the reason: they flip to a failure (and must be un-marked) the day they are fixed.

    .venv/bin/python -m pytest tests/test_reliability_inputs.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from data.store import StoreError, open_store
from data.synthetic import write_synthetic_store
from tests.faults.mounts import tmpfs
from tests.train_utils import PY, ROOT, env, tiny_config, tiny_store
from trainer.train import train

TRAIN = ["-m", "trainer.train", "model.n_hidden=16", "model.n_latent=4", "run.epochs=1", "logger.plot=false"]
INFER = ["-m", "trainer.infer", "progress=false"]
SYNTH = ["-m", "data.synthetic", "progress=false", "n_cells=50", "n_genes=20", "n_regions=40"]
BUILD = ["-m", "data.build", "progress=false"]



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store, a trained model, a store with another schema version, a read-only mount, a plain file."""
    base = tmp_path_factory.mktemp("inputs")
    store = tiny_store(base / "store", n_cells=300)
    train(tiny_config(store, base / "run", **{"run.epochs": 1}))
    old = base / "old_schema"
    shutil.copytree(store, old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (old / "zarr.json").write_text(json.dumps(meta))
    (base / "a_file").write_text("not a directory")
    other = write_synthetic_store(base / "other", n_cells=300, n_genes=80, n_regions=300, progress=False)
    shutil.copytree(base / "run", base / "run_copy")  # resumed on the other store (must stay untouched)
    with tmpfs(base / "ro", "1m", read_only=True) as ro:
        yield {"store": store, "run": base / "run", "old": old, "ro": ro, "file": base / "a_file", "tmp": base,
               "other": other, "run_copy": base / "run_copy"}


FAST = {"train-schema-version", "train-resume-other-store", "infer-unknown-batch", "infer-readonly-output", "synth-readonly-output"}


def _case(case: str, argv: list[str], expected: str, output: str, xfail: str | None = None):
    """One row: argv formatted with the world's paths, the text the one line must hold, the output path
    that must not appear as something valid. Rows outside FAST are marked slow (~10 s each here)."""
    marks = [] if case in FAST else [pytest.mark.slow]
    if xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=xfail))
    return pytest.param(argv, expected, output, id=case, marks=marks)


CASES = [
    _case("train-missing-store", TRAIN + ["data.store={tmp}/nope", "run.output_dir={tmp}/t1"],
          "is not a Zarr v3 group", "{tmp}/t1/model"),
    _case("train-schema-version", TRAIN + ["data.store={old}", "run.output_dir={tmp}/t2"],
          "schema_version 99 is not supported", "{tmp}/t2/model"),
    _case("train-resume-other-store", ["-m", "trainer.train", "data.store={other}", "run.output_dir={run_copy}",
                                       "model.n_hidden=32", "model.n_latent=6", "run.epochs=2"],
          "was trained on a store with other features", "{run_copy}/checkpoints/step_000000010"),
    _case("train-readonly-output", TRAIN + ["data.store={store}", "run.output_dir={ro}/t3"],
          "Read-only file system", "{ro}/t3"),
    _case("train-file-as-dir", TRAIN + ["data.store={store}", "run.output_dir={file}/t4"],
          "Not a directory", "{file}/t4"),
    _case("infer-schema-version", INFER + ["model_dir={run}", "store={old}", "output={tmp}/i1.zarr"],
          "schema_version 99 is not supported", "{tmp}/i1.zarr"),
    _case("infer-missing-store", INFER + ["model_dir={run}", "store={tmp}/nope", "output={tmp}/i2.zarr"],
          "is not a Zarr v3 group", "{tmp}/i2.zarr"),
    _case("infer-unknown-batch", INFER + ["model_dir={run}", "store={store}", "output={tmp}/i3.zarr",
                                          "job=expression", "expression.transform_batch=batch_nope"],
          "unknown batch label 'batch_nope'", "{tmp}/i3.zarr"),
    _case("infer-unknown-key", INFER + ["model_dir={run}", "store={store}", "output={tmp}/i4.zarr", "+bogus_key=1"],
          "unknown config key: bogus_key", "{tmp}/i4.zarr"),
    _case("infer-readonly-output", INFER + ["model_dir={run}", "store={store}", "output={ro}/i5.zarr"],
          "Read-only file system", "{ro}/i5.zarr"),
    _case("infer-file-as-dir", INFER + ["model_dir={run}", "store={store}", "output={file}/i6.zarr"],
          "Not a directory", "{file}/i6.zarr"),
    _case("synth-readonly-output", SYNTH + ["out={ro}/s1.zarr"], "Read-only file system", "{ro}/s1.zarr"),
    _case("synth-unknown-key", SYNTH + ["out={tmp}/s2.zarr", "+n_cellz=5"], "unknown config key: n_cellz",
          "{tmp}/s2.zarr"),
    _case("synth-bad-value", SYNTH + ["out={tmp}/s3.zarr", "n_regions=0"], "must be >= 1", "{tmp}/s3.zarr"),
    _case("build-missing-input", BUILD + ["out={tmp}/b1.zarr", "inputs=[{{kind: h5mu, path: {tmp}/none.h5mu}}]"],
          "none.h5mu does not exist", "{tmp}/b1.zarr"),
    _case("build-unknown-key", BUILD + ["out={tmp}/b2.zarr", "+shard_sise=3"], "unknown config key: shard_sise",
          "{tmp}/b2.zarr"),
]


@pytest.mark.parametrize(("argv", "expected", "output"), CASES)
def test_bad_input_ends_in_one_line_and_no_valid_output(world, argv, expected, output):
    args = [a.format(**world) for a in argv]
    r = subprocess.run([PY, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"exit 0\n{r.stderr[-2000:]}"
    assert len(lines) == 1 and expected in lines[0] and ": error: " in lines[0], r.stderr[-3000:]
    out = Path(output.format(**world))
    if out.exists():  # whatever is left must not pass for a finished store/output/model
        with pytest.raises((StoreError, FileNotFoundError, ValueError)):
            open_store(out)
        assert not (out / "model.safetensors").exists()
