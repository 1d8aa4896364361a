"""Detect objects in one image with an exported detector and draw them.

python launch/detect.py --weights runs/detr/detector.pth image.jpg --out out.png [--threshold 0.5]
"""

from __future__ import annotations

import argparse

import torch
import torchvision.transforms.functional as TF

from pvt_dist.detection.draw import draw_detections
from pvt_dist.detection.export import load_detector, load_image
from pvt_dist.detection.postprocess import PostProcess


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help="input image (any format PIL reads)")
    ap.add_argument("--weights", required=True, help="detector export written by finetune_detr.py")
    ap.add_argument("--out", required=True, help="output PNG with the boxes drawn")
    ap.add_argument("--threshold", type=float, default=0.5, help="minimum score of a drawn detection")
    args = ap.parse_args(argv)
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
    draw_detections(image, det["boxes"], det["labels"], det["scores"], meta["class_names"]).save(args.out)
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
    return found


if __name__ == "__main__":
    main()
