"""The run plan: what a launch will do at a given world size, computed from the config alone.

    plan = build_plan(cfg, world_size=128, stage="pretrain")   # no process group, no data, no GPU
    print(plan.format())

``launch/train.py --plan --world-size N`` and ``launch/finetune_detr.py --plan ...`` print it and exit; every
real launch builds the same plan before its process group starts (so a schedule that cannot work exits 2
naming the key, in seconds), rank 0 prints its first line, and the trainer writes that line at the top of
``run_dir/config.yaml``.

The plan holds the batch triple (micro x accum x world = global), the peak lr and the rule that gave it,
steps per epoch (from the shards' manifest/index files, or the COCO annotation file, when readable; else
from the config's nominal data set size), total / warmup steps, eval and checkpoint cadence, per-rank bytes
of parameters, gradients and optimizer states under the ZeRO stage (``zero_state_bytes``, the arithmetic
``bench/zero_memory.py`` checks against the engine), and the size of one checkpoint on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pvt_dist.config import ConfigError, peak_lr

MiB = 2**20

# Bytes per parameter (Rajbhandari et al.): 16-bit weights and gradients with fp32 master weights and Adam
# moments; fp32 training keeps no separate master copy.
STATE_BYTES = {"bf16": (2, 2, 4, 8), "fp16": (2, 2, 4, 8), "fp32": (4, 4, 0, 8)}
STATE_NAMES = ("params", "grads", "master", "adam")


def zero_state_bytes(n_params: int, precision: str, stage: int, world: int) -> dict[str, float]:
    """Per-rank bytes of weights, gradients, fp32 master weights and Adam moments under ZeRO ``stage``.

    Stage 1 partitions the optimizer states (master + Adam) over the ranks, stage 2 the gradients too,
    stage 3 the weights too.
    """
    p, g, master, adam = STATE_BYTES[precision]
    return {
        "params": n_params * p / (world if stage >= 3 else 1),
        "grads": n_params * g / (world if stage >= 2 else 1),
        "master": n_params * master / (world if stage >= 1 else 1),
        "adam": n_params * adam / (world if stage >= 1 else 1),
    }


def checkpoint_bytes(n_params: int, precision: str, ema: bool = False) -> int:
    """Bytes of one checkpoint over all ranks' files: the weights in the training precision, the fp32 master
    weights (16-bit training) and both Adam moments, plus an fp32 EMA copy. RNG/data states are negligible."""
    p, _, master, adam = STATE_BYTES[precision]
    return n_params * (p + master + adam + (4 if ema else 0))


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.1f} MiB"


def _nodes_from_env(world: int) -> int | None:
    """Nodes of this job when the launcher says (Slurm, torchrun's LOCAL_WORLD_SIZE)."""
    env = os.environ
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key, "").isdigit() and "SLURM_PROCID" in env:
            return int(env[key])
    local = env.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0 and world % int(local) == 0:
        return world // int(local)
    return None


def world_line(world: int, nodes: int | None) -> str:
    if nodes and world % nodes == 0:
        return f"world {world} = {nodes} node{'s' if nodes > 1 else ''} x {world // nodes}"
    return f"world {world}"


def lr_rule(cfg) -> str:
    """Peak learning rate(s) and the rule that gave them (stage 1 scales with the batch, DETR does not)."""
    o = cfg.optim
    if hasattr(o, "backbone_lr"):
        return (
            f"lr {o.lr:g}, backbone {o.backbone_lr:g} (optim.lr, optim.backbone_lr as set; DETR: no scaling)"
        )
    if not o.scale_lr:
        return f"peak lr {peak_lr(cfg):g} (optim.lr as set; optim.scale_lr false)"
    return (
        f"peak lr {peak_lr(cfg):g} = optim.lr {o.lr:g} x global {cfg.deepspeed.global_batch} / "
        f"{o.lr_ref_batch} (linear scaling)"
    )


