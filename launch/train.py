"""Stage-1 pretraining of a PVT classifier.

    deepspeed --num_gpus 8 launch/train.py --config configs/pretrain/pvt_small.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --config ...     # or: srun python launch/train.py ...
    python launch/train.py --config ... deepspeed.zero_stage=3 run_dir=runs/x

A run directory that already holds a checkpoint is resumed. Exit codes: 0 done (or stopped for
preemption, checkpoint saved), 2 bad configuration, 3 non-finite loss.
"""

from __future__ import annotations

import time

T_LAUNCH = time.time()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/pretrain/)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="your own DeepSpeed JSON")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 deepspeed.zero_stage=3")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, "build", "torch_extensions"))
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from pvt_dist.config import ConfigError, load_config, resolve_config
    from pvt_dist.distributed import cleanup, detect_env, init_distributed

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"deepspeed.config_file={args.deepspeed_config}")
    try:
        cfg = load_config(args.config, overrides)
        env = detect_env(cfg.dist.master_port)
        cfg = resolve_config(cfg, env.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from pvt_dist.engine import NonFiniteLossError, Trainer
    from pvt_dist.engine.logger import setup_logging
    from pvt_dist.engine.trainer import prepare_run_dir
    from pvt_dist.preemption import PreemptionHandler

    try:
        prepare_run_dir(os.path.abspath(cfg.run_dir), env.rank)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    setup_logging(env.rank, cfg.logging.deepspeed_log_level)
    env, device = init_distributed(cfg.dist, env)
    handler = PreemptionHandler()
    trainer = Trainer(cfg, env, device, preemption=handler)
    try:
        result = trainer.train()
    except NonFiniteLossError as e:
        logging.getLogger("pvt_dist.train").error("%s", e)
        return 3
    finally:
        trainer.close()
        handler.close()
    if env.rank == 0:
        wall = time.time() - T_LAUNCH
        top1 = "n/a" if result["top1"] is None else f"{result['top1']:.2f}%"
        top5 = "n/a" if result["top5"] is None else f"{result['top5']:.2f}%"
        status = "stopped for preemption at" if result["stopped"] else "finished at"
        print(f"{status} step {result['step']} | final top-1 {top1} top-5 {top5} | wall time {wall:.0f} s")
        print(f"tensorboard --logdir {result['tensorboard_dir']}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
