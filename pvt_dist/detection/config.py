"""Typed configuration of a DETR fine-tuning run (``configs/detr/*.yaml``).

Sections shared with stage 1 (``deepspeed``, ``eval``, ``checkpoint``, ``logging``, ``dist``) are the
stage-1 dataclasses, so both stages launch, checkpoint and log the same way. Loading follows stage 1:
defaults < YAML (with ``_base_`` includes) < dotted ``key=value`` overrides; errors name the key.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

from pvt_dist.config import (
    CheckpointConfig,
    ConfigError,
    DeepSpeedOptions,
    DistConfig,
    EvalConfig,
    LeaseConfig,
    LoggingConfig,
    PreemptionConfig,
    check_cluster_sections,
    check_gpu_options,
    check_logging,
    load_config,
    resolve_batch,
)

from .criterion import LossConfig
from .data import DetectionDataConfig
from .detr import DETRConfig
from .targets import CocoAnnotations


@dataclass
class DetrOptimConfig:
    """AdamW with a smaller learning rate for the pretrained backbone (DETR recipe)."""

    lr: float = 1e-4
    """Learning rate of the transformer, projections and heads."""
    backbone_lr: float = 1e-5
    """Learning rate of the PVT backbone."""
    linear_proj_lr_mult: float = 0.1
    """Deformable head: the sampling-offset and reference-point projections train at lr times this
    (Deformable-DETR: 0.1). The DETR head has no such parameters."""
    weight_decay: float = 1e-4
    """AdamW weight decay (all parameters, as in DETR)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""


@dataclass
class DetrScheduleConfig:
    """Length of training and the step decay of the learning rate."""

    epochs: float = 50
    """Training length in epochs of the train split (ignored when total_steps is set)."""
    total_steps: int | None = None
    """Training length in optimizer steps."""
    steps_per_epoch: int | None = None
    """Override of the optimizer steps per epoch (default: micro batches per rank / grad_accum)."""
    lr_drop_epoch: float = 33
    """Epoch from which both learning rates are multiplied by lr_drop_factor (the PVT paper: 33 of 50)."""
    lr_drop_step: int | None = None
    """The same in optimizer steps; wins over lr_drop_epoch."""
    lr_drop_factor: float = 0.1
    """Multiplier applied at the drop."""


@dataclass
class DetrTrainConfig:
    """A DETR fine-tuning run on a PVT backbone."""

    run_dir: str = "runs/detr"
    """Checkpoints, TensorBoard events, metrics.jsonl, config.yaml and the detector export go here."""
    seed: int = 0
    """Seed of weights init, augmentation and dropout."""
    model: DETRConfig = field(default_factory=DETRConfig)
    """Backbone, transformer and heads (model.num_classes is taken from the annotation file when null)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Matcher costs and loss weights."""
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    """COCO-format splits and augmentation."""
    optim: DetrOptimConfig = field(default_factory=DetrOptimConfig)
    """Optimizer."""
    schedule: DetrScheduleConfig = field(default_factory=DetrScheduleConfig)
    """Training length and lr drop."""
    deepspeed: DeepSpeedOptions = field(
        default_factory=lambda: DeepSpeedOptions(micro_batch=2, grad_clip=0.1)
    )
    """ZeRO stage, precision, batch triple, gradient clipping (DETR: 0.1)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """When to run COCO evaluation."""
    eval_micro_batch: int | None = None
    """Images per rank per evaluation forward (default: deepspeed.micro_batch). Padding to the largest image
    of a batch changes a DETR's output, so evaluate with the batch it was trained with, or 1."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console/TensorBoard logging."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group settings."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """How often the ranks agree on a stop signal."""
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    """The run directory's lease (one job per run directory)."""
    export: str = "detector.pth"
    """File (relative to run_dir) the final detector is exported to for detect.py / evaluate_detr.py."""
    vis_images: int = 2
    """Validation images drawn with predicted and ground-truth boxes into TensorBoard at each evaluation."""


def load_detr_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DetrTrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides."""
    return load_config(path, overrides, cls=DetrTrainConfig)


def resolve_detr_config(cfg: DetrTrainConfig, world_size: int, check_files: bool = True) -> DetrTrainConfig:
    """Derive the batch triple and check every section; errors start with the offending key.

    ``check_files=False`` (``--plan``) accepts a missing annotation file; ``model.num_classes`` must then
    be set. The batch follows ``pvt_dist.config.resolve_batch`` (global kept, micro as a cap).
    """
    cfg = copy.deepcopy(cfg)
    try:
        cfg.data.validate()
        if check_files or os.path.isfile(cfg.data.train_ann):
            ann = CocoAnnotations(cfg.data.train_ann, cfg.data.train_images)  # bad ground truth fails here
            if cfg.model.num_classes is None:
                cfg.model.num_classes = ann.num_classes
            elif cfg.model.num_classes < ann.num_classes:
                raise ValueError(
                    f"model.num_classes: {cfg.model.num_classes} < {ann.num_classes} categories in "
                    f"{cfg.data.train_ann}"
                )
        elif cfg.model.num_classes is None:
            raise ValueError(
                f"model.num_classes: data.train_ann {cfg.data.train_ann} is not readable; set the class count"
            )
        cfg.model.validate()
        cfg.loss.resolve(cfg.model.head)
    except FileNotFoundError as e:
        raise ConfigError(f"data.train_ann: {e}") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.grad_clip is not None and ds.grad_clip <= 0:
        raise ConfigError(f"deepspeed.grad_clip: must be > 0 or null, got {ds.grad_clip}")
    ds.global_batch, ds.micro_batch, ds.grad_accum = resolve_batch(ds, world_size)
    check_gpu_options(ds)
    o, s = cfg.optim, cfg.schedule
    for key, v in (("optim.lr", o.lr), ("optim.backbone_lr", o.backbone_lr),
                   ("optim.linear_proj_lr_mult", o.linear_proj_lr_mult)):  # fmt: skip
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if not 0 < s.lr_drop_factor <= 1:
        raise ConfigError(f"schedule.lr_drop_factor: must be in (0, 1], got {s.lr_drop_factor}")
    if cfg.eval_micro_batch is not None and cfg.eval_micro_batch < 1:
        raise ConfigError(f"eval_micro_batch: must be >= 1, got {cfg.eval_micro_batch}")
    if not cfg.run_dir:
        raise ConfigError("run_dir: must not be empty")
    check_cluster_sections(cfg)
    check_logging(cfg.logging)
    return cfg


def resolve_detr_schedule(cfg: DetrTrainConfig, train_images: int, world_size: int) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, lr_drop_step) in optimizer steps, from the training split's size.

    An epoch is ceil(images / global batch) optimizer steps: every image once, and the same number of steps
    at every world size that keeps the global batch (the loaders pad each rank's last batch; a step that
    runs past a rank's epoch continues into the next one). ``world_size`` only has to agree with the
    resolved batch triple. Runs before any process group (``pvt_dist.cluster.plan``) and in the trainer,
    with the same numbers.
    """
    s, ds = cfg.schedule, cfg.deepspeed
    if ds.global_batch != ds.micro_batch * ds.grad_accum * world_size:
        raise ConfigError(f"deepspeed.global_batch: {ds.global_batch} does not match world size {world_size}")
    steps_per_epoch = s.steps_per_epoch or max(1, math.ceil(train_images / ds.global_batch))
    total = s.total_steps or max(1, round(s.epochs * steps_per_epoch))
    drop = s.lr_drop_step if s.lr_drop_step is not None else round(s.lr_drop_epoch * steps_per_epoch)
    return steps_per_epoch, total, drop
