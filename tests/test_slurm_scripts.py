"""scripts/slurm/*.sbatch as Slurm runs them: the batch step once, on the first node, then ``srun`` starting
one command per node. No Slurm here: a stand-in ``srun`` runs the step's command once per node with the
per-node variables Slurm sets, and a stand-in Python prints the torchrun arguments each node would get.

    .venv/bin/python -m pytest tests/test_slurm_scripts.py -q
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.train_utils import ROOT

SRUN = """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do shift; done  # srun's own options
for n in 0 1; do SLURMD_NODENAME=node$n SLURM_NODEID=$n "$@"; done
"""
PRINT_ARGS = """#!/usr/bin/env bash
echo "NODE $SLURM_NODEID: $*"
"""


def _slurm_env(tmp_path, **extra: str) -> dict[str, str]:
    """A 2-node job's batch-step environment with the stand-in srun / scontrol / Python on PATH, from this
    process's environment without what torch.distributed left in it (an in-process single-rank group of an
    earlier test sets MASTER_PORT=29500, which the scripts rightly honour)."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name, body in (("srun", SRUN), ("scontrol", "#!/bin/sh\nprintf 'node0\\nnode1\\n'\n"),
                       ("fakepy", PRINT_ARGS)):
        (shims / name).write_text(body)
        (shims / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "MVA_ROOT", "RUN_DIR")}
    return {**env, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]",
            "SLURM_SUBMIT_DIR": str(ROOT), "PY": str(shims / "fakepy"), **extra}


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("script", ["train.sbatch", "infer.sbatch"])
def test_each_node_gets_its_own_address_and_the_requested_process_count(tmp_path, script):
    """LOCAL_ADDR used to be expanded once, in the batch step on the first node, so every node advertised
    that node's address; Slurm's SLURM_GPUS_ON_NODE used to override an explicit NPROC_PER_NODE."""
    env = _slurm_env(tmp_path, SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="4", NPROC_PER_NODE="2",
                     LOCAL_ADDR_CMD="echo 10.0.0.1$SLURM_NODEID")
    res = _run(script, env, "model_dir=/x")
    assert res.returncode == 0, res.stderr
    nodes = dict(re.findall(r"^NODE (\d): (.*)$", res.stdout, flags=re.MULTILINE))
    assert set(nodes) == {"0", "1"}, res.stdout
    for n, argv in nodes.items():
        assert f"--local-addr=10.0.0.1{n}" in argv, argv
        assert "--nproc-per-node=2" in argv and "--rdzv-endpoint=node0:15077" in argv, argv  # port from job 77
        assert "-m trainer.launch" in argv, argv  # torchrun without its launcher traceback


@pytest.mark.parametrize("script", ["train.sbatch", "infer.sbatch"])
def test_submitted_from_another_directory_with_its_own_port(tmp_path, script):
    """Submitted outside the project root, the scripts failed after the allocation with 'scripts/slurm/
    node_torchrun.sh: No such file' (exit 127); and every job used port 29500, so two jobs whose first node
    was the same machine shared one rendezvous (the second died when the first ended; helper audit)."""
    elsewhere = tmp_path / "runs"
    elsewhere.mkdir()
    base = _slurm_env(tmp_path, SLURM_SUBMIT_DIR=str(elsewhere))

    def submit(job: str, **extra: str) -> subprocess.CompletedProcess:
        return _run(script, {**base, "SLURM_JOB_ID": job, **extra}, "model_dir=/x")

    refused = submit("77")
    assert refused.returncode == 2 and "set MVA_ROOT=<project root>" in refused.stderr, refused.stderr
    ports = set()
    for job in ("4242", "4243"):
        res = submit(job, MVA_ROOT=str(ROOT))
        assert res.returncode == 0, res.stderr
        ports |= set(re.findall(r"--rdzv-endpoint=node0:(\d+)", res.stdout))
    assert ports == {"19242", "19243"}, ports
    assert (elsewhere / "outputs" / "slurm").is_dir()  # relative paths still mean the submit directory


def _sbatch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """train.sbatch as the batch step of a 2-node job; the stand-in Python prints each node's arguments."""
    return _run("train.sbatch", _slurm_env(tmp_path, SLURM_JOB_ID="77"), *args)


def test_train_sbatch_uses_the_run_dir_given_as_an_override(tmp_path):
    """``sbatch train.sbatch run.output_dir=/shared/runs/r1`` (the form scripts/train.sh takes) was overridden by
    the script's own run.output_dir=outputs/slurm/run-<id> appended after it: the run silently went elsewhere."""
    # '+run.output_dir=' as scripts/train.sh takes it: kept here, it met the script's own run.output_dir in Hydra
    # ("Could not append to config"), on every rank
    for given in ("run.output_dir=/shared/runs/r1", "++run.output_dir=/shared/runs/r1", "+run.output_dir=/shared/runs/r1"):
        res = _sbatch(tmp_path, "+experiment=atlas_1m", given, "dist=deepspeed")
        assert res.returncode == 0, res.stderr
        nodes = re.findall(r"^NODE \d: (.*)$", res.stdout, flags=re.MULTILINE)
        assert len(nodes) == 2, res.stdout
        for argv in nodes:
            dirs = re.findall(r"run\.output_dir=(\S+)", argv)
            assert dirs == ["/shared/runs/r1"], argv
            assert "+experiment=atlas_1m" in argv and "dist=deepspeed" in argv, argv
        assert "run dir /shared/runs/r1" in res.stdout, res.stdout
    default = re.findall(r"run\.output_dir=(\S+)", _sbatch(tmp_path, "+experiment=atlas_1m").stdout)
    assert set(default) == {"outputs/slurm/run-77"}, default


def test_train_sbatch_refuses_a_resume_setting_it_would_replace(tmp_path):
    """run.resume=<checkpoint> (or none) was silently replaced by the script's run.resume=auto: a job meant to
    continue another run's checkpoint started from scratch in a new directory. Refused in one line instead."""
    for given in ("run.resume=/shared/runs/r0/checkpoints/step_2000", "+run.resume=none"):
        res = _sbatch(tmp_path, "+experiment=atlas_1m", given)
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert "NODE" not in res.stdout and "run.resume" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    ok = _sbatch(tmp_path, "+experiment=atlas_1m", "run.resume=auto")
    assert ok.returncode == 0 and ok.stdout.count("run.resume=auto") == 2, ok.stdout


def test_train_sbatch_takes_a_trailing_multirun(tmp_path):
    """``sbatch train.sbatch <overrides> --multirun``: the script appended run.output_dir / run.resume after the
    flag, and Hydra's parser takes no override after one of its flags (every rank: 'unrecognized arguments')."""
    from hydra._internal.utils import get_args_parser

    res = _sbatch(tmp_path, "+experiment=atlas_1m", "optim.lr=1e-3,1e-4", "--multirun", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    for argv in re.findall(r"^NODE \d: (.*)$", res.stdout, flags=re.MULTILINE):
        hydra_args = argv.split(" -m trainer.train ", 1)[1].split()
        parsed = get_args_parser().parse_args(hydra_args)  # exits (status 2) on what Hydra would refuse
        assert parsed.multirun and parsed.cfg == "job", argv
        assert parsed.overrides == ["+experiment=atlas_1m", "optim.lr=1e-3,1e-4", "run.output_dir=outputs/slurm/run-77",
                                    "run.resume=auto"], argv
