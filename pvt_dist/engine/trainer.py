"""Stage-1 pretraining loop on a DeepSpeed engine: iteration-based, exactly resumable, preemptible.

    trainer = Trainer(cfg, env, device, preemption=handler)   # builds data, model, engine; resumes
    result = trainer.train()                                   # {"top1", "top5", "step", "stopped", ...}
    trainer.close()

One optimizer step = ``grad_accum`` micro batches of ``micro_batch`` images on every rank. The learning
rate is a pure function of the step, and the data position and every RNG state are checkpointed per
rank, so a resumed run computes exactly the losses the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from pvt_dist.cluster import distributed as pdist
from pvt_dist.cluster.distributed import DistEnv
from pvt_dist.cluster.plan import summary_line
from pvt_dist.config import TrainConfig, config_hash, dump_config, peak_lr, to_dict
from pvt_dist.data.index import RETRIES as STREAM_RETRIES
from pvt_dist.engine.checkpoint import CheckpointManager, check_writable, read_trainer_state
from pvt_dist.engine.cpu_bf16 import fp32_gemm, use_fp32_gemm
from pvt_dist.engine.ds_config import build_deepspeed_config
from pvt_dist.engine.evaluate import evaluate
from pvt_dist.engine.logger import MetricLogger, memory_mb
from pvt_dist.engine.optim import build_optimizer, build_param_groups, build_scheduler, resolve_schedule
from pvt_dist.engine.perf import PhaseTimer, StepProfiler, measured_peak_tflops, model_flops_per_image
from pvt_dist.engine.resume import (
    DataStream,
    check_global_batch,
    elastic_data_position,
    elastic_rng,
    rng_state,
    seed_all,
    set_rng_state,
)
from pvt_dist.engine.tf32 import apply_tf32

log = logging.getLogger("pvt_dist.train")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf under bf16/fp32; the run stops, its last checkpoint stays intact."""


def build_criterion(cfg: TrainConfig, mixup) -> torch.nn.Module:
    """Soft-target CE under Mixup/CutMix (smoothing is folded into the targets), else smoothed CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.data.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.data.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def prepare_run_dir(run_dir: str, rank: int) -> None:
    """Create the run directory and prove checkpoints can be written, before any process group starts."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"run_dir: cannot create {run_dir}: {e}") from e
    check_writable(os.path.join(run_dir, "checkpoints"), rank)


