"""Throughput of the detection stage: DALI COCO loader (train augmentation / eval), and a training step and an
inference forward of each detection head (DETR, Deformable-DETR) at their default sizes.

    python bench/detection_throughput.py --data data/labelme_coco --scale 0.25 0.5 [--backbone pvt_v2_b0]
        [--heads detr deformable] [--batches 20] [--device cpu] [--json out.json]

Prints one row per (part, scale): images/s and ms per batch. A train step is forward, set criterion
(Hungarian matching included) and backward on real loader batches; no optimizer, so only compute is timed.
Inference is the eval-mode forward plus post-processing under no_grad on validation batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pvt_dist.detection import (  # noqa: E402
    BackboneConfig,
    DETRConfig,
    LossConfig,
    PostProcess,
    build_criterion,
    build_detector,
)
from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader  # noqa: E402
from pvt_dist.detection.deformable_transformer import DeformableTransformerConfig  # noqa: E402
from pvt_dist.detection.detector import num_decoder_layers  # noqa: E402


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


def time_head(loader, head: str, backbone: str, batches: int, device: torch.device, train: bool) -> float:
    """Median seconds per batch of a train step (train=True) or an inference forward of ``head``
    (``deformable_two_stage``: the deformable head with two-stage queries and box refinement)."""
    ann = loader.annotations
    two_stage = head == "deformable_two_stage"
    cfg = DETRConfig(
        head="deformable" if two_stage else head,
        backbone=BackboneConfig(name=backbone),
        deformable=DeformableTransformerConfig(with_box_refine=two_stage, two_stage=two_stage),
        num_classes=ann.num_classes,
    )
    model = build_detector(cfg).to(device).train(train)
    crit = build_criterion(LossConfig(), ann.num_classes, num_decoder_layers(cfg), True, cfg.head, two_stage)
    post = PostProcess.for_model(model)
    data = _forever(loader)
    times = []
    for i in range(batches + 1):
        images, mask, targets, infos = next(data)
        t0 = time.perf_counter()
        if train:
            loss = crit.total(crit(model(images.to(device), mask.to(device)), targets))
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                post(model(images.to(device), mask.to(device)), torch.tensor([x["orig_size"] for x in infos]))
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
    ap.add_argument("--backbone", default="pvt_v2_b0", help="backbone of the detector rows")
    ap.add_argument(
        "--heads", nargs="+", default=["detr", "deformable"],
        choices=["detr", "deformable", "deformable_two_stage"],
        help="detection heads timed (each at its default size: DETR 100 queries on stage 4, Deformable-DETR "
        "300 queries on stages 2-4 + a stride-64 level; deformable_two_stage adds two-stage + box refine)",
    )  # fmt: skip
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
        parts = [("loader train", None, True), ("loader val", None, False)]
        parts += [(f"{h} {kind}", h, kind == "train") for h in args.heads for kind in ("train", "infer")]
        for part, head, train in parts:
            split = "train" if train else "val"
            loader = build_detection_loader(cfg, split, micro_batch=args.batch, device=device)
            if head is None:
                sec = time_loader(loader, args.batches)
            else:
                sec = time_head(loader, head, args.backbone, args.batches, device, train)
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
