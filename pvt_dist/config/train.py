"""Typed training configuration: defaults < YAML file(s) < dotted command-line overrides.

    cfg = load_config("configs/pretrain/pvt_small.yaml", ["optim.lr=1e-3", "deepspeed.zero_stage=3"])
    cfg = resolve_config(cfg, world_size=8)      # derives the batch triple, checks combinations

Every error names the offending key (``deepspeed.global_batch: ...``) and is raised before any
process group starts, so a bad launch fails in seconds instead of after minutes of queueing.
A YAML file may name another one under ``_base_`` (path relative to it); the two are deep-merged
(the generic YAML <-> dataclass machinery is ``pvt_dist.config.io``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pvt_dist.config.io import ConfigError, coerce, load_dataclass
from pvt_dist.data import DataConfig


@dataclass
class ModelConfig:
    name: str = "pvt_small"
    """Registered variant (``pvt_tiny/small/medium/large``, ``pvt_v2_b0..b5``, ``pvt_v2_b2_li``)."""
    num_classes: int | None = None
    """Classifier outputs; None takes ``data.num_classes``."""
    img_size: int | None = None
    """Input resolution the position embeddings are built for; None takes ``data.train_size``."""
    drop_path_rate: float | None = None
    """Stochastic depth rate; None keeps the variant's paper value (0.1 or 0.3)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    compile: bool = False
    """torch.compile the model once the DeepSpeed engine is built (``engine.compile()``): fuses the
    norms, activations and layout changes between GEMMs on GPU; the first steps pay the compile time."""
    pretrained: str | None = None
    """Weights to start from (authors' .pth or ``pvt_dist.export`` output); ignored when resuming."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate for a global batch of ``lr_ref_batch`` (scaled linearly, see ``scale_lr``)."""
    scale_lr: bool = True
    """Peak lr = ``lr`` x global_batch / ``lr_ref_batch`` (the authors' rule) when true, else ``lr`` as is."""
    lr_ref_batch: int = 512
    """Reference batch of the linear lr scaling rule."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay; 1-D parameters and ``model.no_weight_decay()`` get none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    impl: Literal["auto", "torch", "fused"] = "auto"
    """``fused`` = DeepSpeed FusedAdam (GPU, JIT-compiled), ``torch`` = torch.optim.AdamW; auto: by device."""


@dataclass
class ScheduleConfig:
    epochs: float = 300
    """Training length in epochs of ``steps_per_epoch`` optimizer steps (``total_steps`` overrides it)."""
    total_steps: int | None = None
    """Training length in optimizer steps; overrides ``epochs``."""
    steps_per_epoch: int | None = None
    """Explicit epoch length in optimizer steps; None = one pass over the training shards."""
    warmup_epochs: float = 5
    """Linear warmup length in epochs (ignored if ``warmup_steps`` is set)."""
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps; overrides ``warmup_epochs``."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0 of the warmup."""
    min_lr: float = 1e-5
    """Floor of the cosine decay."""


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 2
    """ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision; fp16 uses dynamic loss scaling and needs a GPU."""
    cpu_bf16_math: Literal["auto", "fp32", "native"] = "auto"
    """bf16 on CPU: "fp32" runs matmuls/convs in fp32 on the bf16 tensors (bf16 storage, fp32 math; see
    pvt_dist/engine/cpu_bf16.py), "native" uses PyTorch's bf16 kernels, "auto" = fp32 unless the CPU has
    fast bf16 kernels (AVX512-BF16/AMX). No effect on GPU."""
    global_batch: int | None = None
    """Images per optimizer step over all ranks = micro_batch x grad_accum x world size. None = derived."""
    micro_batch: int | None = None
    """Images per rank per forward pass. None = derived."""
    grad_accum: int | None = None
    """Micro batches accumulated per optimizer step. None = derived (1 if it cannot be)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None = no clipping."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO-Offload of optimizer states and step to CPU (stage >= 1; uses DeepSpeedCPUAdam)."""
    initial_scale_power: int = 16
    """fp16: the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale doubles."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale is lowered."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never drops below this."""
    config_file: str | None = None
    """A user's DeepSpeed JSON; its entries win over the generated ones (``--deepspeed_config``)."""


