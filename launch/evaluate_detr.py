"""COCO box mAP of an exported detector over a COCO-format split, sharded across ranks.

    python launch/evaluate_detr.py --weights runs/detr/detector.pth --ann val.json --images val_dir/
    torchrun --nproc_per_node 8 launch/evaluate_detr.py --weights ... --ann ... --images ...

Every image is scored exactly once (ranks' detections are gathered, padded duplicates dropped); rank 0 prints
the standard 12-line COCO summary and, with --json, writes the 12 stats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> dict:
    from pvt_dist.cluster import distributed as pdist
    from pvt_dist.config import DistConfig
    from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader
    from pvt_dist.detection.evaluate import evaluate_coco
    from pvt_dist.detection.export import load_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="detector export written by finetune_detr.py")
    ap.add_argument("--ann", required=True, help="COCO JSON of the split to evaluate")
    ap.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    ap.add_argument(
        "--batch", type=int, default=1, help="images per rank per forward (1 avoids padding effects)"
    )
    ap.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "gpu"], help="DALI decode/augment device"
    )
    ap.add_argument("--json", default=None, help="also write the 12 stats here")
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    args = ap.parse_args(argv)
    env = pdist.detect_env()
    if env.world_size > 1:
        env, device = pdist.init_distributed(DistConfig(), env)
    else:
        device = pdist.device_for(env)
    model, meta = load_detector(args.weights)
    model.to(device)
    data_cfg = DetectionDataConfig(
        train_ann=args.ann,
        train_images=args.images,
        val_ann=args.ann,
        val_images=args.images,
        device=args.device,
        **meta["data"],
    )
    loader = build_detection_loader(
        data_cfg, "val", env.rank, env.world_size, micro_batch=args.batch, device=device
    )
    if loader.annotations.label_to_cat != meta["label_to_cat"]:
        raise ValueError(
            f"{args.ann}: categories {loader.annotations.label_to_cat} differ from the detector's "
            f"{meta['label_to_cat']}"
        )
    stats, _ = evaluate_coco(model, loader, device)
    if env.rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=1)
    pdist.cleanup()
    return stats


if __name__ == "__main__":
    main()
