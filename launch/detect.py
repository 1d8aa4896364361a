"""Detect objects in one image with an exported detector and draw them.

python launch/detect.py --weights runs/detr/detector.pth image.jpg --out out.png [--threshold 0.5]
    [--ann annotations.json]

With ``--ann`` (a COCO file listing the image by its file name) the ground truth is drawn in white and the
drawn detections are counted against it: objects found, duplicates (a second box on a found object) and
false positives, at IoU 0.5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from pvt_dist.detection.box_ops import box_xywh_to_xyxy, match_detections
from pvt_dist.detection.draw import draw_detections
from pvt_dist.detection.export import load_detector, load_image
from pvt_dist.detection.postprocess import PostProcess


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help="input image (any format PIL reads)")
    ap.add_argument("--weights", required=True, help="detector export written by finetune_detr.py")
    ap.add_argument("--out", required=True, help="output PNG with the boxes drawn")
    ap.add_argument("--threshold", type=float, default=0.5, help="minimum score of a drawn detection")
    ap.add_argument("--ann", help="COCO annotations holding this image: draw its ground truth, count matches")
    args = ap.parse_args(argv)
    gt = ground_truth(args.ann, args.image) if args.ann else None
    model, meta = load_detector(args.weights)
    # Upright as DALI decodes it in training and evaluation (EXIF orientation applied, see load_image).
    image = load_image(args.image)
    d = meta["data"]
    w, h = image.size
    # Evaluation-time resize: short side val_size (scaled), long side capped at max_size (scaled).
    short = round(d["val_size"] * d["scale_factor"])
    short = min(short, round(d["max_size"] * d["scale_factor"]) * min(w, h) / max(w, h))
    size = [round(h * short / min(w, h)), round(w * short / min(w, h))]
    x = TF.normalize(TF.to_tensor(TF.resize(image, size, antialias=True)), d["mean"], d["std"])[None]
    with torch.no_grad():
        outputs = model(x, torch.zeros(1, *x.shape[-2:], dtype=torch.bool))
    det = PostProcess.for_model(model)(outputs, torch.tensor([[h, w]]))[0]
    keep = det["scores"] >= args.threshold
    det = {k: v[keep] for k, v in det.items()}
    draw_detections(image, det["boxes"], det["labels"], det["scores"], meta["class_names"], gt).save(args.out)
    names = meta["class_names"]
    found = [
        {
            "class": names[int(lab)] if int(lab) < len(names) else str(int(lab)),
            "score": round(float(s), 3),
            "box": [round(v, 1) for v in b.tolist()],
        }
        for b, lab, s in zip(det["boxes"], det["labels"], det["scores"])
    ]
    for f in sorted(found, key=lambda f: -f["score"]):
        print(f"{f['class']:>16s} {f['score']:.3f} {f['box']}")
    print(f"{len(found)} detections >= {args.threshold} -> {args.out}")
    if gt is not None:
        m = match_detections(det["boxes"], det["scores"], gt)
        print(
            f"ground truth {m['ground_truth']}: found {m['found']}, duplicates {m['duplicates']}, "
            f"false positives {m['false_positives']} (IoU >= 0.5)"
        )
    return found


def ground_truth(ann_path: str, image_path: str) -> torch.Tensor:
    """[G, 4] absolute xyxy boxes of the image whose COCO ``file_name`` ends like ``image_path``."""
    coco = json.loads(Path(ann_path).read_text())
    name = Path(image_path).name
    ids = [im["id"] for im in coco["images"] if Path(im["file_name"]).name == name]
    if not ids:
        raise SystemExit(f"detect.py: --ann {ann_path} has no image named {name}")
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == ids[0] and not a.get("iscrowd", 0)]
    return box_xywh_to_xyxy(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


if __name__ == "__main__":
    main()
