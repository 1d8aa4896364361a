"""TF32 tensor-core math for the fp32 parts of a run (EMA validation, fp32 configs) on Ampere or newer.

TF32 keeps fp32's range with a 10-bit mantissa in the GEMM inputs (fp32 accumulation); on an A100/H100
an fp32 matmul then runs at tensor-core speed (8x or more) at the precision bf16 autocast already accepts.
PyTorch leaves it off for matmuls by default, so a run turns it on once at engine setup.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Compute capability of the first GPUs with TF32 tensor cores (Ampere, sm_80).
AMPERE = (8, 0)


def tf32_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= AMPERE


def apply_tf32(enabled: bool, device: torch.device) -> bool:
    """Set torch's process-wide TF32 switches for ``device`` (``deepspeed.tf32``); returns whether TF32 is on.

    On a CPU, or a GPU older than Ampere, nothing is changed.
    """
    if not tf32_supported(device):
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    log.info("TF32 for fp32 matmuls/convolutions: %s", "on" if enabled else "off")
    return enabled
