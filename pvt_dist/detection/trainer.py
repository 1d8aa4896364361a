"""DETR fine-tuning on the stage-1 DeepSpeed engine.

``DetrTrainer`` reuses stage 1's ``Trainer`` loop unchanged (step boundaries, preemption stop, global loss
all-reduce with the non-finite verdict, checkpoint/eval cadence, console and TensorBoard logging,
``CheckpointManager`` saves and exact resume through ``DataStream``). It swaps in the detection pieces:
the DETR model with two learning rates (backbone / rest), the set criterion, the COCO data loaders, a
step-decay schedule and COCO evaluation with drawn boxes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import torch

from pvt_dist.cluster import distributed as pdist
from pvt_dist.cluster.distributed import DistEnv
from pvt_dist.engine.cpu_bf16 import fp32_gemm
from pvt_dist.engine.ds_config import build_deepspeed_config
from pvt_dist.engine.resume import seed_all
from pvt_dist.engine.trainer import Trainer

from .config import DetrTrainConfig, resolve_detr_schedule
from .criterion import build_criterion
from .data import build_detection_loader
from .detector import build_detector, num_decoder_layers
from .draw import denormalize, draw_detections
from .evaluate import evaluate_coco
from .export import save_detector

log = logging.getLogger("pvt_dist.detr")


class StepDecay:
    """Each group's base lr times ``factor`` from ``drop_step`` on: a pure function of the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, drop_step: int, factor: float):
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.drop_step, self.factor = drop_step, factor

    def lr_at(self, step: int) -> list[float]:
        scale = self.factor if step >= self.drop_step else 1.0
        return [lr * scale for lr in self.base_lrs]

    def step_update(self, step: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(step)):
            group["lr"] = lr


