"""Evaluation preprocessing of the DALI path vs timm's ``transforms_imagenet_eval``, on real photos.

    .venv/bin/python bench/eval_fidelity.py [--size 224 --crop-pct 0.875 --interpolation bicubic] [--json F]

The photos scikit-image and scikit-learn ship are cut to many sizes and aspect ratios (portrait, landscape,
panorama, smaller than the crop) and JPEG-encoded once. Each goes through
- DALI: this project's validation graph (``image_pipeline(train=False)``: CPU decode, shorter side to
  floor(size / crop_pct) bicubic, center crop, normalize);
- timm: PIL decode + ``timm.data.transforms_factory.transforms_imagenet_eval`` (the authors' eval);
- timm on DALI's decode: the same timm transform on the pixels DALI decoded, which isolates what the
  decoders alone contribute.
It prints mean / max |difference| of the normalized tensors (and in 0-255 pixel units), and the top-1
agreement of one fixed-seed pvt_v2_b0 (1000 classes) over the three inputs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pvt_dist.data import DataConfig  # noqa: E402

# (width, height) of the cut-outs: ImageNet-like, portrait, panorama, tall, square, smaller than the crop.
SHAPES = [(500, 375), (375, 500), (640, 427), (333, 500), (800, 240), (240, 640), (256, 256), (180, 130)]


def photos() -> list[tuple[str, Image.Image]]:
    import skimage
    import sklearn.datasets

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.datasets.__file__).parent / "images"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg"]
    out = [(n, Image.open(sk / n).convert("RGB")) for n in names]
    out += [(n, Image.open(sl / n).convert("RGB")) for n in ("china.jpg", "flower.jpg")]
    return out


def cut(im: Image.Image, w: int, h: int) -> Image.Image:
    """Largest centered region of aspect w:h, resized to w x h (LANCZOS: a clean photo at that size)."""
    W, H = im.size
    scale = min(W / w, H / h)
    cw, ch = int(w * scale), int(h * scale)
    box = ((W - cw) // 2, (H - ch) // 2, (W - cw) // 2 + cw, (H - ch) // 2 + ch)
    return im.crop(box).resize((w, h), Image.LANCZOS)


def make_jpegs() -> list[tuple[str, bytes]]:
    out = []
    for name, im in photos():
        for w, h in SHAPES:
            buf = io.BytesIO()
            cut(im, w, h).save(buf, format="JPEG", quality=90)
            out.append((f"{name.split('.')[0]}_{w}x{h}", buf.getvalue()))
    return out


def dali_outputs(jpegs: list[bytes], cfg: DataConfig, decoded_only: bool = False) -> list[np.ndarray]:
    """This project's DALI validation graph (CPU), or just its decoder when ``decoded_only``."""
    from nvidia.dali import fn, pipeline_def, types

    from pvt_dist.data.dali_pipeline import image_pipeline

    def source():
        yield (
            [np.frombuffer(j, np.uint8) for j in jpegs],
            [np.frombuffer(b"0", np.uint8)] * len(jpegs),
            [np.frombuffer(b"x", np.uint8)] * len(jpegs),
        )

    if decoded_only:

        @pipeline_def
        def decode():
            raw = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j in jpegs], batch=True)
            return fn.decoders.image(raw, device="cpu", output_type=types.RGB, adjust_orientation=False)

        pipe = decode(batch_size=len(jpegs), num_threads=1, device_id=None)
    else:
        pipe = image_pipeline(
            cfg=cfg, train=False, gpu=False, source=source(), batch_size=len(jpegs), num_threads=1,
            device_id=None, enable_checkpointing=False,
        )  # fmt: skip
    pipe.build()
    out = pipe.run()[0]
    return [np.array(out.at(i)) for i in range(len(jpegs))]


def timm_eval(cfg: DataConfig):
    from timm.data.transforms_factory import transforms_imagenet_eval

    return transforms_imagenet_eval(
        img_size=cfg.val_size,
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
    )


