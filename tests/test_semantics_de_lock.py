"""mva-infer de / da hold an exclusive lock on ``<output>.parts`` for the whole job, as the chunked jobs do.

Without it a second job on the same output (``overwrite=true``, other settings) emptied the parts directory
of a running one: the first job then wrote its table from both jobs' comparisons (shown: a seed-0 da job
exited 0 with 3 of its 6 comparisons computed by a concurrent seed-1 job) and the second one failed.

    .venv/bin/python -m pytest tests/test_semantics_de_lock.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from tests.infer_utils import infer_cfg, trained_model
from tests.train_utils import ROOT, env
from trainer.infer import infer
from trainer.infer_config import DiffOptions
from trainer.jobs.common import InferError
from trainer.lock import LOCK_NAME

# a live job holding the output's lock (argv[1] = the parts directory)
HOLD = (
    "import sys, time; from trainer.lock import acquire; "
    "acquire(sys.argv[1], 'mva-infer'); print('locked', flush=True); time.sleep(120)"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _cfg(trained, out, job="de", **kw):
    store, run = trained
    return infer_cfg(
        store,
        run,
        out,
        job=job,
        seed=kw.pop("seed", 0),
        overwrite=kw.pop("overwrite", False),
        de=DiffOptions(groupby="cell_type", n_samples_overall=200, **kw),
    )


@pytest.mark.parametrize("job", ["de", "da"])
def test_a_running_jobs_output_is_refused_and_left_alone(trained, tmp_path, job):
    out = tmp_path / f"{job}.csv"
    parts = tmp_path / f"{job}.csv.parts"
    parts.mkdir()
    mine = parts / "comp-00000.parquet"  # what the running job has written so far
    mine.write_bytes(b"the other job's comparison")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parts)], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InferError, match="in use by mva-infer"):
            infer(_cfg(trained, out, job, seed=1, overwrite=True))
        assert mine.read_bytes() == b"the other job's comparison" and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock is stale, cleared by the next run, which starts over (overwrite=true)
    assert (parts / LOCK_NAME).exists()
    infer(_cfg(trained, out, job, seed=1, overwrite=True))
    table = pd.read_csv(out, index_col=0)
    assert len(table) > 0 and not parts.exists()  # finished: parts directory and lock gone
    clean = tmp_path / f"clean_{job}.csv"
    infer(_cfg(trained, clean, job, seed=1))
    pd.testing.assert_frame_equal(table, pd.read_csv(clean, index_col=0))
