"""Stage 2: DETR fine-tuning of a (stage-1 or authors') PVT backbone on a COCO-format dataset.

    deepspeed --num_gpus 8 launch/finetune_detr.py --config configs/detr/pvt_small_coco.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/finetune_detr.py --config ...   # or srun python ...
    python launch/finetune_detr.py --config configs/detr/labelme_overfit.yaml run_dir=runs/x

Same engine as stage 1 (ZeRO, bf16/fp16, checkpoints, exact resume, preemption, TensorBoard). At the end the
detector is exported to ``<run_dir>/<export>`` for launch/detect.py and launch/evaluate_detr.py.
Exit codes: 0 done (or stopped for preemption, checkpoint saved), 2 bad configuration, 3 non-finite loss.
"""

from __future__ import annotations

import time

T_LAUNCH = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/detr/)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="your own DeepSpeed JSON")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 schedule.total_steps=100"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, "build", "torch_extensions"))
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from pvt_dist.config import ConfigError
    from pvt_dist.detection.config import load_detr_config, resolve_detr_config
    from pvt_dist.distributed import cleanup, detect_env, init_distributed

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"deepspeed.config_file={args.deepspeed_config}")
    try:
        cfg = load_detr_config(args.config, overrides)
        env = detect_env(cfg.dist.master_port)
        cfg = resolve_detr_config(cfg, env.world_size)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from pvt_dist.detection.trainer import DetrTrainer
    from pvt_dist.engine import NonFiniteLossError
    from pvt_dist.engine.logger import setup_logging
    from pvt_dist.preemption import PreemptionHandler

    setup_logging(env.rank, cfg.logging.deepspeed_log_level)
    env, device = init_distributed(cfg.dist, env)
    handler = PreemptionHandler()
    trainer = DetrTrainer(cfg, env, device, preemption=handler)
    try:
        result = trainer.train()
    except NonFiniteLossError as e:
        logging.getLogger("pvt_dist.detr").error("%s", e)
        return 3
    finally:
        trainer.close()
        handler.close()
    if env.rank == 0:
        wall = time.time() - T_LAUNCH
        status = "stopped for preemption at" if result["stopped"] else "finished at"
        ap = "n/a" if result["AP"] is None else f"{result['AP']:.4f}"
        ap50 = "n/a" if result["AP50"] is None else f"{result['AP50']:.4f}"
        print(f"{status} step {result['step']} | COCO AP {ap} AP50 {ap50} | wall time {wall:.0f} s")
        if result.get("export"):
            print(f"detector: {result['export']}")
        print(f"tensorboard --logdir {result['tensorboard_dir']}")
        with open(os.path.join(result["run_dir"], "result.json"), "w") as f:
            json.dump(
                {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, type(None)))}, f
            )
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
