"""Throughput of the detection stage: DALI COCO loader (train augmentation / eval) and a DETR training step.

    python bench/detection_throughput.py --data data/labelme_coco --scale 0.25 0.5 [--backbone pvt_v2_b0]
        [--batches 20] [--device cpu] [--json out.json]

Prints one row per (part, scale): images/s and ms per batch. The DETR step is forward, set criterion
(Hungarian matching included) and backward on real loader batches; no optimizer, so only compute is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pvt_dist.detection import BackboneConfig, DETRConfig, LossConfig, build_criterion, build_detr  # noqa: E402
from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader  # noqa: E402


def time_loader(loader, batches: int) -> float:
    """Seconds per batch over ``batches`` batches after one warm-up batch."""
    it = _forever(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches


def _forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_detr(loader, backbone: str, batches: int, device: torch.device) -> float:
    ann = loader.annotations
    model = build_detr(DETRConfig(backbone=BackboneConfig(name=backbone), num_classes=ann.num_classes)).to(
        device
    )
    crit = build_criterion(LossConfig(), ann.num_classes, 6, True)
    data = _forever(loader)
    times = []
    for i in range(batches + 1):
        images, mask, targets, _ = next(data)
        t0 = time.perf_counter()
        loss = crit.total(crit(model(images.to(device), mask.to(device)), targets))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step pays for allocations
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/labelme_coco", help="COCO folder (fetch_example_data output)")
    ap.add_argument("--scale", type=float, nargs="+", default=[0.25, 0.5], help="data.scale_factor values")
    ap.add_argument("--batch", type=int, default=2, help="images per batch")
    ap.add_argument("--batches", type=int, default=10, help="timed batches per row")
    ap.add_argument(
        "--backbone", default="pvt_v2_b0", help="backbone of the DETR step (default DETR transformer)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="DALI device and model device")
    ap.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    ann = str(Path(args.data) / "annotations.json")
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    rows = []
    for scale in args.scale:
        cfg = DetectionDataConfig(
            train_ann=ann,
            train_images=args.data,
            val_ann=ann,
            val_images=args.data,
            scale_factor=scale,
            device=args.device,
            num_threads=args.threads,
        )
        for part in ("loader train", "loader val", f"detr step {args.backbone}"):
            split = "val" if part == "loader val" else "train"
            loader = build_detection_loader(cfg, split, micro_batch=args.batch, device=device)
            if part.startswith("loader"):
                sec = time_loader(loader, args.batches)
            else:
                sec = time_detr(loader, args.backbone, args.batches, device)
            rows.append(
                {"part": part, "scale": scale, "images_per_s": args.batch / sec, "ms_per_batch": 1e3 * sec}
            )
    print(f"{'part':<24s} {'scale':>6s} {'img/s':>9s} {'ms/batch':>9s}")
    for r in rows:
        print(f"{r['part']:<24s} {r['scale']:>6.2f} {r['images_per_s']:>9.1f} {r['ms_per_batch']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