def summary_line(cfg, world: int, nodes: int | None = None) -> str:
    """One line: world, micro x accum x world = global, peak lr with its rule (needs a resolved config)."""
    nodes = nodes if nodes is not None else _nodes_from_env(world)
    ds = cfg.deepspeed
    return (
        f"plan: {world_line(world, nodes)} | batch {ds.micro_batch} x {ds.grad_accum} x {world} = "
        f"{ds.global_batch} (micro x accum x world) | {lr_rule(cfg)}"
    )


@dataclass
class RunPlan:
    """The numbers ``format()`` prints; ``notes`` says where estimates come from."""

    summary: str
    model: str
    n_params: int
    train_samples: int
    samples_source: str
    steps_per_epoch: int
    total_steps: int
    schedule: str
    eval_every: int
    checkpoint_every: int
    keep_last: int
    zero_stage: int
    precision: str
    offload: bool
    state_bytes: dict[str, float]
    checkpoint_bytes: int
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        b = self.state_bytes
        where = " (master + Adam in host memory: ZeRO-Offload)" if self.offload else ""
        mem = ", ".join(f"{k} {_fmt_bytes(b[k])}" for k in STATE_NAMES)
        lines = [
            self.summary,
            f"  model {self.model}: {self.n_params:,} parameters",
            f"  data: {self.train_samples:,} training samples ({self.samples_source})",
            f"  schedule: {self.total_steps:,} steps, {self.steps_per_epoch:,} per epoch; {self.schedule}",
            f"  eval every {self.eval_every:,} steps; checkpoint every {self.checkpoint_every:,} steps "
            f"(and at the end), {self.keep_last} kept",
            f"  memory per rank, ZeRO-{self.zero_stage} {self.precision}: {mem} = "
            f"{_fmt_bytes(sum(b.values()))}{where} (+ activations, buffers)",
            f"  checkpoint on disk: {_fmt_bytes(self.checkpoint_bytes)} each, "
            f"{_fmt_bytes(self.checkpoint_bytes * self.keep_last)} for {self.keep_last} kept",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def count_params_on_meta(build) -> int:
    """Parameters of ``build()`` constructed on the meta device (no memory, no init cost)."""
    import torch

    from pvt_dist.models.summary import count_params

    with torch.device("meta"):
        return count_params(build())


def _train_samples_pretrain(cfg, strict: bool) -> tuple[int, str]:
    """Training samples from the shards' manifest/index files; else ``data.nominal_train_samples``."""
    from pvt_dist.data.index import resolve_shards

    d = cfg.data
    try:
        shards = resolve_shards(d.train_shards, "data.train_shards", "train", d.train_samples, check=False)
        return shards.num_samples, f"counted in {d.train_shards}"
    except (OSError, ValueError) as e:
        if strict or d.nominal_train_samples is None:
            msg = str(e) if str(e).startswith("data.") else f"data.train_shards: {e}"
            hint = "" if strict else "; set data.nominal_train_samples to plan without the data"
            raise ConfigError(msg + hint) from e
        return d.nominal_train_samples, (
            f"data.nominal_train_samples: {d.train_shards!r} is not readable here, so the recipe's data set "
            "size is assumed"
        )


def _train_images_detr(cfg, strict: bool) -> tuple[int, str]:
    """Training images from the COCO annotation file; else ``data.nominal_train_images``."""
    from pvt_dist.detection.targets import CocoAnnotations

    d = cfg.data
    if strict or os.path.isfile(d.train_ann) or d.nominal_train_images is None:
        try:
            return len(CocoAnnotations(d.train_ann, d.train_images)), f"counted in {d.train_ann}"
        except (OSError, ValueError) as e:
            hint = "" if strict else "; set data.nominal_train_images to plan without the data"
            raise ConfigError(f"data.train_ann: {e}{hint}") from e
    return d.nominal_train_images, (
        f"data.nominal_train_images: {d.train_ann!r} is not readable here, so the recipe's data set size is "
        "assumed"
    )


def build_plan(cfg, world_size: int, stage: str, nodes: int | None = None, strict: bool = True) -> RunPlan:
    """The plan of a resolved config at ``world_size`` ranks; ``stage`` is ``pretrain`` or ``detr``.

    ``strict`` (a real launch): the data must be countable. Otherwise (``--plan``) unreadable data falls back
    to the config's nominal size and the plan says so. Raises ConfigError naming the key (e.g. a warmup
    that is not shorter than the run), exactly where a launch would fail later.
    """
    ds = cfg.deepspeed
    notes = []
    if stage == "pretrain":
        from pvt_dist.engine.optim import resolve_schedule
        from pvt_dist.models import build_model

        n, source = _train_samples_pretrain(cfg, strict)
        spe, total, warmup = resolve_schedule(cfg, n, world_size)
        s = cfg.schedule
        schedule = (
            f"warmup {warmup:,} steps from {s.warmup_lr:g}, then cosine to {s.min_lr:g} "
            f"({total / spe:g} epochs)"
        )
        m = cfg.model
        kwargs = dict(num_classes=m.num_classes, img_size=m.img_size)
        if m.drop_path_rate is not None:
            kwargs["drop_path_rate"] = m.drop_path_rate
        n_params = count_params_on_meta(lambda: build_model(m.name, **kwargs))
        model, ema = m.name, cfg.ema.enabled
        if cfg.data.repeated_aug > 1:
            notes.append(
                f"repeated augmentation x{cfg.data.repeated_aug}: each rank reads "
                f"ceil({ds.micro_batch} / {cfg.data.repeated_aug}) images per micro batch; an epoch keeps "
                "its length in steps"
            )
    elif stage == "detr":
        import dataclasses

        from pvt_dist.detection.config import resolve_detr_schedule
        from pvt_dist.detection.detr import build_detr

        n, source = _train_images_detr(cfg, strict)
        spe, total, drop = resolve_detr_schedule(cfg, n, world_size)
        schedule = f"lr x{cfg.schedule.lr_drop_factor:g} from step {drop:,} ({total / spe:g} epochs)"
        backbone = dataclasses.replace(cfg.model.backbone, pretrained=None)
        model_cfg = dataclasses.replace(cfg.model, backbone=backbone)
        n_params = count_params_on_meta(lambda: build_detr(model_cfg))
        model, ema = f"DETR on {cfg.model.backbone.name}", False
        if cfg.model.backbone.pretrained and not os.path.isfile(cfg.model.backbone.pretrained):
            notes.append(f"model.backbone.pretrained {cfg.model.backbone.pretrained} does not exist here")
    else:
        raise ValueError(f"stage must be 'pretrain' or 'detr', got {stage!r}")
    if ds.micro_batch < 2 <= ds.global_batch:
        notes.append("1 image per rank per micro batch: throughput per GPU is lowest; fine for the schedule")
    if ds.config_file:
        notes.append(f"entries of {ds.config_file} win over the generated DeepSpeed config")
    return RunPlan(
        summary=summary_line(cfg, world_size, nodes),
        model=model,
        n_params=n_params,
        train_samples=n,
        samples_source=source,
        steps_per_epoch=spe,
        total_steps=total,
        schedule=schedule,
        eval_every=cfg.eval.every_steps or spe,
        checkpoint_every=cfg.checkpoint.every_steps or spe,
        keep_last=cfg.checkpoint.keep_last,
        zero_stage=ds.zero_stage,
        precision=ds.precision,
        offload=ds.offload_optimizer == "cpu",
        state_bytes=zero_state_bytes(n_params, ds.precision, ds.zero_stage, world_size),
        checkpoint_bytes=checkpoint_bytes(n_params, ds.precision, ema),
        notes=notes,
    )
