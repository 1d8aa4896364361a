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
    impl: Literal["auto", "torch", "torch_fused", "fused"] = "auto"
    """AdamW implementation: ``torch`` = torch.optim.AdamW (foreach), ``torch_fused`` = the same with
    ``fused=True`` (one kernel per step, GPU or CPU, nothing to compile), ``fused`` = DeepSpeed FusedAdam
    (GPU only, JIT-built with an nvcc matching torch's CUDA). auto: torch_fused on GPU, torch on CPU.
    ZeRO-Offload (``deepspeed.offload_optimizer: cpu``) always uses DeepSpeedCPUAdam."""


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
    """Images per optimizer step over all ranks = micro_batch x grad_accum x world size: the recipe's
    number, kept at every world size (the lr rule reads it). None = micro_batch x grad_accum x world."""
    micro_batch: int | None = None
    """Upper bound of the images per rank per forward pass (memory): with a global batch, the largest
    micro batch <= this that divides global / world is used. None = no cap (global / (accum x world))."""
    grad_accum: int | None = None
    """Micro batches accumulated per optimizer step. None = derived: global / (micro x world), the fewest
    that keep the micro batch under its cap (1 without a global batch). Set = honoured as given."""
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
    reduce_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype gradients are all-reduced / reduce-scattered in (DeepSpeed ``communication_data_type``).
    auto: fp32 under bf16 (as FSDP2 reduces bf16 gradients: bf16 sums over many ranks lose bits), the
    training dtype otherwise. fp32 or the training dtype only."""
    grad_accum_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype 16-bit gradients are accumulated in over ``grad_accum`` micro batches (DeepSpeed
    ``data_types.grad_accum_dtype``). auto: fp32 when grad_accum > 1 at ZeRO-2 (fp16: ZeRO-1/2), else the
    training dtype. DeepSpeed 0.19 refuses fp32 at stage 0 and ignores it at stage 3; under bf16 at stage 1
    it switches to its BF16_Optimizer, whose checkpoints zero_to_fp32 cannot read (so not there)."""
    overlap_comm: bool | None = None
    """Overlap ZeRO-1/2 gradient reduction with backward (DeepSpeed ``overlap_comm``), bucket by bucket.
    None: on with a GPU, off on CPU (gloo on shared cores has no idle time to overlap into)."""
    reduce_bucket_size: int = 25_000_000
    """ZeRO-1/2 gradient elements per reduction bucket (DeepSpeed's default is 5e8, more than a whole
    PVT-Large: nothing would overlap). 2.5e7 = 50 MB in bf16, about 3 buckets for PVT-Large."""
    allgather_bucket_size: int = 25_000_000
    """ZeRO-1/2 parameter elements per all-gather bucket after the step."""
    tf32: bool = True
    """TF32 tensor-core math for fp32 matmuls/convolutions (EMA validation, fp32 configs) on Ampere or
    newer GPUs: ``torch.set_float32_matmul_precision("high")`` + cudnn.allow_tf32. No effect on CPU."""
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
    """Resume from ``RUN_DIR/checkpoints/latest`` when it exists; on another world size or ZeRO stage too
    (converted once to DeepSpeed's universal format, next to the original)."""
    allow_global_batch_change: bool = False
    """Let a resume change the global batch the checkpoint was trained with (the peak lr then follows
    ``optim.scale_lr``). Off: such a resume is refused; set ``deepspeed.global_batch`` to keep it."""


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
    NaN loss is acted on up to N steps later (a stop signal within ``preemption.check_every_s``); per-step
    losses are still all recorded.
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
class PreemptionConfig:
    check_every_s: float = 5.0
    """Longest wall-clock time between two agreements of the ranks on a stop signal (preemption,
    time limit, scancel), whatever ``logging.sync_every`` is: a signal is acted on within this many
    seconds plus one step. The agreement rides on the loop's per-step all-reduce, so it costs no extra
    collective."""