@dataclass
class EvalConfig:
    every_steps: int | None = None
    """Validate every N optimizer steps; None = at every epoch end."""
    at_end: bool = True
    """Validate after the last step."""


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    """Save every N optimizer steps; None = at every epoch end. Always saved at the end."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: bool = True
    """Resume from ``RUN_DIR/checkpoints/latest`` when it exists."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights, validated and saved alongside."""
    decay: float = 0.9998
    """EMA decay per optimizer step."""


@dataclass
class LoggingConfig:
    log_every: int = 50
    """Console line and TensorBoard scalars every N optimizer steps."""
    sync_every: int | None = None
    """Steps between host reads of the all-reduced losses and the preemption flag (the loop's only
    device-to-host syncs; also at every log, eval and checkpoint step). A GPU then queues steps ahead and a
    NaN loss or a stop signal is acted on up to N steps later; per-step losses are still all recorded.
    None: 1 on CPU (execution is synchronous there anyway), log_every on GPU."""
    tensorboard: bool = True
    """Write TensorBoard events to ``RUN_DIR/tensorboard`` (rank 0 only)."""
    deepspeed_log_level: Literal["debug", "info", "warning", "error"] = "warning"
    """Verbosity of DeepSpeed's own logger."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device that ``perf/mfu`` divides by (989 = H100/H200 dense bf16); None measures a
    short matmul in the training GEMM dtype at start (an achievable peak, so MFU reads higher)."""
    profile_steps: list[int] | None = None
    """``[a, b]``: trace optimizer steps a..b (1-based, inclusive) with torch.profiler into
    ``RUN_DIR/profile/`` (Chrome/TensorBoard trace per rank; on GPU also a CUDA memory snapshot)."""


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend; auto = nccl on GPU, gloo on CPU."""
    timeout_s: float = 1800.0
    """Collective timeout: a dead or hung peer fails the others after this many seconds."""
    master_port: int = 29500
    """Rendezvous port when the launcher does not set MASTER_PORT (srun); the job id is added."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints, TensorBoard events, metrics.jsonl (resumed if present)."""
    seed: int = 0
    """Base seed: model init uses it on every rank, then rank r reseeds with seed + 1000 r (drop path,
    Mixup); the data order is a function of (seed, epoch, rank)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = TrainConfig
) -> Any:
    """Defaults, then the YAML file (with ``_base_`` includes), then ``key=value`` overrides.

    ``cls`` is the root dataclass: ``TrainConfig`` for stage 1, the detector's config for stage 2.
    """
    return load_dataclass(cls, path, overrides)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def resolve_batch(ds: DeepSpeedOptions, world_size: int) -> tuple[int, int, int]:
    """(global, micro, accum) with global == micro x accum x world_size; the missing ones are derived."""
    g, m, a = ds.global_batch, ds.micro_batch, ds.grad_accum
    for name, v in (("global_batch", g), ("micro_batch", m), ("grad_accum", a)):
        _check(v is None or v > 0, f"deepspeed.{name}: must be positive, got {v}")
    if m is None and g is None:
        raise ConfigError("deepspeed.micro_batch: set micro_batch or global_batch (both are null)")
    if m is None:
        a = a or 1
        _check(
            g % (a * world_size) == 0,
            f"deepspeed.global_batch: {g} is not divisible by grad_accum {a} x world size {world_size}",
        )
        m = g // (a * world_size)
    elif g is None:
        a = a or 1
        g = m * a * world_size
    elif a is None:
        _check(
            g % (m * world_size) == 0,
            f"deepspeed.global_batch: {g} is not divisible by micro_batch {m} x world size {world_size}",
        )
        a = g // (m * world_size)
    _check(
        g == m * a * world_size,
        f"deepspeed.global_batch: {g} != micro_batch {m} x grad_accum {a} x world size {world_size} "
        f"(= {m * a * world_size}); set one of them to null to derive it",
    )
    return g, m, a


def _merge_user_deepspeed_json(cfg: TrainConfig) -> None:
    """Batch, stage and precision in a user's DeepSpeed JSON take part in the same consistency checks."""
    path = cfg.deepspeed.config_file
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed.config_file: file not found: {path}")
    try:
        with open(path) as f:
            user = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON: {e}") from e
    ds = cfg.deepspeed
    for json_key, attr in (
        ("train_batch_size", "global_batch"),
        ("train_micro_batch_size_per_gpu", "micro_batch"),
        ("gradient_accumulation_steps", "grad_accum"),
    ):
        if json_key in user:
            setattr(ds, attr, coerce(user[json_key], int, f"deepspeed.config_file:{json_key}"))
    if "zero_optimization" in user and "stage" in user["zero_optimization"]:
        ds.zero_stage = coerce(
            user["zero_optimization"]["stage"], int, "deepspeed.config_file:zero_optimization"
        )
    for prec in ("bf16", "fp16"):
        if user.get(prec, {}).get("enabled", False):
            ds.precision = prec
    if "gradient_clipping" in user:
        clip = float(user["gradient_clipping"])
        ds.grad_clip = clip if clip > 0 else None


