"""Stage-1 training machinery: DeepSpeed config, optimizer and schedule, loop, evaluation, checkpoints."""

from pvt_dist.engine.checkpoint import CheckpointManager, read_latest
from pvt_dist.engine.ds_config import build_deepspeed_config
from pvt_dist.engine.evaluate import evaluate
from pvt_dist.engine.optim import build_optimizer, build_param_groups, build_scheduler
from pvt_dist.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "CheckpointManager",
    "NonFiniteLossError",
    "Trainer",
    "build_deepspeed_config",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "evaluate",
    "read_latest",
]
