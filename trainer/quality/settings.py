"""What both sides are trained with: one dataclass, so the two runners cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3  # both sides; the reference's default is 1e-4, raised so short runs converge
    n_epochs_kl_warmup: int = 10
    val_fraction: float = 0.1  # held-out cells (hash of the cell id, data/split.py), never trained on
    seed: int = 0
    # bumped when a side's training semantics change, so stored runs of an older harness are not reused
    # (2: our last batch is short like the reference's, no longer padded with repeated cells)
    harness_version: int = 2
    # the adversarial batch classifier on both sides (off: an ablation, MULTIVI's adversarial_mixing=False);
    # runs stored before this field existed had it on
    adversarial: bool = True
    dropout_rate: float = 0.1  # the z-encoders' dropout on both sides (0: an ablation); the reference's default
    # ablations of OUR side's random sources (docs/quality.md, "Low paired fractions"): "reference" starts
    # ours from the reference's initial weights for the same seed; "global" draws ours' reparameterisation
    # noise from the global generator (as the reference does) instead of the (seed, step)-keyed one
    ours_init: str = "own"  # own | reference
    ours_noise: str = "keyed"  # keyed | global
    # the converse: "ours" starts the REFERENCE from our trainer's initial weights for the same seed
    ref_init: str = "own"  # own | ours
    # model sizes/options are the reference's defaults on both sides (n_hidden, n_latent derived)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if (self.ours_init not in ("own", "reference") or self.ours_noise not in ("keyed", "global")
                or self.ref_init not in ("own", "ours")):
            raise ValueError(f"ours_init must be own|reference, ours_noise keyed|global, ref_init own|ours, got "
                             f"{self.ours_init!r}, {self.ours_noise!r}, {self.ref_init!r}")