@dataclass
class LeaseConfig:
    heartbeat_s: float = 30.0
    """Seconds between heartbeats of the run directory's lease (``RUN_DIR/.lease``, one job per run
    directory; pvt_dist/cluster/lease.py)."""
    stale_after: float = 10.0
    """A lease whose heartbeat is older than this many intervals belongs to a dead job and is taken over
    (the default: 5 minutes). Node clocks must agree to well under heartbeat_s x stale_after."""


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
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)


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


def _largest_micro(per_rank: int, cap: int) -> int:
    """Largest micro batch <= cap that divides the per-rank batch (1 always does)."""
    return next(m for m in range(min(cap, per_rank), 0, -1) if per_rank % m == 0)


def resolve_batch(ds: DeepSpeedOptions, world_size: int) -> tuple[int, int, int]:
    """(global, micro, accum) with global == micro x accum x world_size.

    Precedence: ``global_batch`` is the recipe's number and is kept at every world size; ``micro_batch`` is
    an upper bound per rank (memory), and ``grad_accum`` makes up the rest: with accum null the largest
    micro batch <= the cap that divides global / world is taken. An explicit ``grad_accum`` is honoured
    (micro = global / (accum x world), which must not exceed the cap). Without a global batch it is
    ``micro x accum x world``. Only the impossible is refused (e.g. a global batch that the world size
    does not divide); the message names the key and says what would work.
    """
    g, m, a = ds.global_batch, ds.micro_batch, ds.grad_accum
    for name, v in (("global_batch", g), ("micro_batch", m), ("grad_accum", a)):
        _check(v is None or v > 0, f"deepspeed.{name}: must be positive, got {v}")
    if m is None and g is None:
        raise ConfigError("deepspeed.micro_batch: set micro_batch or global_batch (both are null)")
    if g is None:
        a = a or 1
        return m * a * world_size, m, a
    if g < world_size or g % world_size:
        fits = [d for d in range(1, g + 1) if g % d == 0 and d <= 2 * world_size][-3:]
        lo, hi = g // world_size * world_size, -(-g // world_size) * world_size
        raise ConfigError(
            f"deepspeed.global_batch: {g} cannot be split over world size {world_size} (every rank needs "
            f"the same whole number of images per step); world sizes that divide it: "
            f"{', '.join(map(str, fits))}; or a global batch of {' or '.join(str(v) for v in (lo, hi) if v)}"
        )
    per_rank = g // world_size
    if a is None:
        micro = per_rank if m is None else _largest_micro(per_rank, m)
        return g, micro, per_rank // micro
    if per_rank % a or (m is not None and per_rank // a > m):
        ok = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and (m is None or per_rank // d <= m)]
        raise ConfigError(
            f"deepspeed.global_batch: {g} != micro_batch {m} x grad_accum {a} x world size {world_size} "
            f"(the per-rank batch {per_rank} needs a micro batch of {per_rank / a:g}"
            + ("" if m is None else f", cap {m}")
            + f"); set deepspeed.grad_accum to null to derive it, or to one of {', '.join(map(str, ok[:6]))}"
        )
    return g, per_rank // a, a


def fp32_accum_supported(ds: DeepSpeedOptions) -> bool:
    """Stages where DeepSpeed 0.19 accumulates 16-bit gradients in fp32 with checkpoints we can export."""
    return ds.zero_stage == 2 or (ds.zero_stage == 1 and ds.precision == "fp16")


def check_gpu_options(ds: DeepSpeedOptions) -> None:
    """Reduction / accumulation dtypes and bucket sizes: values DeepSpeed 0.19 really applies."""
    for key in ("reduce_dtype", "grad_accum_dtype"):
        value = getattr(ds, key)
        _check(
            value in ("auto", "fp32", ds.precision),
            f"deepspeed.{key}: {value} under precision {ds.precision}; use auto, fp32 or {ds.precision}",
        )
    _check(
        ds.grad_accum_dtype != "fp32" or ds.precision == "fp32" or fp32_accum_supported(ds),
        f"deepspeed.grad_accum_dtype: fp32 accumulation of {ds.precision} gradients needs zero_stage 2"
        f"{' (or 1)' if ds.precision == 'fp16' else ''}, got stage {ds.zero_stage}: DeepSpeed refuses it at "
        "stage 0, ignores it at stage 3, and under bf16 at stage 1 switches to its BF16_Optimizer, whose "
        "checkpoints zero_to_fp32 (pvt_dist.export) cannot read",
    )
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        _check(
            getattr(ds, key) > 0, f"deepspeed.{key}: must be a positive element count, got {getattr(ds, key)}"
        )


def _merge_user_deepspeed_json(cfg: TrainConfig) -> int | None:
    """Batch, stage and precision in a user's DeepSpeed JSON take part in the same consistency checks.

    Returns the JSON's ``train_micro_batch_size_per_gpu``: the JSON wins over the generated config, so
    that micro batch is exact (not a cap) and the resolved batch must use it as is.
    """
    path = cfg.deepspeed.config_file
    if path is None:
        return None
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
    return ds.micro_batch if "train_micro_batch_size_per_gpu" in user else None


def check_cluster_sections(cfg) -> None:
    """The ``preemption`` and ``lease`` sections, shared by both stages' configs."""
    p, lease = cfg.preemption, cfg.lease
    _check(p.check_every_s > 0, f"preemption.check_every_s: must be positive, got {p.check_every_s}")
    _check(lease.heartbeat_s > 0, f"lease.heartbeat_s: must be positive, got {lease.heartbeat_s}")
    _check(lease.stale_after >= 2, f"lease.stale_after: must be >= 2, got {lease.stale_after}")


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


def resolve_config(cfg: TrainConfig, world_size: int, check_files: bool = True) -> TrainConfig:
    """Fill derived values (batch triple, classes, image size) and reject impossible combinations.

    ``check_files=False`` (``--plan``) skips the checks that need the data and the pretrained weights on
    this machine (the shards and ``model.pretrained`` exist); everything else is checked the same.
    """
    cfg = copy.deepcopy(cfg)
    json_micro = _merge_user_deepspeed_json(cfg)
    try:
        cfg.data.validate()
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("data.") else f"data: {e}") from e
    if check_files:
        _check_shards(cfg.data)
    ds = cfg.deepspeed
    _check(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage}")
    ds.global_batch, ds.micro_batch, ds.grad_accum = resolve_batch(ds, world_size)
    _check(
        json_micro is None or ds.micro_batch == json_micro,
        f"deepspeed.global_batch: {ds.global_batch} is not train_micro_batch_size_per_gpu {json_micro} "
        f"(exact, from {ds.config_file}) x a whole grad_accum x world size {world_size}",
    )
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
    check_gpu_options(ds)

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
        m.pretrained is None or not check_files or os.path.isfile(m.pretrained),
        f"model.pretrained: file not found: {m.pretrained}",
    )

    o = cfg.optim
    _check(o.lr > 0, f"optim.lr: must be positive, got {o.lr}")
    _check(o.lr_ref_batch > 0, f"optim.lr_ref_batch: must be positive, got {o.lr_ref_batch}")
    _check(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    _check(all(0 <= b < 1 for b in o.betas), f"optim.betas: each must be in [0, 1), got {list(o.betas)}")
    _check(o.eps > 0, f"optim.eps: must be positive, got {o.eps}")
    _check(
        o.impl in ("auto", "torch") or ds.offload_optimizer == "none",
        f"optim.impl: {o.impl} cannot step offloaded optimizer states; deepspeed.offload_optimizer: cpu "
        "uses DeepSpeedCPUAdam (set optim.impl: auto)",
    )

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
    check_cluster_sections(cfg)
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
