"""Typed configuration of a training run.

Hydra composes YAML from ``conf/``; ``load_config`` turns it into these dataclasses through
``data.typed_config.to_typed``, so an unknown or missing key stops the run at start-up with the key
named, before any process group or store is opened. Cross-field checks live in ``__post_init__``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from data.typed_config import ConfigError, to_typed

DEVICES = ("auto", "cpu", "cuda")  # dist.device / mva-infer's device (trainer/dist.pick_device)

# what run.monitor may name: keys of trainer.validation.validate's result (equal to loop.VALIDATION_KEYS, tested)
VALIDATION_KEYS = ("reconstruction_loss_validation", "elbo_validation")


@dataclass
class DataConfig:
    store: str = MISSING  # path of a store written by mva-build / mva-synth
    batch_size: int = 128  # cells per device (per rank) per step
    num_workers: int = 0  # DataLoader worker processes per rank (0 = read in the training process)
    prefetch: int = 2  # batches read ahead per worker
    val_fraction: float = 0.1  # must match the split the store was built with (hash of the cell id)
    # contiguous rows read together (shuffle granularity) and chunks whose cells are shuffled together;
    # null = the store decides (data.stream.default_chunking: 1,024 x 4 for a preshuffled store, whose
    # order is already random, 256 x 16 otherwise; the same 4,096-cell window either way)
    chunk_size: int | None = None
    window_chunks: int | None = None
    # how every rank gets the same number of training batches (data/plan.py): even = every cell exactly once
    # per epoch, the last batch of each rank short (or the few cells left joined to it); drop = leave out the
    # < ranks x batch cells left over (other ones each epoch); pad = fill with repeated cells; none = a short last batch
    # (the reference's drop_last=False; one process only, ranks could differ in batch count)
    remainder: str = "even"
    # keep the validation batches in memory after the first validation pass when they take at most this
    # many MiB (the held-out cells are spread over the whole store: re-reading them decompresses all of
    # it); larger validation sets stream every time. 0 = never keep them
    cache_validation_mb: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.remainder not in ("even", "drop", "pad", "none"):
            raise ConfigError(f"data.remainder must be even, drop, pad or none, got {self.remainder!r}")
        for key in ("chunk_size", "window_chunks"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.num_workers > 0 and self.prefetch < 1:  # torch's DataLoader asserts on it after start-up
            raise ConfigError(f"data.prefetch must be >= 1 with data.num_workers={self.num_workers}, "
                              f"got {self.prefetch}")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.cache_validation_mb < 0:  # silently meant 0 (never keep them)
            raise ConfigError(f"data.cache_validation_mb must be >= 0 (0 = stream every time), "
                              f"got {self.cache_validation_mb}")


@dataclass
class ModelConfig:
    """Exactly the MultiVAE options of docs/architecture.md (defaults = the reference's)."""

    n_hidden: int | None = None
    n_latent: int | None = None
    n_layers_encoder: int = 2
    n_layers_decoder: int = 2
    dropout_rate: float = 0.1
    region_factors: bool = True
    gene_likelihood: str = "zinb"
    dispersion: str = "gene"
    use_batch_norm: str = "none"
    use_layer_norm: str = "both"
    latent_distribution: str = "normal"
    deeply_inject_covariates: bool = False
    encode_covariates: bool = False
    modality_weights: str = "equal"
    modality_penalty: str = "Jeffreys"
    use_size_factor: bool = False
    # deterministic (the reference's library network) | lognormal (trainer/library_prior.py)
    rna_library: str = "deterministic"
    # torch.compile the dense ATAC-likelihood kernels (trainer/fused.py): same numbers, ~8 % faster
    # steps on CPU, but ~30 s of compilation per new machine (~8 s per process once cached): opt-in
    compile_kernels: bool = False
    # fused C kernels on the CPU (trainer/native: both likelihoods and the sparse first layer; built once
    # per machine with the system C compiler, eager fallback where they cannot be built): float32 CSR
    # counts, ~20 % more cells per CPU-second in the training step (docs/benchmarks.md)
    native_kernels: bool = True

    def __post_init__(self) -> None:
        # the module's own rule (imported lazily: torch is not needed to read YAML)
        from trainer.module import option_error

        # the module refuses the same values, but only after the store was opened (a traceback before)
        error = option_error(asdict(self))
        if error:
            raise ConfigError(f"model.{error}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-3
    eps: float = 1e-8
    adversarial: bool = True  # batch classifier; only active when the store has > 1 batch
    classifier_lr: float = 1e-3
    classifier_eps: float = 0.01
    # null: optim.weight_decay, as the reference ties them (its classifier's Adam takes the plan's weight_decay);
    # TrainConfig resolves it, so config.yaml and checkpoints hold the number
    classifier_weight_decay: float | None = None
    kappa: float = 1.0  # weight of the fool-the-classifier term in the VAE loss
    n_epochs_kl_warmup: int | None = 50  # epoch-granular warm-up (reference default)
    # used only when n_epochs_kl_warmup is null; counts minibatches (scvi-tools' Lightning step counts
    # both optimizers' steps: its N equals our N/2 with the adversarial classifier on)
    n_steps_kl_warmup: int | None = None
    # the reference's plan_kwargs of the same names: the warm-up takes the KL weight from min to max
    min_kl_weight: float = 0.0
    max_kl_weight: float = 1.0
    grad_clip: float | None = None  # max global grad norm; null = no clipping (reference)
    # the reference's plan_kwargs of the same names (off there too): after more than lr_patience validations
    # in a row without lr_scheduler_metric falling below best - lr_threshold, lr *= lr_factor (not below
    # lr_min). Counted in validations (run.validate_every_epochs apart); trainer.schedules.LrPlateau
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"

    def __post_init__(self) -> None:
        # NaN passes every `< 0` test: each check is written so that NaN fails it. Unchecked, torch refused a
        # negative / NaN rate, decay or eps with a traceback once the store was open, eps=0 divided 0 by 0 at
        # the first step (parameters without a gradient) and inf made every step non-finite
        for key, low, strict in (("lr", 0.0, True), ("classifier_lr", 0.0, True), ("eps", 0.0, True),
                                 ("weight_decay", 0.0, False), ("classifier_weight_decay", 0.0, False),
                                 ("classifier_eps", 0.0, False), ("kappa", 0.0, False)):
            value = getattr(self, key)
            if value is None and key == "classifier_weight_decay":
                continue
            if not (math.isfinite(value) and (value > low if strict else value >= low)):
                raise ConfigError(f"optim.{key} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            # torch scales the gradients by grad_clip / norm: 0 zeroed every step (no training), a negative
            # value reversed them (Adam then climbs the loss), NaN made every step non-finite
            raise ConfigError(f"optim.grad_clip must be > 0 (a maximal gradient norm) or null for no clipping, "
                              f"got {self.grad_clip}")
        for key in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
            value = getattr(self, key)
            if value is not None and value < 0:  # a negative warm-up silently meant none
                raise ConfigError(f"optim.{key} must be >= 0 or null (0 / null = no warm-up of this kind), got {value}")
        if not (math.isfinite(self.max_kl_weight) and 0 <= self.min_kl_weight <= self.max_kl_weight):
            # (NaN fails the comparison) the schedule raised a ValueError at the first step, after the store opened
            raise ConfigError(f"optim.min_kl_weight and optim.max_kl_weight must be finite with 0 <= min <= max, "
                              f"got {self.min_kl_weight} and {self.max_kl_weight}")
        self._check_plateau()
        if self.n_epochs_kl_warmup and self.n_steps_kl_warmup:
            # the epoch warm-up wins (the reference's rule): the step count was silently ignored
            raise ConfigError(f"optim.n_steps_kl_warmup={self.n_steps_kl_warmup} is used only when "
                              f"optim.n_epochs_kl_warmup is null, but it is {self.n_epochs_kl_warmup}: set "
                              "optim.n_epochs_kl_warmup=null for a step warm-up, or optim.n_steps_kl_warmup=null")

    @property
    def clf_weight_decay(self) -> float:
        """The adversarial classifier's weight decay (null: the VAE's)."""
        return self.weight_decay if self.classifier_weight_decay is None else self.classifier_weight_decay

    def _check_plateau(self) -> None:
        # checked even when off: a later reduce_lr_on_plateau=true should not be the first to hear of them
        if not (math.isfinite(self.lr_factor) and 0 < self.lr_factor < 1):  # >= 1 would raise the rate
            raise ConfigError(f"optim.lr_factor must be in (0, 1) (the rate is multiplied by it), got {self.lr_factor}")
        if self.lr_patience < 0:
            raise ConfigError(f"optim.lr_patience must be >= 0 (validations without improvement), got {self.lr_patience}")
        for key in ("lr_threshold", "lr_min"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optim.{key} must be a finite number >= 0, got {value}")
        if self.lr_scheduler_metric not in VALIDATION_KEYS:
            raise ConfigError(f"optim.lr_scheduler_metric must be one of {list(VALIDATION_KEYS)}, "
                              f"got {self.lr_scheduler_metric!r}")
        if self.reduce_lr_on_plateau and self.lr_min >= self.lr:
            raise ConfigError(f"optim.lr_min={self.lr_min} >= optim.lr={self.lr}: reduce_lr_on_plateau could never "
                              "lower the rate; set a smaller optim.lr_min (0 = no floor)")


@dataclass
class DistConfig:
    backend: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-2
    # fp32 | bf16 | fp16: autocast on GPU; bf16 also on CPUs with native bf16; fp16 with backend=ddp only
    precision: str = "fp32"
    timeout_s: int = 1800
    find_unused_parameters: bool = False
    # auto: each rank's GPU (LOCAL_RANK) where torch sees one, else the CPU; cuda: refuse to start without a GPU;
    # cpu: stay on the CPU of a GPU node (gloo; DeepSpeed's CPU accelerator)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"dist.device must be one of {DEVICES}, got {self.device!r}")
        if self.backend not in ("ddp", "deepspeed"):
            raise ConfigError(f"dist.backend must be ddp or deepspeed, got {self.backend!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"dist.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.backend == "ddp" and self.zero_stage != 0:  # DDP has no ZeRO: the stage was silently ignored
            raise ConfigError(f"dist.zero_stage={self.zero_stage} needs dist.backend=deepspeed (e.g. dist=deepspeed); "
                              "DDP keeps every state whole: leave dist.zero_stage=0")
        if self.timeout_s < 1:  # as mva-infer's timeout_s: the process group's collectives wait this long
            raise ConfigError(f"dist.timeout_s must be >= 1, got {self.timeout_s}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dist.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.backend == "deepspeed" and self.precision == "fp16":
            # DeepSpeed 0.19.8 backs its fp16 loss scale off (2**16, halving) only inside engine.step(): ZeRO 0's
            # guard skips an overflowing step before that step (the scale never comes down), and ZeRO 1/2 report
            # each back-off as an inf norm counted as a bad step; MultiVI needs ~12 halvings, so either way the
            # run would stop after run.max_bad_steps. Not runnable on a CPU, so refused rather than untested.
            raise ConfigError("dist.precision=fp16 is not supported with dist.backend=deepspeed (DeepSpeed's fp16 "
                              "loss-scale back-off would be stopped by the non-finite guard after run.max_bad_steps): "
                              "use dist.precision=bf16 with DeepSpeed, or dist.precision=fp16 with dist.backend=ddp")


@dataclass
class LoggerConfig:
    wandb_mode: str = "disabled"  # online | offline | disabled (online falls back to offline without a key)
    project: str = "multivi-atlas"
    tags: list[str] = field(default_factory=list)
    log_every: int = 10  # steps between metric records
    plot: bool = True  # loss.png at the end

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.wandb_mode must be online, offline or disabled, got {self.wandb_mode!r}")
        if self.log_every < 1:
            raise ConfigError(f"logger.log_every must be >= 1, got {self.log_every}")


@dataclass
class RunConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (over all epochs)
    early_stopping: bool = True
    patience: int = 50  # validations without improvement of `monitor`
    # validate after every n-th epoch (and after the last one); 0 = never (then early stopping and
    # keep=best, which read the validation, must be off)
    validate_every_epochs: int = 1
    min_delta: float = 0.0  # early stopping only: a validation must beat its reference by more to reset patience
    monitor: str = "reconstruction_loss_validation"
    keep: str = "last"  # last | best (the lowest `monitor` value, min_delta aside): which weights are exported
    checkpoint_every_steps: int | None = None  # extra mid-epoch checkpoints; one is always written per epoch
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk (0 = keep all)
    seed: int = 0
    output_dir: str = "outputs/run"  # chosen ONCE before ranks start (never Hydra's per-process timestamp)
    resume: str = "auto"  # auto | none | <path of a checkpoint directory>
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    # take over the output-dir lock of a job proven dead (same host, pid gone/reused); false = stop and
    # say how to clear it (trainer/lock.py). A live holder or one on another host is never taken over.
    clear_stale_lock: bool = True

    def __post_init__(self) -> None:
        if self.keep not in ("last", "best"):
            raise ConfigError(f"run.keep must be last or best, got {self.keep!r}")
        if self.epochs < 1:
            raise ConfigError(f"run.epochs must be >= 1, got {self.epochs}")
        # 0 would be accepted and then misbehave: patience 0 stops after an improving validation,
        # max_steps 0 still takes a step, max_bad_steps 0 stops at the first skip
        for key in ("patience", "max_steps", "checkpoint_every_steps", "max_bad_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                nullable = " or null" if key in ("max_steps", "checkpoint_every_steps") else ""
                raise ConfigError(f"run.{key} must be >= 1{nullable}, got {value}")
        if self.monitor not in VALIDATION_KEYS:
            # read after every validation even with early stopping off: an unknown name was a KeyError
            # traceback at the end of the first epoch
            raise ConfigError(f"run.monitor must be one of {list(VALIDATION_KEYS)}, got {self.monitor!r}")
        if not self.min_delta >= 0:
            # NaN: no validation after the first ever improved (keep=best shipped the first epoch's weights);
            # negative: a worse validation counted as an improvement
            raise ConfigError(f"run.min_delta must be >= 0 (the improvement that counts), got {self.min_delta}")
        if not 0 <= self.seed < 2**63:  # a traceback from the shuffle (negative) or torch.manual_seed (too large)
            raise ConfigError(f"run.seed must be in [0, 2**63), got {self.seed}")
        if self.keep_checkpoints < 0:  # silently meant 0 (keep all)
            raise ConfigError(f"run.keep_checkpoints must be >= 0 (0 = keep all), got {self.keep_checkpoints}")
        if not self.output_dir.strip():
            # Path("") is the working directory: checkpoints/, model/ and config.yaml were written there
            raise ConfigError("run.output_dir is empty: give the run directory, e.g. run.output_dir=outputs/myrun")
        if self.validate_every_epochs < 0:
            raise ConfigError(f"run.validate_every_epochs must be >= 0, got {self.validate_every_epochs}")
        if self.validate_every_epochs == 0 and (self.early_stopping or self.keep == "best"):
            readers, fixes = validation_readers(self.early_stopping, self.keep)
            raise ConfigError(f"run.validate_every_epochs=0 turns validation off, but {readers} it: set {fixes}, "
                              "or validate")


def validation_readers(early_stopping: bool, keep: str, plateau: bool = False) -> tuple[str, str]:
    """("X and Y read[s]", "the settings that turn them off") for the settings that read the validation, named
    only when they do (keep=last does not: a message once said run.keep='last' read it)."""
    on = [(f"run.early_stopping={early_stopping}", "run.early_stopping=false", early_stopping),
          ("run.keep='best'", "run.keep=last", keep == "best"),
          ("optim.reduce_lr_on_plateau=true", "optim.reduce_lr_on_plateau=false", plateau)]
    readers, fixes = [r for r, _, x in on if x], [f for _, f, x in on if x]
    return f"{' and '.join(readers)} read{'s' if len(readers) == 1 else ''}", " and ".join(fixes)


@dataclass
class QueryConfig:
    """Query mapping (scArches, the reference's ``load_query_data``): train on a new store starting from a
    trained model, its batch (and covariate) categories extended by the store's new ones, and only what the
    options below leave free trained (trainer/query.py; defaults = the reference's)."""

    reference: str | None = None  # the trained model: run directory or exported model directory
    unfrozen: bool = False  # train every weight (the other options are then not used)
    freeze_dropout: bool = False  # dropout off (the reference's query training runs without it anyway)
    freeze_expression: bool = True  # encoders' first layers: only their covariate columns train
    freeze_decoder_first_layer: bool = True  # decoders' (and library nets') first layers: only covariate columns
    freeze_batchnorm_encoder: bool = True
    freeze_batchnorm_decoder: bool = False


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    query: QueryConfig = field(default_factory=QueryConfig)

    def __post_init__(self) -> None:
        # here, not in OptimConfig: the schema's default OptimConfig() would resolve it before the overrides merge
        self.optim.classifier_weight_decay = self.optim.clf_weight_decay
        plateau = self.optim.reduce_lr_on_plateau
        if plateau and self.run.validate_every_epochs == 0:
            raise ConfigError("optim.reduce_lr_on_plateau=true reads the validation, but run.validate_every_epochs=0 "
                              "turns it off: validate, or set optim.reduce_lr_on_plateau=false")
        if self.data.val_fraction == 0 and (self.run.early_stopping or self.run.keep == "best" or plateau):
            readers, fixes = validation_readers(self.run.early_stopping, self.run.keep, plateau)
            raise ConfigError(f"data.val_fraction=0 leaves no validation cells, but {readers} the validation: set "
                              f"{fixes}, or keep a validation split")
        # without query.reference ("" too) they were silently ignored: a run from scratch where a query was asked for
        changed = [f"query.{f.name}" for f in fields(QueryConfig) if f.name != "reference"
                   and getattr(self.query, f.name) != getattr(QueryConfig(), f.name)]
        if not self.query.reference and changed:
            raise ConfigError(f"{', '.join(changed)} apply only to a query run: set query.reference=<run or model "
                              "dir>, or leave them unset")


def load_config(cfg: Any) -> TrainConfig:
    """Hydra/OmegaConf config (or plain dict) -> TrainConfig; raises ConfigError naming a bad key."""
    return to_typed(cfg, TrainConfig)


def config_to_json(cfg: TrainConfig) -> str:
    """The resolved config as a JSON string (stored in checkpoints so they hold no pickled objects)."""
    return json.dumps(asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> TrainConfig:
    return load_config(json.loads(text))