class Trainer:
    def _setup_run(self, cfg, env: DistEnv, device: torch.device, preemption) -> None:
        """What the loop of both stages reads: ranks, precision, run directory, checkpoint manager."""
        self.t_start = time.perf_counter()
        self.cfg, self.env, self.device = cfg, env, device
        self.preemption = preemption
        self.rank, self.world = env.rank, env.world_size
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.fp32_gemm = use_fp32_gemm(cfg.deepspeed.precision, device, cfg.deepspeed.cpu_bf16_math)
        self.tf32 = apply_tf32(cfg.deepspeed.tf32, device)
        self.run_dir = os.path.abspath(cfg.run_dir)
        self.ckpt = CheckpointManager(
            os.path.join(self.run_dir, "checkpoints"), self.rank, self.world, cfg.checkpoint.keep_last
        )
        prepare_run_dir(self.run_dir, self.rank)
        self.last_eval: dict | None = None
        # data.num_threads within the rank's CPU budget (--cpus-per-task), which DALI and torch share.
        self.dali_threads = pdist.dali_threads(cfg.data.num_threads)
        omp = os.environ.get("OMP_NUM_THREADS")
        line = (f"rank {self.rank}: threads torch {torch.get_num_threads()} (OMP_NUM_THREADS={omp}), "
                f"DALI {self.dali_threads}, cpu budget {pdist.cpu_budget()}\n")  # fmt: skip
        sys.stdout.write(line)  # one write: ranks sharing a stdout (srun) do not interleave their lines
        sys.stdout.flush()
        self.phases = PhaseTimer(device)
        self.profiler = StepProfiler(cfg.logging.profile_steps, self.run_dir, self.rank, device)

    def _setup_perf(self, model: torch.nn.Module, *sample: torch.Tensor) -> None:
        """FLOPs of one training image (``sample``: batch-1 inputs, CPU) and the peak MFU divides by."""
        self.flops_per_image = model_flops_per_image(model, *sample)
        self.peak_tflops = self.cfg.logging.peak_tflops
        peak_src = "logging.peak_tflops"
        if self.peak_tflops is None:
            gemm_dtype = torch.float32 if self.fp32_gemm else self.dtype
            self.peak_tflops = measured_peak_tflops(self.device, gemm_dtype)
            peak_src = f"measured {str(gemm_dtype).removeprefix('torch.')} matmul"
        log.info(
            "%.3g GFLOPs per training image (3 x forward) | peak %.3g TFLOP/s per device (%s)",
            self.flops_per_image / 1e9, self.peak_tflops, peak_src,
        )  # fmt: skip

    def _restore(self, resume_tag: str | None) -> dict:
        """Resume from ``resume_tag`` (engine, step, RNG, data position) or start at step 0.

        The checkpoint's ``checkpoint_identity()`` must match this run's, except in the world size and ZeRO
        stage (an elastic resume, see ``resume.py``); so must its global batch unless
        ``checkpoint.allow_global_batch_change``. Returns the checkpoint's client state ({} for a fresh
        start). The config is written to the run directory only after this, so a refused resume leaves the
        run's config.yaml as it was.
        """
        self.step, client = 0, {}
        data_epoch, loader_state = 0, None
        if resume_tag is not None:
            checkpoint = os.path.join(self.ckpt.dir, resume_tag)
            check_global_batch(
                self.cfg, self.world, checkpoint, read_trainer_state(self.ckpt.dir, resume_tag)
            )
            client, rank_state, meta = self.ckpt.load(self.engine, resume_tag, self.checkpoint_identity())
            self.step = int(meta["step"])
            if meta.get("config_hash") != config_hash(self.cfg):
                log.warning("resuming %s with a changed config (hash %s -> %s)",
                            resume_tag, meta.get("config_hash"), config_hash(self.cfg))  # fmt: skip
            if meta.get("world_size") == self.world:
                set_rng_state(rank_state["rng"])
                data_epoch, loader_state = rank_state["data"]["epoch"], rank_state["data"]["loader"]
            else:
                elastic_rng(self.cfg, self.step, self.rank, rank_state)
                data = (rank_state or self.ckpt.rank_state(resume_tag, 0))["data"]
                data_epoch, loader_state = elastic_data_position(
                    data, self.rank, self.world, meta["world_size"]
                )
            log.info("resumed from %s at step %d", checkpoint, self.step)
        self.stream = DataStream(self.train_loader, data_epoch, loader_state)
        self.last_saved = self.step if resume_tag is not None else -1
        return client

    def _open_logs(self, hparams: dict, hparam_metrics: list[str]) -> None:
        """Write config.yaml; open TensorBoard (appending on resume), with hparams on a fresh run."""
        if self.rank == 0:
            header = summary_line(self.cfg, self.world)  # the line rank 0 printed at launch
            dump_config(self.cfg, os.path.join(self.run_dir, "config.yaml"), header=header)
        self.logger = MetricLogger(
            self.run_dir, self.rank == 0, self.cfg.logging.tensorboard, self.step, self.total_steps
        )
        if self.step == 0:
            import yaml

            self.logger.hparams(hparams, hparam_metrics)
            self.logger.text("config", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def __init__(self, cfg: TrainConfig, env: DistEnv, device: torch.device, preemption=None):
        import deepspeed

        from pvt_dist.data import build_loader, build_mixup
        from pvt_dist.models import build_model, load_pretrained

        self._setup_run(cfg, env, device, preemption)
        resume_tag = self.ckpt.resume_tag() if cfg.checkpoint.resume else None

        ds = cfg.deepspeed
        data_cfg = cfg.data.replace(num_threads=self.dali_threads)
        self.train_loader = build_loader(
            data_cfg, split="train", rank=self.rank, world_size=self.world, seed=cfg.seed,
            micro_batch=ds.micro_batch, device=device,
        )  # fmt: skip
        self.val_loader = build_loader(
            data_cfg, split="val", rank=self.rank, world_size=self.world, seed=cfg.seed,
            micro_batch=ds.micro_batch, device=device,
        )  # fmt: skip
        self.mixup = build_mixup(cfg.data)
        self.criterion = build_criterion(cfg, self.mixup)
        self.steps_per_epoch, self.total_steps, self.warmup_steps = resolve_schedule(
            cfg, self.train_loader.num_samples, self.world
        )

        # Same seed on every rank: identical initial weights without relying on a broadcast.
        seed_all(cfg.seed)
        m = cfg.model
        kwargs = dict(num_classes=m.num_classes, img_size=m.img_size, grad_checkpointing=m.grad_checkpointing)
        if m.drop_path_rate is not None:
            kwargs["drop_path_rate"] = m.drop_path_rate
        model = build_model(m.name, **kwargs)
        channels = 3 if cfg.data.gray_to_rgb else 1
        self._setup_perf(model, torch.zeros(1, channels, m.img_size, m.img_size))
        if m.pretrained and resume_tag is None:
            report = load_pretrained(model, m.pretrained)
            log.info(
                "loaded %s: %s", m.pretrained, report.summary() if hasattr(report, "summary") else report
            )
        self.num_params = sum(p.numel() for p in model.parameters())
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            # fp32 copy taken before DeepSpeed casts the module to 16 bits.
            self.ema = ModelEmaV3(model, decay=cfg.ema.decay, dtype=torch.float32, device=device)
        # Per-rank stream for dropout / drop-path / Mixup.
        seed_all(cfg.seed + 1000 * self.rank)

        ds_config = build_deepspeed_config(cfg, device.type)
        if "optimizer" in ds_config:  # a user's JSON brings its own optimizer
            optimizer = None
            params = build_param_groups(model, cfg.optim.weight_decay)
        else:
            optimizer = build_optimizer(model, cfg, device)
            params = None
        self.engine, engine_opt, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, config=ds_config
        )
        if m.compile:
            self.engine.compile()
        self.scheduler = None
        if "scheduler" not in ds_config:
            self.scheduler = build_scheduler(
                optimizer or engine_opt, cfg, self.total_steps, self.warmup_steps
            )

        client = self._restore(resume_tag)
        if self.ema is not None and resume_tag is not None:
            if client.get("ema") is None:
                raise RuntimeError(f"ema.enabled: checkpoint {resume_tag} has no EMA weights")
            self.ema.module.load_state_dict(client["ema"])
        hp = {
            "model": m.name, "img_size": m.img_size, "zero_stage": ds.zero_stage, "precision": ds.precision,
            "global_batch": ds.global_batch, "micro_batch": ds.micro_batch, "grad_accum": ds.grad_accum,
            "world_size": self.world, "peak_lr": peak_lr(cfg), "weight_decay": cfg.optim.weight_decay,
            "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "drop_path_rate": m.drop_path_rate if m.drop_path_rate is not None else "default",
            "mixup": cfg.data.mixup, "cutmix": cfg.data.cutmix, "ema": cfg.ema.enabled,
        }  # fmt: skip
        self._open_logs(hp, ["val/top1", "val/top5"])
        log.info(
            "model %s (%.2fM params) | world %d | ZeRO-%d %s | batch %d = %d x %d x %d | %d steps "
            "(%d/epoch, warmup %d) | peak lr %.3g%s",
            m.name, self.num_params / 1e6,
            self.world, ds.zero_stage, ds.precision, ds.global_batch, ds.micro_batch, ds.grad_accum,
            self.world, self.total_steps, self.steps_per_epoch, self.warmup_steps, peak_lr(cfg),
            " | bf16 storage, fp32 GEMMs (CPU without bf16 kernels)" if self.fp32_gemm else "",
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------

    def _due(self, every: int | None) -> bool:
        period = every or self.steps_per_epoch
        return self.step % period == 0

    @property
    def model_tag(self) -> str:
        """The model's name in checkpoint metadata (a resume with another model is refused)."""
        return self.cfg.model.name

    def checkpoint_identity(self) -> dict:
        """Metadata a checkpoint must share with the run that resumes it (ZeRO stage, precision, model)."""
        ds = self.cfg.deepspeed
        return {"zero_stage": ds.zero_stage, "precision": ds.precision, "model": self.model_tag}

    def client_state(self) -> dict:
        """Stage-specific state saved with every checkpoint (rank 0's copy)."""
        return {"step": self.step, "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def save(self) -> str:
        rank_state = {"rng": rng_state(), "data": self.stream.state_dict(), "step": self.step}
        meta = {
            "config_hash": config_hash(self.cfg),
            "epoch": self.step / self.steps_per_epoch,
            "global_batch": self.cfg.deepspeed.global_batch,
            **self.checkpoint_identity(),
        }
        self._check_finite_weights()
        t0 = time.perf_counter()
        path = self.ckpt.save(self.engine, self.step, self.client_state(), rank_state, meta)
        self.logger.scalars(self.step, {"perf/checkpoint_save_s": time.perf_counter() - t0}, "checkpoint")
        self.last_saved = self.step
        return path

    def _check_finite_weights(self) -> None:
        """Refuse to checkpoint non-finite weights, so `latest` stays the last good state."""
        bad = torch.zeros((), device=self.device)
        for p in self.engine.module.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad += 1
        pdist.all_reduce_sum(bad)
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"weights became non-finite by step {self.step}; stopping without saving. The last good "
                f"checkpoint ({self.ckpt.latest() or 'none yet'}) in {self.ckpt.dir} is intact"
            )

    def validate(self) -> dict:
        # Evaluation must not perturb the training RNG streams, or resumed runs would diverge.
        saved_rng = rng_state()
        with fp32_gemm(self.fp32_gemm):
            res = evaluate(self.engine, self.val_loader, self.device, self.dtype)
        values = {"val/top1": res["top1"], "val/top5": res["top5"], "val/loss": res["loss"]}
        if self.ema is not None:
            ema_res = evaluate(self.ema.module, self.val_loader, self.device, torch.float32)
            values.update({"val_ema/top1": ema_res["top1"], "val_ema/top5": ema_res["top5"]})
            res["ema_top1"] = ema_res["top1"]
        expected = getattr(self.val_loader, "num_samples", None)
        if expected is not None and res["count"] != expected:
            raise RuntimeError(f"validation saw {res['count']} samples, the split has {expected}")
        self.logger.scalars(self.step, {**values, "val/count": res["count"]}, "val")
        log.info(
            "step %d val top1 %.2f top5 %.2f loss %.4f (%d images)%s", self.step, res["top1"], res["top5"],
            res["loss"], res["count"], f" | ema top1 {res['ema_top1']:.2f}" if self.ema is not None else "",
        )  # fmt: skip
        self.last_eval = res
        set_rng_state(saved_rng)
        return res

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (local mean loss, data wait s, step time s)."""
        t0 = time.perf_counter()
        if self.scheduler is not None:
            self.scheduler.step_update(self.step)
        wait = 0.0
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.cfg.deepspeed.grad_accum):
            t_data = time.perf_counter()
            images, labels = next(self.stream)  # [B, 3, H, W] float, [B] int64
            wait += time.perf_counter() - t_data
            targets = labels
            if self.mixup is not None:
                images, targets = self.mixup(images, labels)  # targets [B, classes]
            with self.phases.phase("fwd_bwd"):
                with fp32_gemm(self.fp32_gemm):
                    logits = self.engine(images.to(self.dtype))
                loss = self.criterion(logits.float(), targets)
                self.engine.backward(loss)
            with self.phases.phase("optim_step"):
                self.engine.step()
            loss_sum += loss.detach().float()
        return loss_sum / self.cfg.deepspeed.grad_accum, wait, time.perf_counter() - t0

    def profiled_step(self) -> tuple[torch.Tensor, float, float]:
        """``train_step`` inside the ``logging.profile_steps`` trace when its step is in range."""
        self.profiler.before_step(self.step + 1)
        with self.profiler.region(self.step + 1):
            out = self.train_step()
        self.profiler.after_step(self.step + 1)
        return out

    @property
    def sync_every(self) -> int:
        """Steps between the loop's host syncs (``logging.sync_every``; None: 1 on CPU, log_every on GPU)."""
        every = self.cfg.logging.sync_every
        if every is None:
            every = 1 if self.device.type == "cpu" else self.cfg.logging.log_every
        return every

    def _drain(self, pending: list, window: dict) -> None:
        """Read the queued per-step stats back in one sync; record each step; stop on a non-finite loss."""
        if not pending:
            return
        t0 = time.perf_counter()
        values = torch.stack([stats for _, stats, _ in pending]).tolist()  # the one device-to-host sync
        window["time"] += time.perf_counter() - t0  # a GPU's queued work finishes here: part of the steps
        precision = self.cfg.deepspeed.precision
        for (step, _, lr), (loss_sum, nonfinite) in zip(pending, values):
            if nonfinite > 0 and precision != "fp16":
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} under {precision}; stopping. The last good "
                    f"checkpoint ({self.ckpt.latest() or 'none yet'}) in {self.ckpt.dir} is intact"
                )
            loss = loss_sum / self.world
            self.logger.scalars(step, {"train/loss_step": loss, "train/lr_step": lr}, "step")
            if math.isfinite(loss):
                window["loss"] += loss
                window["n"] += 1
        pending.clear()

    def train(self) -> dict:
        cfg = self.cfg
        self.engine.train()
        window = {"loss": 0.0, "n": 0, "steps": 0, "time": 0.0, "wait": 0.0}
        pending: list[tuple[int, torch.Tensor, float]] = []  # (step, all-reduced stats, lr) not yet read
        sync_every, stopped = self.sync_every, False
        while self.step < self.total_steps:
            # Collective at the same step boundaries on every rank: the host syncs, and by time (check_due is
            # derived from all-reduced values, hence the same on every rank).
            if (
                self.preemption is not None
                and (self.step % sync_every == 0 or self.preemption.check_due(self.step))
                and self.preemption.stop_requested(self.step)
            ):
                if self.last_saved != self.step:
                    self.save()
                self.logger.flush()
                stopped = True
                self.preemption.on_checkpoint_saved()
                break
            local_loss, wait, step_time = self.profiled_step()
            self.step += 1
            # One all-reduce per step: the global loss and an agreed verdict on non-finite values, left on
            # the device until the next sync point.
            stats = torch.stack([local_loss, (~torch.isfinite(local_loss)).float()])
            pdist.all_reduce_sum(stats)
            lr = self.engine.get_lr()[0]  # read back from the wrapped optimizer: what the step really used
            pending.append((self.step, stats, lr))
            if self.ema is not None:
                self.ema.update(self.engine.module, step=self.step)
            window["steps"] += 1
            window["time"] += step_time
            window["wait"] += wait
            last = self.step == self.total_steps
            log_due = self.step % cfg.logging.log_every == 0 or last
            eval_due = not last and self._due(cfg.eval.every_steps)
            save_due = not last and self._due(cfg.checkpoint.every_steps)
            if self.step % sync_every == 0 or log_due or eval_due or save_due or last:
                self._drain(pending, window)
            if log_due:
                self._log_window(window, lr)
                window = {"loss": 0.0, "n": 0, "steps": 0, "time": 0.0, "wait": 0.0}
            if eval_due:
                self.validate()
            if save_due:
                self.save()
        if not stopped:
            if self.preemption is not None:
                self.preemption.run_finished()  # a signal during the final eval/save must not requeue
            if cfg.eval.at_end or self._due(cfg.eval.every_steps):
                self.validate()
            if self.last_saved != self.step:
                self.save()
        self.logger.flush()
        res = self.last_eval or {}
        return {
            "step": self.step,
            "stopped": stopped,
            "top1": res.get("top1"),
            "top5": res.get("top5"),
            "ema_top1": res.get("ema_top1"),
            "wall_s": time.perf_counter() - self.t_start,
            "run_dir": self.run_dir,
            "tensorboard_dir": self.logger.tb_dir,
        }

    def _log_window(self, w: dict, lr: float) -> None:
        n_steps = max(w["steps"], 1)
        step_time = w["time"] / n_steps
        images_per_s = self.cfg.deepspeed.global_batch / max(step_time, 1e-9)
        tflops = self.flops_per_image * images_per_s / self.world / 1e12
        phases = self.phases.collect()  # the loop synced in _drain: the CUDA events are done
        values = {
            "train/loss": w["loss"] / max(w["n"], 1),
            "train/lr": lr,
            "perf/images_per_s": images_per_s,
            "perf/tflops_per_gpu": tflops,
            "perf/mfu": 100.0 * tflops / self.peak_tflops,
            "perf/step_time_s": step_time,
            "perf/data_wait_s": w["wait"] / n_steps,
            "perf/fwd_bwd_s": phases.get("fwd_bwd", 0.0) / n_steps,
            "perf/optim_step_s": phases.get("optim_step", 0.0) / n_steps,
            "perf/memory_mb": memory_mb(self.device),
            "train/epoch": self.step / self.steps_per_epoch,
            "data/stream_retries": float(STREAM_RETRIES["count"]),  # streamed shards reopened so far
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        if self.cfg.deepspeed.precision == "fp16":
            opt = self.engine.optimizer
            scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
            values["train/loss_scale"] = float(scale) if scale is not None else None
            values["train/skipped_steps"] = float(self.engine.skipped_steps)
        self.logger.scalars(self.step, values, "train")
        hidden = (
            "train/epoch",
            "perf/memory_mb",
            "data/stream_retries",
            "perf/fwd_bwd_s",
            "perf/optim_step_s",
        )
        shown = {k: v for k, v in values.items() if k not in hidden}
        self.logger.console(self.step, self.step / self.steps_per_epoch, shown)

    def close(self) -> None:
        self.profiler.stop()  # a run that ended inside profile_steps still writes its trace
        self.logger.close()
        if self.ema is not None:
            self.ema = None