def _check_shards(data: DataConfig) -> None:
    """Local shard specs must name existing shards with index files; remote ones are checked on first read."""
    from pvt_dist.data.config import is_remote
    from pvt_dist.data.index import resolve_shards

    for split in ("train", "val"):
        key = f"data.{split}_shards"
        spec = getattr(data, f"{split}_shards")
        if not spec:
            raise ConfigError(f"{key}: required (a shard directory, pattern or URL)")
        if is_remote(spec):
            continue
        try:
            resolve_shards(spec, key, split, getattr(data, f"{split}_samples"), check=False)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e) if str(e).startswith(key) else f"{key}: {e}") from e


def check_logging(lg: LoggingConfig) -> None:
    """The ``logging`` section, shared by both stages."""
    _check(lg.log_every > 0, f"logging.log_every: must be positive, got {lg.log_every}")
    _check(
        lg.sync_every is None or lg.sync_every > 0,
        f"logging.sync_every: must be positive or null, got {lg.sync_every}",
    )
    _check(
        lg.peak_tflops is None or lg.peak_tflops > 0,
        f"logging.peak_tflops: must be positive or null, got {lg.peak_tflops}",
    )
    p = lg.profile_steps
    _check(
        p is None or (len(p) == 2 and all(isinstance(v, int) for v in p) and 1 <= p[0] <= p[1]),
        f"logging.profile_steps: must be null or [first, last] steps with 1 <= first <= last, got {p}",
    )