def build_detection_optimizer(model: torch.nn.Module, o, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model's ``param_groups()``: ``rest`` at lr, ``backbone`` at backbone_lr and (deformable
    head) ``linear_proj`` at lr * linear_proj_lr_mult. Empty groups (a frozen backbone) are left out."""
    lrs = {"rest": o.lr, "backbone": o.backbone_lr, "linear_proj": o.lr * o.linear_proj_lr_mult}
    groups = model.param_groups()
    # "rest" first: the engine's logged lr is group 0's.
    param_groups = [
        {"params": [p for _, p in groups[name]], "lr": lrs[name], "name": name}
        for name in ("rest", "backbone", "linear_proj")
        if groups.get(name)
    ]
    # fused=True on GPU: one CUDA kernel per step, shipped with torch (nothing to JIT-compile).
    return torch.optim.AdamW(
        param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        fused=device.type == "cuda" or None,
    )  # fmt: skip


class DetrTrainer(Trainer):
    """``DetrTrainer(cfg, env, device, preemption).train()`` -> result dict with the COCO APs."""

    def __init__(self, cfg: DetrTrainConfig, env: DistEnv, device: torch.device, preemption=None):
        # Trainer.__init__ builds stage 1's classifier and data; the attributes its loop reads are set here.
        import deepspeed

        self._setup_run(cfg, env, device, preemption)
        resume_tag = self.ckpt.resume_tag() if cfg.checkpoint.resume else None

        ds = cfg.deepspeed
        data_cfg = dataclasses.replace(cfg.data, num_threads=self.dali_threads)
        self.train_loader = build_detection_loader(
            data_cfg, "train", self.rank, self.world, cfg.seed, ds.micro_batch, device
        )
        self.val_loader = build_detection_loader(
            data_cfg, "val", self.rank, self.world, cfg.seed, cfg.eval_micro_batch or ds.micro_batch, device
        )
        self.annotations = self.train_loader.annotations
        if self.val_loader.annotations.label_to_cat != self.annotations.label_to_cat:
            raise ValueError(
                f"data.val_ann: categories {self.val_loader.annotations.label_to_cat} differ from train's "
                f"{self.annotations.label_to_cat}"
            )
        self.mixup = None
        self.steps_per_epoch, self.total_steps, drop_step = resolve_detr_schedule(
            cfg, self.train_loader.num_samples, self.world
        )

        seed_all(cfg.seed)  # identical initial weights on every rank
        model_cfg = cfg.model
        if resume_tag is not None and model_cfg.backbone.pretrained:
            model_cfg = to_model_cfg_without_pretrained(model_cfg)  # the checkpoint holds the weights
        model = build_detector(model_cfg)
        self._setup_perf(model, *self.flops_sample(cfg.data))
        self.criterion = build_criterion(
            cfg.loss,
            model_cfg.num_classes,
            num_decoder_layers(model_cfg),
            model_cfg.aux_loss,
            model_cfg.head,
            model_cfg.head == "deformable" and model_cfg.deformable.two_stage,
        ).to(device)
        self.ema = None
        seed_all(cfg.seed + 1000 * self.rank)  # per-rank stream for dropout / drop-path

        o = cfg.optim
        optimizer = build_detection_optimizer(model, o, device)
        ds_config = build_deepspeed_config(cfg, device.type)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.scheduler = StepDecay(optimizer, drop_step, cfg.schedule.lr_drop_factor)

        self._restore(resume_tag)
        hp = {
            "head": model_cfg.head, "backbone": model_cfg.backbone.name,
            "stages": str(model_cfg.backbone.stages),
            "num_queries": model_cfg.num_queries, "zero_stage": ds.zero_stage, "precision": ds.precision,
            "global_batch": ds.global_batch, "world_size": self.world, "lr": o.lr,
            "backbone_lr": o.backbone_lr, "total_steps": self.total_steps, "lr_drop_step": drop_step,
            "scale_factor": cfg.data.scale_factor,
        }  # fmt: skip
        self._open_logs(hp, ["val/AP", "val/AP50"])
        n_params = sum(p.numel() for p in model.parameters()) / 1e6 if ds.zero_stage < 3 else float("nan")
        log.info(
            "%s %s stages %s (%.2fM params) | %d classes | world %d | ZeRO-%d %s | "
            "batch %d = %d x %d x %d | %d steps (%d/epoch, lr drop at %d) | lr %.3g backbone %.3g",
            "Deformable-DETR" if model_cfg.head == "deformable" else "DETR",
            model_cfg.backbone.name,
            model_cfg.backbone.stages,
            n_params,
            model_cfg.num_classes,
            self.world,
            ds.zero_stage,
            ds.precision,
            ds.global_batch,
            ds.micro_batch,
            ds.grad_accum,
            self.world,
            self.total_steps,
            self.steps_per_epoch,
            drop_step,
            o.lr,
            o.backbone_lr,
        )

    @property
    def model_tag(self) -> str:
        return f"detr_{self.cfg.model.backbone.name}"

    def client_state(self) -> dict:
        return {"step": self.step}

    @staticmethod
    def flops_sample(data) -> tuple[torch.Tensor, torch.Tensor]:
        """One image at the largest training scale, 4:3 landscape (long side capped), and its mask."""
        short = data.scaled(max(data.train_scales))
        long = min(round(short * 4 / 3), data.scaled(data.max_size))
        return torch.zeros(1, 3, short, long), torch.zeros(1, short, long, dtype=torch.bool)

    def train_step(self) -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        self.scheduler.step_update(self.step)
        accum = self.cfg.deepspeed.grad_accum
        wait = 0.0
        sums = torch.zeros(4, dtype=torch.float32, device=self.device)  # total, ce, bbox, giou
        for _ in range(accum):
            t_data = time.perf_counter()
            images, mask, targets, _infos = next(self.stream)  # [B, 3, H, W], [B, H, W], B dicts
            wait += time.perf_counter() - t_data
            with self.phases.phase("fwd_bwd"):
                with fp32_gemm(self.fp32_gemm):  # bf16 storage, fp32 math on CPUs without bf16 kernels
                    outputs = self.engine(images.to(self.dtype), mask)
                losses = self.criterion(outputs, targets)
                loss = self.criterion.total(losses)
                self.engine.backward(loss)
            with self.phases.phase("optim_step"):
                self.engine.step()
            terms = [loss, losses["loss_ce"], losses["loss_bbox"], losses["loss_giou"]]
            sums += torch.stack([t.detach().float() for t in terms])
        sums /= accum
        terms = pdist.all_reduce_sum(sums.clone()) / self.world
        self.logger.scalars(
            self.step + 1,
            {f"train/{k}": float(v) for k, v in zip(("loss_ce", "loss_bbox", "loss_giou"), terms[1:])},
            "step",
        )
        return sums[0], wait, time.perf_counter() - t0

    def validate(self) -> dict:
        with fp32_gemm(self.fp32_gemm):
            stats, first = evaluate_coco(
                self.engine, self.val_loader, self.device, print_fn=log.info, input_dtype=self.dtype
            )
        self.logger.scalars(self.step, {f"val/{k}": v for k, v in stats.items()}, "val")
        if self.rank == 0 and self.logger.writer is not None and first is not None:
            for b, img in enumerate(self.draw_batch(first)[: self.cfg.vis_images]):
                self.logger.writer.add_image(
                    f"val/detections_{b}", np.asarray(img), self.step, dataformats="HWC"
                )
        log.info(
            "step %d val AP %.4f AP50 %.4f AP75 %.4f", self.step, stats["AP"], stats["AP50"], stats["AP75"]
        )
        self.last_eval = stats
        return stats

    def draw_batch(self, first, threshold: float = 0.5) -> list:
        """Val images (as the model saw them) with predictions (colored) and ground truth (white)."""
        images, targets, infos, dets = first
        out = []
        for img, t, info, det in zip(images, targets, infos, dets):
            (h, w), (oh, ow) = info["size"], info["orig_size"]
            pil = denormalize(img[:, :h, :w], self.cfg.data.mean, self.cfg.data.std)
            keep = det["scores"] >= threshold
            scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])
            cx, cy, bw, bh = t["boxes"].unbind(-1)
            gt = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            out.append(
                draw_detections(
                    pil,
                    det["boxes"][keep] * scale,
                    det["labels"][keep],
                    det["scores"][keep],
                    self.annotations.class_names,
                    gt_boxes=gt,
                )
            )
        return out

    def export(self) -> str | None:
        """Write the detector export (rank 0); with ZeRO-3 the partitioned weights are gathered first."""
        import deepspeed

        module = self.engine.module
        path = os.path.join(self.run_dir, self.cfg.export)
        params = list(module.parameters()) if self.cfg.deepspeed.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if self.rank == 0:
                save_detector(
                    path,
                    module,
                    self.cfg.model,
                    self.cfg.data,
                    self.annotations.class_names,
                    self.annotations.label_to_cat,
                )
        pdist.barrier()
        return path

    def train(self) -> dict:
        result = super().train()
        for key in ("top1", "top5", "ema_top1"):
            result.pop(key, None)
        result.update({k: (self.last_eval or {}).get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
        if not result["stopped"]:
            result["export"] = self.export()
        return result


def to_model_cfg_without_pretrained(model_cfg):
    import copy

    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.backbone.pretrained = None
    return model_cfg
