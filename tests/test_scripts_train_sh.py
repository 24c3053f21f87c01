"""scripts/train.sh when a rank fails: the ranks' own messages, torchrun's summary, the rank's exit status,
and no launcher traceback (torchrun's ChildFailedError was printed under every refused setting).

    .venv/bin/python -m pytest tests/test_scripts_train_sh.py -q
"""

from __future__ import annotations

import subprocess

from tests.train_utils import PY, ROOT, env


def _train_sh(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "scripts" / "train.sh"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**env(), "NPROC_PER_NODE": "2"},
    )


def test_refused_setting_is_one_line_per_rank_with_status_2(tmp_path):
    res = _train_sh(
        tmp_path, f"data.store={tmp_path / 'no_such_store'}", f"run.output_dir={tmp_path / 'run'}"
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("mva-train: error:")]
    assert len(errors) == 2 and "no_such_store" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr[-3000:]
    assert "FAILED" not in res.stderr  # the summary would only repeat "exit code 2" under the ranks' own line


def test_other_failures_keep_the_summary_and_status(tmp_path):
    # Hydra refuses an unknown key with its own message and status 1 (no mva-train line): the summary stays
    res = _train_sh(tmp_path, "data.store=/x", "run.no_such_key=1", f"run.output_dir={tmp_path / 'run'}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "run.no_such_key" in res.stderr and "trainer.train FAILED" in res.stderr, res.stderr[-3000:]
    assert "Root Cause" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]


def test_the_launcher_gives_mva_infer_refusals_as_one_line_too(tmp_path):
    # the README's inference command through trainer.launch (torchrun printed its traceback under it)
    res = subprocess.run(
        [PY, "-m", "trainer.launch", "--standalone", "--nproc_per_node=2", "-m", "trainer.infer", "job=embed",
         f"model_dir={tmp_path / 'no_model'}", f"store={tmp_path / 'no_store'}", f"output={tmp_path / 'z.zarr'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False, env=env())
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr[-3000:]
    assert "mva-infer" in res.stderr and ("no_model" in res.stderr or "no_store" in res.stderr), res.stderr[-3000:]