def resolve_config(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Fill derived values (batch triple, classes, image size) and reject impossible combinations."""
    cfg = copy.deepcopy(cfg)
    _merge_user_deepspeed_json(cfg)
    try:
        cfg.data.validate()
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("data.") else f"data: {e}") from e
    _check_shards(cfg.data)
    ds = cfg.deepspeed
    _check(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage}")
    ds.global_batch, ds.micro_batch, ds.grad_accum = resolve_batch(ds, world_size)
    _check(
        ds.grad_clip is None or ds.grad_clip > 0,
        f"deepspeed.grad_clip: must be > 0 or null, got {ds.grad_clip}",
    )
    _check(
        ds.offload_optimizer == "none" or ds.zero_stage >= 1,
        "deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1",
    )
    _check(
        ds.initial_scale_power >= 0,
        f"deepspeed.initial_scale_power: must be >= 0, got {ds.initial_scale_power}",
    )
    _check(ds.loss_scale_window > 0, f"deepspeed.loss_scale_window: must be > 0, got {ds.loss_scale_window}")

    from pvt_dist.models import list_models

    m = cfg.model
    _check(
        m.name in list_models(), f"model.name: unknown model {m.name!r}; valid: {', '.join(list_models())}"
    )
    m.num_classes = m.num_classes if m.num_classes is not None else cfg.data.num_classes
    _check(m.num_classes > 0, f"model.num_classes: must be positive, got {m.num_classes}")
    _check(
        m.num_classes == cfg.data.num_classes,
        f"model.num_classes: {m.num_classes} != data.num_classes {cfg.data.num_classes}",
    )
    m.img_size = m.img_size if m.img_size is not None else cfg.data.train_size
    _check(
        m.img_size > 0 and m.img_size % 32 == 0,
        f"model.img_size: must be a positive multiple of 32, got {m.img_size}",
    )
    _check(
        m.drop_path_rate is None or 0 <= m.drop_path_rate < 1,
        f"model.drop_path_rate: must be in [0, 1), got {m.drop_path_rate}",
    )
    _check(
        m.pretrained is None or os.path.isfile(m.pretrained),
        f"model.pretrained: file not found: {m.pretrained}",
    )

    o = cfg.optim
    _check(o.lr > 0, f"optim.lr: must be positive, got {o.lr}")
    _check(o.lr_ref_batch > 0, f"optim.lr_ref_batch: must be positive, got {o.lr_ref_batch}")
    _check(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    _check(all(0 <= b < 1 for b in o.betas), f"optim.betas: each must be in [0, 1), got {list(o.betas)}")
    _check(o.eps > 0, f"optim.eps: must be positive, got {o.eps}")

    s = cfg.schedule
    _check(s.epochs > 0, f"schedule.epochs: must be positive, got {s.epochs}")
    _check(
        s.total_steps is None or s.total_steps > 0,
        f"schedule.total_steps: must be positive, got {s.total_steps}",
    )
    _check(
        s.steps_per_epoch is None or s.steps_per_epoch > 0,
        f"schedule.steps_per_epoch: must be positive, got {s.steps_per_epoch}",
    )
    _check(s.warmup_epochs >= 0, f"schedule.warmup_epochs: must be >= 0, got {s.warmup_epochs}")
    _check(
        s.warmup_steps is None or s.warmup_steps >= 0,
        f"schedule.warmup_steps: must be >= 0, got {s.warmup_steps}",
    )
    _check(s.warmup_lr >= 0, f"schedule.warmup_lr: must be >= 0, got {s.warmup_lr}")
    _check(s.min_lr >= 0, f"schedule.min_lr: must be >= 0, got {s.min_lr}")
    _check(s.min_lr <= peak_lr(cfg), f"schedule.min_lr: {s.min_lr} exceeds the peak lr {peak_lr(cfg)}")

    _check(
        cfg.eval.every_steps is None or cfg.eval.every_steps > 0, "eval.every_steps: must be positive or null"
    )
    c = cfg.checkpoint
    _check(c.every_steps is None or c.every_steps > 0, "checkpoint.every_steps: must be positive or null")
    _check(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    _check(0 < cfg.ema.decay < 1, f"ema.decay: must be in (0, 1), got {cfg.ema.decay}")
    _check(
        not (cfg.ema.enabled and ds.zero_stage == 3),
        "ema.enabled: not supported with deepspeed.zero_stage 3 (parameters are partitioned); use stage 0-2",
    )
    check_logging(cfg.logging)
    _check(cfg.dist.timeout_s > 0, f"dist.timeout_s: must be positive, got {cfg.dist.timeout_s}")
    import torch

    _check(
        cfg.dist.backend != "nccl" or torch.cuda.is_available(),
        "dist.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPU",
    )
    _check(0 < cfg.dist.master_port < 65536, f"dist.master_port: not a port number: {cfg.dist.master_port}")
    _check(bool(cfg.run_dir), "run_dir: must not be empty")
    return cfg


def peak_lr(cfg: TrainConfig) -> float:
    """The authors' rule: lr x global batch / 512 (needs a resolved global batch)."""
    o = cfg.optim
    if not o.scale_lr:
        return o.lr
    return o.lr * (cfg.deepspeed.global_batch or o.lr_ref_batch) / o.lr_ref_batch
