"""What both stages' entry points (launch/train.py, launch/finetune_detr.py) do: parse, build, train, close.

The same script runs under ``deepspeed`` (which passes ``--local_rank``), ``torchrun``, ``srun`` and as a
single process; ``pvt_dist.cluster.distributed.detect_env`` finds the ranks. This module imports nothing heavy
at the top, so a bad config or argument is reported before torch, DeepSpeed or DALI load.

``--plan [--world-size N]`` resolves the config, prints the run's plan (``pvt_dist.cluster.plan``) and exits
0 without starting anything; a real launch builds the same plan before its process group and rank 0 prints
its first line.

Exit codes: 0 done (or stopped for preemption with its checkpoint saved, or a plan printed), 2 bad
configuration or run directory (including one held by another live job: ``RUN_DIR/.lease``), 3 non-finite
loss (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE = 0, 2, 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Stage:
    """How one stage differs: its config loader and trainer, and what its final line reports."""

    name: str
    """Logger name for errors (e.g. ``pvt_dist.train``)."""
    load: Callable[[str, list[str]], object]
    """``load(yaml_path, dotted_overrides) -> config``; raises ConfigError naming the key."""
    resolve: Callable[..., object]
    """``resolve(config, world_size, check_files=True) -> config`` with the batch sizes checked against the
    world; ``check_files=False`` (``--plan``) accepts data that is not on this machine."""
    plan: str
    """``pvt_dist.cluster.plan.build_plan``'s stage: ``pretrain`` or ``detr``."""
    trainer: Callable[..., object]
    """``trainer(cfg, env, device, preemption=handler)``: an object with ``train()`` and ``close()``."""
    report: Callable[[dict], str]
    """The metrics part of the final console line, from ``train()``'s result."""
    finish: Callable[[dict], None] | None = None
    """Extra rank-0 work on the result (e.g. writing result.json)."""
    override_example: str = "optim.lr=1e-3 deepspeed.zero_stage=3"


def lazy(target: str) -> Callable:
    """``"module:attr"`` as a callable that imports the module on first call.

    Entry points name their config loader and trainer this way, so nothing heavy loads before the
    command line and config are checked.
    """
    module, attr = target.split(":")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    return call


def parse_args(stage: Stage, doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="your own DeepSpeed JSON")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the run's plan (batch, lr, steps, memory, checkpoint size) and exit; starts nothing and "
        "needs neither the data nor a GPU",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --plan: the number of ranks (GPUs) to plan for (default: the launcher's, else 1)",
    )
    p.add_argument("--nodes", type=int, default=None, help="with --plan: nodes the ranks are spread over")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {stage.override_example}")
    args = p.parse_args(argv)
    if not args.plan and (args.world_size is not None or args.nodes is not None):
        p.error("--world-size and --nodes are for --plan; a launch takes the world from its launcher")
    for name in ("world_size", "nodes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    return args


def run_stage(
    stage: Stage, doc: str | None, argv: list[str] | None = None, t_launch: float | None = None
) -> int:
    """Run one training stage to its end (or to a preemption stop); returns the process exit code."""
    t_launch = time.time() if t_launch is None else t_launch
    args = parse_args(stage, doc, argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, "build", "torch_extensions"))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():  # before torch starts its thread pools
        os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from pvt_dist.cluster.distributed import detect_env
    from pvt_dist.config import ConfigError

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"deepspeed.config_file={args.deepspeed_config}")
    from pvt_dist.cluster.plan import build_plan

    try:
        cfg = stage.load(args.config, overrides)
        env = detect_env(cfg.dist.master_port)
        world = args.world_size or env.world_size
        cfg = stage.resolve(cfg, world, check_files=not args.plan)
        # The same plan --plan prints: whatever it can refuse (e.g. a warmup as long as the run) is refused
        # here, before any process group starts.
        plan = build_plan(cfg, world, stage.plan, nodes=args.nodes, strict=not args.plan)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plan:
        print(plan.format())
        return EXIT_OK
    if env.rank == 0:
        print(plan.summary, flush=True)

    from pvt_dist.engine.trainer import prepare_run_dir

    try:  # before any process group starts: a bad run_dir costs nothing
        prepare_run_dir(os.path.abspath(cfg.run_dir), env.rank)
        lease = acquire_lease(cfg, env.rank)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return _train(stage, cfg, env, t_launch)
    finally:
        if lease is not None:
            lease.release()


def acquire_lease(cfg, rank: int):
    """Global rank 0 takes the run directory's lease (pvt_dist/cluster/lease.py); returns it, or None.

    Only rank 0 checks: the other ranks cannot learn its verdict without a process group, and need not.
    When rank 0 is refused it exits 2 before ``init_distributed``; every other rank then blocks in the
    rendezvous, which cannot complete without rank 0, and writes nothing but its start-up write probe. The
    launcher ends them (torchrun and the deepspeed launcher stop all ranks when one fails, ``srun
    --kill-on-bad-exit`` in slurm/srun_train.sh ends the step), or, under a bare launch, the rendezvous
    gives up after ``dist.timeout_s``. All later writes to the run directory follow collectives that need
    rank 0, so a refused launch can never touch the live run's files.
    """
    if rank != 0:
        return None
    from pvt_dist.cluster.lease import RunDirLease

    lease = RunDirLease(os.path.abspath(cfg.run_dir), cfg.lease.heartbeat_s, cfg.lease.stale_after)
    return lease.acquire()


def _train(stage: Stage, cfg, env, t_launch: float) -> int:
    from pvt_dist.cluster.distributed import cleanup, init_distributed
    from pvt_dist.cluster.preemption import PreemptionHandler
    from pvt_dist.engine import NonFiniteLossError
    from pvt_dist.engine.logger import setup_logging

    setup_logging(env.rank, cfg.logging.deepspeed_log_level)
    env, device = init_distributed(cfg.dist, env)
    handler = PreemptionHandler(check_every_s=cfg.preemption.check_every_s)
    trainer = stage.trainer(cfg, env, device, preemption=handler)
    try:
        result = trainer.train()
    except NonFiniteLossError as e:
        logging.getLogger(stage.name).error("%s", e)
        return EXIT_NONFINITE
    finally:
        trainer.close()
        handler.close()
    if env.rank == 0:
        status = "stopped for preemption at" if result["stopped"] else "finished at"
        wall = time.time() - t_launch
        print(f"{status} step {result['step']} | {stage.report(result)} | wall time {wall:.0f} s")
        if stage.finish is not None:
            stage.finish(result)
        print(f"tensorboard --logdir {result['tensorboard_dir']}")
    cleanup()
    return EXIT_OK


def fmt(value: float | None, spec: str) -> str:
    """A metric for the final line, ``n/a`` when it was never computed."""
    return "n/a" if value is None else format(value, spec)
