"""Parameter and GMAC table for every variant.

    python -m pvt_dist.models.summary --size 224 [--models pvt_small pvt_v2_b2] [--json out.json]

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (which counts matmuls, convolutions and
attention as 2 FLOPs per multiply-add; norms and activations are not counted, as in the papers) over
one image in eval mode.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .registry import build_model, list_models


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Forward FLOPs of ``model(*inputs)`` in eval mode (drop path and dropout off)."""
    was_training = model.training
    model.eval()
    # The counter's module tracker hooks every module input that requires grad, and fails on a parameter
    # passed straight into a submodule (Deformable-DETR's query embedding): count with grads off.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    # The fused CPU attention kernel is invisible to the counter; the math backend decomposes attention
    # into matmuls it does count (the authors' tables include the attention products).
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops()


def count_flops(model: torch.nn.Module, size: int | tuple[int, int], batch: int = 1) -> int:
    """Forward FLOPs of ``model`` on a ``batch`` of 3 x size images."""
    h, w = (size, size) if isinstance(size, int) else size
    return forward_flops(model, torch.zeros(batch, 3, h, w))


def summarize(names: list[str], size: int, num_classes: int = 1000) -> list[dict]:
    rows = []
    for name in names:
        model = build_model(name, num_classes=num_classes, img_size=size)
        rows.append(
            dict(model=name, params=count_params(model), gmacs=count_flops(model, size) / 2e9, size=size)
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<14} {'params':>12} {'GMACs':>8}", "-" * 36]
    lines += [f"{r['model']:<14} {r['params']:>12,} {r['gmacs']:>8.2f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--models", nargs="*", default=None, help="variants (default: all)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = args.models or list_models()
    rows = summarize(names, args.size, args.num_classes)
    print(f"PVT variants at {args.size}x{args.size}, {args.num_classes} classes")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
