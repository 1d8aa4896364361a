"""Forward+backward throughput of a PVT variant, with timm's PVTv2 of the same configuration as baseline.

    python bench/model_throughput.py --model pvt_v2_b2 --batch 8 --size 224 --dtype fp32 bf16 [--device cuda]

Prints one row per (implementation, dtype): images/s, ms per step, and the ratio ours / timm.
Synthetic inputs; an SGD-free step (forward, loss, backward, zero grads) so only the model is timed. The
two models take turns step by step (median of ``--iters`` steps each), so load drift hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pvt_dist.models import build_model  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, batch, size, dtype, device, channels_last=False):
    """A closure running one forward+backward step of ``model`` on a fixed synthetic batch."""
    model.to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        model.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=DTYPES[dtype]) if DTYPES[dtype] else contextlib.nullcontext()

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict, device, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per step of each closure, the closures taking turns step by step.

    The order flips every round: the model that runs right after the other one pays for re-touching
    its memory (page faults, cache), and taking turns spreads that cost and any load drift evenly.
    """
    names = list(steps)
    times = {n: [] for n in names}
    for i in range(warmup + iters):
        for n in names if i % 2 == 0 else names[::-1]:
            sync(device)
            t0 = time.perf_counter()
            steps[n]()
            sync(device)
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def timm_baseline(name: str):
    """timm's model of the same configuration, or None (timm has PVTv2 but not PVT v1)."""
    if name in timm.list_models("pvt_v2*"):
        return timm.create_model(name, num_classes=1000, drop_path_rate=0.0)
    return None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pvt_v2_b2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for dtype in args.dtype:
        steps = {}
        for impl, ctor in (("pvt_dist", lambda: build_model(args.model, drop_path_rate=0.0)),
                           ("timm", lambda: timm_baseline(args.model))):  # fmt: skip
            torch.manual_seed(0)
            model = ctor()
            if model is not None:
                steps[impl] = make_step(model, args.batch, args.size, dtype, device)
        results = time_interleaved(steps, device, args.warmup, args.iters)
        del steps
        for impl, sec in results.items():
            ratio = results["timm"] / sec if "timm" in results else float("nan")
            rows.append(dict(impl=impl, model=args.model, dtype=dtype, batch=args.batch, size=args.size,
                             device=str(device), ms_per_step=sec * 1e3, img_per_s=args.batch / sec,
                             speed_vs_timm=ratio))  # fmt: skip
    print(f"{args.model} forward+backward, batch {args.batch}, {args.size}px, {device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'impl':<10} {'dtype':<6} {'ms/step':>9} {'img/s':>8} {'vs timm':>8}")
    for r in rows:
        print(f"{r['impl']:<10} {r['dtype']:<6} {r['ms_per_step']:>9.1f} {r['img_per_s']:>8.1f} "
              f"{r['speed_vs_timm']:>8.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
