"""mva-train: train MultiVI on a store, on 1 process, N processes or N nodes with the same command.

    python -m trainer.train data.store=outputs/demo/store run.output_dir=outputs/myrun
    torchrun --standalone --nproc_per_node=2 -m trainer.train +experiment=demo run.output_dir=outputs/x
    scripts/train.sh +experiment=demo                       # picks the run dir once, then torchrun
    python -m trainer.train +experiment=demo +sweep=latent_lr   # multirun: one complete run per member

The Hydra function only converts the config (unknown/missing keys fail here, naming the key) and calls
``train(cfg)``, the plain function tests call. ``run.output_dir`` must be chosen before the ranks
start (scripts/train.sh does it): Hydra's own timestamped directory is computed per process and can
differ between ranks.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from data.cli import check_overrides, omp_threads, one_line_errors
from data.store import StoreError
from trainer import dist
from trainer.checkpoint_checks import CheckpointError
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.guard import NonFiniteError
from trainer.lock import LockError
from trainer.loop import TrainResult, run

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def train(cfg: TrainConfig) -> TrainResult:
    """One complete training run (joins the torchrun process group if there is one)."""
    try:
        return run(cfg)
    finally:
        dist.cleanup()


def check_cli(argv: list[str] | None = None) -> None:
    """Unknown keys and config-group options refused in one line before Hydra runs (also by trainer.launch,
    once, before the ranks start)."""
    check_overrides("mva-train", TrainConfig, CONF_DIR, added=("experiment", "sweep"), argv=argv)


def preflight(argv: list[str]) -> None:
    """The config values and the store, checked once by the launcher (trainer.launch) before the ranks start: a
    refusal there came from every rank, and torchrun's --max-restarts (train.sbatch: 3) restarted them for each,
    a rendezvous each time on a cluster. Only the plain form is checked: Hydra flags (--multirun), hydra.*
    overrides (hydra.job.chdir moves the ranks' working directory) and interpolations (${oc.env:LOCAL_RANK},
    ${hydra:runtime.cwd} resolve only in a rank) are left to the ranks, as is anything Hydra itself refuses."""
    if any(a.startswith(("-", "hydra.", "hydra/", "+hydra", "++hydra")) or "${" in a for a in argv):
        return
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
            raw = compose("train", overrides=argv)
    except Exception:  # noqa: BLE001 - Hydra's own refusals: the ranks report them in one line
        return
    from omegaconf import OmegaConf

    from data.store import open_store

    if "${" in OmegaConf.to_yaml(raw):  # an interpolation in a preset: the ranks resolve it
        return
    with one_line_errors("mva-train", (ConfigError, StoreError)):
        open_store(load_config(raw).data.store)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    os.environ.setdefault("OMP_NUM_THREADS", "1")

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
    def _main(raw) -> None:
        with one_line_errors("mva-train", (ConfigError,)):
            cfg = load_config(raw)
        from hydra.core.hydra_config import HydraConfig

        job_num = OmegaConf.select(HydraConfig.get(), "job.num", default=None)
        if HydraConfig.get().mode.name == "MULTIRUN" and job_num is not None:
            # each sweep member is a complete run in its own directory
            cfg = replace(cfg, run=replace(cfg.run, output_dir=str(Path(cfg.run.output_dir) / str(job_num))))
        import torch

        torch.set_num_threads(omp_threads(os.environ.get("OMP_NUM_THREADS")))
        # bad input, a busy run dir, a full disk, a diverging run (its message names the step, the term and
        # the last good checkpoint: the traceback under it said nothing more)
        with one_line_errors("mva-train", (ConfigError, StoreError, LockError, CheckpointError, OSError,
                                           NonFiniteError)):
            train(cfg)

    check_cli()
    _main()


if __name__ == "__main__":
    main()
