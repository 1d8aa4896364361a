"""Configuration: typed dataclasses (``train``) over the generic YAML <-> dataclass machinery (``io``).

Both stages import their shared names from here; the detector's config lives in
``pvt_dist.detection.config`` and builds on these.
"""

from pvt_dist.config.io import ConfigError, coerce, config_hash, dump_config, load_dataclass, to_dict
from pvt_dist.config.train import (
    CheckpointConfig,
    DeepSpeedOptions,
    DistConfig,
    EMAConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    check_logging,
    load_config,
    peak_lr,
    resolve_batch,
    resolve_config,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DeepSpeedOptions", "DistConfig", "EMAConfig", "EvalConfig",
    "LoggingConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "check_logging", "coerce",
    "config_hash",
    "dump_config", "load_config", "load_dataclass", "peak_lr", "resolve_batch", "resolve_config", "to_dict",
]  # fmt: skip
