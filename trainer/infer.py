"""mva-infer: offline inference with a trained model (``job=`` embed, expression, accessibility, de, da, export).

    python -m trainer.infer model_dir=outputs/demo/run-X store=outputs/demo/store output=outputs/demo/embed.zarr
    torchrun --standalone --nproc_per_node=2 -m trainer.infer model_dir=... store=... output=...

The Hydra function only converts the config and calls ``infer(cfg)``, the plain function tests call.
Bad input (missing model, a store whose features differ from the model's, ...) ends with one line
``mva-infer: error: ...`` and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from data.cli import check_overrides, omp_threads, one_line_errors
from data.store import StoreError
from data.typed_config import ConfigError
from trainer import dist
from trainer.export import ModelFileError
from trainer.infer_config import RUNNERS, InferConfig, load_infer_config
from trainer.jobs.common import InferError
from trainer.lock import LockError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def infer(cfg: InferConfig) -> dict:
    """Run ``cfg.job`` (joins the torchrun process group if there is one); returns a small summary."""
    try:
        module_name, func = RUNNERS[cfg.job].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise ConfigError(f"job {cfg.job!r} is not implemented in this version") from None
        return getattr(module, func)(cfg)
    finally:
        dist.cleanup()


def check_cli(argv: list[str] | None = None) -> None:
    """Unknown keys refused in one line before Hydra runs (also by trainer.launch, before the ranks start)."""
    check_overrides("mva-infer", InferConfig, argv=argv)


def main() -> None:
    import hydra

    os.environ.setdefault("OMP_NUM_THREADS", "1")

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="infer")
    def _main(raw) -> None:
        import torch

        torch.set_num_threads(omp_threads(os.environ.get("OMP_NUM_THREADS")))
        # OSError: a full disk or an unwritable output names its path; a tampered model is refused
        with one_line_errors("mva-infer", (InferError, ConfigError, StoreError, ModelFileError, LockError, OSError)):
            infer(load_infer_config(raw))

    check_cli()
    _main()


if __name__ == "__main__":
    main()
