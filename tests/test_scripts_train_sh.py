"""scripts/train.sh when a rank fails: the ranks' own messages, torchrun's summary, the rank's exit status,
and no launcher traceback (torchrun's ChildFailedError was printed under every refused setting).

    .venv/bin/python -m pytest tests/test_scripts_train_sh.py -q
"""

from __future__ import annotations

import subprocess

from tests.train_utils import PY, ROOT, env, tiny_store


def _train_sh(tmp_path, *overrides: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "scripts" / "train.sh"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**env(), "NPROC_PER_NODE": "2", **environ},
    )


def test_refused_setting_is_one_line_per_rank_with_status_2(tmp_path):
    # a refusal only the ranks see (the query reference is read in the run): each rank's own line, no summary
    res = _train_sh(tmp_path, f"data.store={tiny_store(tmp_path / 'store', n_cells=50)}",
                    f"query.reference={tmp_path / 'no_such_model'}", f"run.output_dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("mva-train: error:")]
    assert len(errors) == 2 and "no_such_model" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr[-3000:]
    assert "FAILED" not in res.stderr  # the summary would only repeat "exit code 2" under the ranks' own line


def test_a_bad_value_or_store_is_refused_once_before_the_ranks_start(tmp_path):
    """A missing store or a bad value came from every rank, and with --max-restarts (train.sbatch's default 3)
    torchrun restarted the ranks for each refusal (4 x 2 lines, 18 s; a rendezvous each time on a cluster)."""
    for overrides, line in (((f"data.store={tmp_path / 'no_such_store'}",),
                             (f"mva-train: error: {tmp_path / 'no_such_store'} is not a Zarr v3 group (no zarr.json); "
                             "is the path right?")),
                            (("data.store=/x", "run.epochs=0"), "mva-train: error: run.epochs must be >= 1, got 0")):
        res = _train_sh(tmp_path, *overrides, f"run.output_dir={tmp_path / 'run'}", MAX_RESTARTS="3")
        assert res.returncode == 2, res.stderr[-3000:]
        assert res.stderr.strip().splitlines() == [line], res.stderr[-3000:]  # no rank started: not even torch's log


def test_other_failures_keep_the_summary_and_status(tmp_path):
    # Hydra refuses a malformed override with its own message and status 1 (no mva-train line): the summary stays
    res = _train_sh(tmp_path, "data.store=/x", "run.epochs=[1", f"run.output_dir={tmp_path / 'run'}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "no viable alternative at input '[1'" in res.stderr and "trainer.train FAILED" in res.stderr, \
        res.stderr[-3000:]
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


def _launch_args(tmp_path, env_extra: dict[str, str], *overrides: str) -> str:
    """The torchrun arguments train.sh would run (a stand-in Python prints them) on a node whose nvidia-smi
    lists 8 GPUs."""
    import os

    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name, body in (("nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100 (UUID: GPU-$i)\"; done\n"),
                       ("fakepy", "#!/bin/sh\necho \"ARGS: $*\"\n")):
        (shims / name).write_text(body)
        (shims / name).chmod(0o755)
    e = {k: v for k, v in env().items() if k not in ("NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES")}
    e.update(PATH=f"{shims}:{os.environ['PATH']}", PY=str(shims / "fakepy"), **env_extra)
    res = subprocess.run([str(ROOT / "scripts" / "train.sh"), "data.store=x", *overrides], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=False, env=e)
    assert res.returncode == 0, res.stderr
    return next(line for line in res.stdout.splitlines() if line.startswith("ARGS: "))


def test_default_process_count_is_the_gpus_this_job_may_use(tmp_path):
    """train.sh counted every GPU nvidia-smi lists, ignoring CUDA_VISIBLE_DEVICES: with 2 of 8 GPUs visible
    it started 8 ranks, and ranks 2-7 failed in torch.cuda.set_device (invalid device ordinal); with the GPUs
    hidden (CUDA_VISIBLE_DEVICES=) it started 8 CPU processes instead of 1."""
    assert "--nproc-per-node=8" in _launch_args(tmp_path, {})
    assert "--nproc-per-node=2" in _launch_args(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert "--nproc-per-node=2" in _launch_args(tmp_path, {"CUDA_VISIBLE_DEVICES": "GPU-3,GPU-5"})
    assert "--nproc-per-node=1" in _launch_args(tmp_path, {"CUDA_VISIBLE_DEVICES": ""})
    assert "--nproc-per-node=3" in _launch_args(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1", "NPROC_PER_NODE": "3"})


def test_a_forced_run_dir_override_is_the_run_dir(tmp_path):
    """``++run.output_dir=x`` (Hydra's force-add form) went to mva-train ahead of train.sh's own
    run.output_dir=outputs/train-<timestamp>, which Hydra applies last: the run silently went to the timestamp."""
    import re

    for given in ("++run.output_dir=runs/mine", "+run.output_dir=runs/mine"):  # "+": Hydra's "Could not append"
        args = _launch_args(tmp_path, {"NPROC_PER_NODE": "2"}, given)
        assert re.findall(r"run\.output_dir=(\S+)", args) == ["runs/mine"], (given, args)


def test_an_elastic_node_range_is_refused_before_launch(tmp_path):
    """NNODES=1:2 was offered "for an elastic job", but a job that re-formed with fewer nodes was refused at its
    resume (a checkpoint resumes only at its own world size; helper audit): it could not survive the loss it was
    meant for. One number, or MIN:MAX with MIN = MAX, still launches."""
    res = subprocess.run([str(ROOT / "scripts" / "train.sh"), "data.store=x"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False,
                         env={**env(), "NNODES": "1:2", "RDZV_ENDPOINT": "h:1", "RUN_DIR": str(tmp_path / "r")})
    assert res.returncode == 2 and "an elastic node count cannot continue a run" in res.stderr, res.stderr
    args = _launch_args(tmp_path, {"NPROC_PER_NODE": "1", "NNODES": "2:2", "RDZV_ENDPOINT": "h:1",
                                   "RUN_DIR": str(tmp_path / "r")})
    assert "--nnodes=2 " in args, args


def test_a_signalled_launcher_exits_128_plus_n_in_one_line(tmp_path):
    """Slurm's SIGTERM (cancel, time limit) to train.sh's launcher gave torchrun's SignalException traceback and
    status 1, as if our code had crashed (helper audit)."""
    import signal
    import time

    worker = tmp_path / "wait.py"
    worker.write_text("import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([PY, "-m", "trainer.launch", "--standalone", "--nproc-per-node=1", str(worker)],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "[launch] stopped by signal 15 (SIGTERM)" in err and "Traceback" not in err, err[-2000:]


def test_an_unknown_key_or_preset_is_one_line_before_the_ranks_start(tmp_path):
    """Without '+', a mistyped key got Hydra's several-line message from every rank, status 1, and torchrun's
    failure summary under it; a missing preset or an interpolation error the same or a traceback."""
    for overrides, line in (
            (("data.batchsize=64",), "mva-train: error: unknown config key: data.batchsize (did you mean data.batch_size?)"),
            (("+experiment=nope",), ("mva-train: error: +experiment=nope: experiment has no option 'nope'; choose one of "
                                    "['atlas_1m', 'bmmc', 'demo']")),
            (("experiment=demo",), ("mva-train: error: experiment=demo: experiment is not in the default config; add it: "
                                   "+experiment=demo")),
            (("data=5",), "mva-train: error: data=5: data has no option '5'; choose one of ['default']")):
        res = _train_sh(tmp_path, "data.store=/x", *overrides)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [line], res.stderr[-3000:]
    # interpolations resolve in the ranks (${oc.env:LOCAL_RANK} exists only there): each rank says it
    res = _train_sh(tmp_path, "data.store=/x", "data.batch_size=${nope}", f"run.output_dir={tmp_path / 'run'}")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mva-train: error:")]
    assert res.returncode == 2 and errors == [("mva-train: error: bad interpolation in data.batch_size: Interpolation "
                                              "key 'nope' not found")] * 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr


def test_every_entry_point_names_an_unknown_key_in_one_line(tmp_path):
    for module, args, line in (
            ("trainer.infer", ["model_dir=x", "store=y", "outptu=z"], ("mva-infer: error: unknown config key: outptu "
                                                                      "(did you mean output?)")),
            ("data.build", ["out=x", "inputz=[]"], "mva-build: error: unknown config key: inputz (did you mean inputs?)"),
            ("data.synthetic", ["out=x", "n_cell=4"], ("mva-synth: error: unknown config key: n_cell (did you mean "
                                                      "n_cells?)")),
            ("trainer.infer", ["model_dir=x", "store=y", "output=${nope}"], ("mva-infer: error: bad interpolation in "
                                                                           "output: Interpolation key 'nope' not found")),
            # a mapping where a list or one value belongs: Hydra's several lines, exit 1 (its merge fails before our
            # config conversion could name it)
            ("trainer.train", ["logger.tags={a: 1}"], ("mva-train: error: logger.tags={a: 1}: logger.tags takes a "
                                                       "list, not a mapping: e.g. logger.tags=[...]")),
            ("trainer.train", ["run.epochs={a: 1}"], ("mva-train: error: run.epochs={a: 1}: run.epochs takes one "
                                                      "value, not a mapping")),
            ("data.build", ["out=x", "inputs={kind: h5mu, path: a.h5mu}"], (
                "mva-build: error: inputs={kind: h5mu, path: a.h5mu}: inputs takes a list of mappings: put it in "
                "brackets, inputs=[{kind: h5mu, path: a.h5mu}]"))):
        res = subprocess.run([PY, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             check=False, env=env())
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [line], (module, res.stderr[-2000:])


def test_the_override_check_leaves_sweeps_and_what_it_cannot_read_to_hydra():
    """check_overrides is a pre-check: sweeps of valid options, glob()/range() sweeps and malformed lines pass
    to Hydra untouched (glob() needs Hydra's config loader: it raised a HydraException here)."""
    from trainer.train import check_cli

    for argv in (["+experiment=glob(*)", "--multirun"], ["dist=glob(d*)", "-m"], ["+experiment=choice(demo,bmmc)", "-m"],
                 ["data.batch_size=range(32,128,32)", "-m"], ["model.n_latent=interval(1,2)"], ["run.epochs=[1"],
                 ["~run.seed"], ["hydra.job.chdir=false"], ["--cfg", "job", "+sweep=latent_lr"],
                 # '+' on a key whose value is null or ??? or with a list: Hydra takes these
                 ["+data.store=s.zarr", "+model.n_latent=2", "+run.max_steps=3", "+logger.tags=[a,b]"]):
        check_cli(argv)  # returns (a refusal exits)
    from trainer.infer import check_cli as infer_check

    infer_check(["expression.transform_batch={a: 1}", "+embed.umap_png=u.png"])  # Any: a value or a list


def test_the_launcher_check_leaves_what_only_a_rank_resolves_to_the_ranks(tmp_path):
    """The preflight composes in the launcher, which has no torchrun variables and no Hydra runtime: a per-rank
    store path (${oc.env:...LOCAL_RANK}) was refused there, and the run never started."""
    store = tiny_store(tmp_path / "store", n_cells=60)
    res = subprocess.run(
        [PY, "-m", "trainer.launch", "--standalone", "--nproc_per_node=1", "-m", "trainer.train",
         "data.store='${oc.env:MVA_TEST_STORE_${oc.env:LOCAL_RANK}}'", f"run.output_dir={tmp_path / 'run'}",
         "run.max_steps=1", "model.n_hidden=8", "model.n_latent=2", "run.early_stopping=false", "data.batch_size=32",
         "logger.plot=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
        env={**env(), "MVA_TEST_STORE_0": str(store)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.json").is_file()
