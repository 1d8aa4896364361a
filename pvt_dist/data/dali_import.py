"""NVIDIA DALI's Python API, imported once, with an error that says which wheel to install.

DALI wheels are built per CUDA major (its GPU JPEG decoder loads that major's nvJPEG), so the project
does not depend on one directly: an extra picks the wheel matching torch's CUDA.
"""

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
except ImportError as e:
    raise ImportError(
        f"NVIDIA DALI is not importable ({e}). Install the wheel for torch's CUDA major: "
        "pip install -e '.[cuda13]' (torch built for CUDA 13, the default, `make venv`) or "
        "pip install -e '.[cuda12]' (torch built for CUDA 12, `make venv CUDA_EXTRA=cuda12`)"
    ) from e

__all__ = ["dmath", "fn", "pipeline_def", "types"]
