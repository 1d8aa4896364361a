"""bf16 training on CPUs without bf16 matrix units: bf16 storage, fp32 math for the GEMM-like ops.

On an x86 CPU without AVX512-BF16/AMX (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False)
PyTorch's bf16 matmul and convolution fall back to reference kernels that are an order of magnitude
slower than fp32 (measured: PVT-Tiny 32x32 fwd+bwd, batch 128, one thread: 1.1 s fp32 vs 15 s bf16).
Inside ``fp32_gemm()`` such ops get their bf16 inputs upcast to fp32 and their outputs rounded back
to bf16. Weights, activations between ops, gradients and DeepSpeed's communication stay bf16, and the
products accumulate in fp32 exactly as bf16 tensor cores do, so the numerics match bf16 training while
the speed is that of fp32. Autograd records the casts, so the backward GEMMs run in fp32 too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

_GEMM_OPS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv_transpose2d,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.mm,
    torch.Tensor.bmm,
}


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _down(x):
    return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


class _Fp32GemmMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMM_OPS:
            has_bf16 = any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in (*args, *kwargs.values())
            )
            if has_bf16:
                out = func(*tree_map(_up, args), **tree_map(_up, kwargs))
                return tree_map(_down, out)
        return func(*args, **kwargs)


def native_bf16_gemm() -> bool:
    """True when this CPU has fast bf16 matmul kernels (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_fp32_gemm(precision: str, device: torch.device, mode: str) -> bool:
    """Whether training in ``precision`` on ``device`` should run its GEMMs in fp32 (see module doc)."""
    if precision != "bf16" or device.type != "cpu" or mode == "native":
        return False
    return mode == "fp32" or not native_bf16_gemm()


def fp32_gemm(enabled: bool = True):
    """Context manager: GEMM-like ops on bf16 tensors compute in fp32 (no-op when not enabled)."""
    return _Fp32GemmMode() if enabled else contextlib.nullcontext()
