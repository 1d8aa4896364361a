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
    LeaseConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PreemptionConfig,
    ScheduleConfig,
    TrainConfig,
    check_cluster_sections,
    check_gpu_options,
    check_logging,
    load_config,
    peak_lr,
    resolve_batch,
    resolve_config,
)

__all__ = [
    "check_cluster_sections", "check_gpu_options", "check_logging", "CheckpointConfig", "coerce",
    "config_hash", "ConfigError", "DeepSpeedOptions", "DistConfig", "dump_config", "EMAConfig",
    "EvalConfig", "LeaseConfig", "load_config", "load_dataclass", "LoggingConfig", "ModelConfig",
    "OptimConfig", "peak_lr", "PreemptionConfig", "resolve_batch", "resolve_config", "ScheduleConfig",
    "to_dict", "TrainConfig",
]  # fmt: skip
