"""Stage-1 pretraining of a PVT classifier.

    deepspeed --num_gpus 8 launch/train.py --config configs/pretrain/pvt_small.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --config ...     # or: srun python launch/train.py ...
    python launch/train.py --config ... deepspeed.zero_stage=3 run_dir=runs/x
    python launch/train.py --config configs/pretrain/pvt_large.yaml --plan --world-size 128   # dry run

A run directory that already holds a checkpoint is resumed. Exit codes: 0 done (or stopped for
preemption, checkpoint saved), 2 bad configuration, 3 non-finite loss.
"""

from __future__ import annotations

import time

T_LAUNCH = time.time()

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pvt_dist.entrypoint import Stage, fmt, lazy, run_stage  # noqa: E402

STAGE = Stage(
    name="pvt_dist.train",
    load=lazy("pvt_dist.config:load_config"),
    resolve=lazy("pvt_dist.config:resolve_config"),
    plan="pretrain",
    trainer=lazy("pvt_dist.engine:Trainer"),
    report=lambda r: f"final top-1 {fmt(r['top1'], '.2f')}% top-5 {fmt(r['top5'], '.2f')}%",
)


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, __doc__, argv, T_LAUNCH)


if __name__ == "__main__":
    sys.exit(main())