def compare(cfg: DataConfig) -> dict:
    items = make_jpegs()
    jpegs = [j for _, j in items]
    tf = timm_eval(cfg)
    dali = torch.stack([torch.from_numpy(x) for x in dali_outputs(jpegs, cfg)])  # [N, 3, S, S]
    timm_pil = torch.stack([tf(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    decoded = dali_outputs(jpegs, cfg, decoded_only=True)
    timm_dali_dec = torch.stack([tf(Image.fromarray(d)) for d in decoded])
    pil_dec = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    std255 = 255.0 * torch.tensor(cfg.std).view(1, 3, 1, 1)

    def diff(a, b):
        d = (a - b).abs()
        return {"mean": d.mean().item(), "max": d.max().item(), "mean_px": (d * std255).mean().item(),
                "max_px": (d * std255).max().item()}  # fmt: skip

    from pvt_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("pvt_v2_b0", num_classes=1000, img_size=cfg.val_size).eval()
    with torch.no_grad():
        preds = {
            k: model(v).argmax(1) for k, v in (("dali", dali), ("timm", timm_pil), ("mix", timm_dali_dec))
        }
    decoder = np.concatenate([np.abs(a.astype(np.int16) - b).ravel() for a, b in zip(decoded, pil_dec)])
    return {
        "images": len(items),
        "shapes": SHAPES,
        "dali_vs_timm": diff(dali, timm_pil),
        "dali_vs_timm_on_dali_decode": diff(dali, timm_dali_dec),
        "timm_dali_decode_vs_timm_pil": diff(timm_dali_dec, timm_pil),
        "decoder_px": {"mean": float(decoder.mean()), "max": int(decoder.max())},
        "top1_agree_dali_timm": (preds["dali"] == preds["timm"]).float().mean().item(),
        "top1_agree_timm_decoders": (preds["mix"] == preds["timm"]).float().mean().item(),
        "per_image_dali_vs_timm_px": {
            name: ((dali[i] - timm_pil[i]).abs() * std255[0]).mean().item()
            for i, (name, _) in enumerate(items)
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = DataConfig(val_size=args.size, crop_pct=args.crop_pct, interpolation=args.interpolation).validate()
    res = compare(cfg)
    short = math.floor(cfg.val_size / cfg.crop_pct)
    print(f"{res['images']} JPEGs (8 photos x {len(SHAPES)} shapes), resize {short} {cfg.interpolation}, "
          f"crop {cfg.val_size}")  # fmt: skip
    print("| compared | mean abs (normalized) | max abs (normalized) | mean abs (0-255) | max abs (0-255) |")
    print("|---|---|---|---|---|")
    for key, label in (
        ("dali_vs_timm", "DALI (CPU decode) vs timm (PIL decode)"),
        ("dali_vs_timm_on_dali_decode", "DALI vs timm transform on DALI's decode (resize/crop only)"),
        ("timm_dali_decode_vs_timm_pil", "timm on DALI decode vs timm on PIL decode (decoders only)"),
    ):
        d = res[key]
        print(f"| {label} | {d['mean']:.4f} | {d['max']:.3f} | {d['mean_px']:.3f} | {d['max_px']:.1f} |")
    print(
        f"decoded pixels, DALI vs PIL: mean {res['decoder_px']['mean']:.3f}, max {res['decoder_px']['max']}"
    )
    print(f"top-1 agreement, fixed-seed pvt_v2_b0: DALI vs timm {100 * res['top1_agree_dali_timm']:.1f}%, "
          f"timm on the two decodes {100 * res['top1_agree_timm_decoders']:.1f}%")  # fmt: skip
    worst = sorted(res["per_image_dali_vs_timm_px"].items(), key=lambda kv: -kv[1])[:3]
    print("largest per-image mean |diff| (0-255):", ", ".join(f"{k} {v:.2f}" for k, v in worst))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
