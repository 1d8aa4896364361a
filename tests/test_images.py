"""Images as users have them, each made on the spot from a packaged photo: an EXIF-rotated JPEG (detection
training/evaluation through DALI and launch/detect.py see the same upright image; a COCO JSON giving the
stored instead of the displayed size is refused naming image id and file), and the formats make_shards
re-encodes: 16-bit PNG (scaled, not clipped), palette with transparency and RGBA (composited on white)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from pvt_dist.data.make_shards import prepare_image
from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader
from pvt_dist.detection.export import load_image

PHOTO = Path(skimage.__file__).parent / "data" / "chelsea.png"  # 451 x 300 cat


def rotated_jpeg(path: Path) -> tuple[int, int]:
    """A JPEG stored 160 x 106 (w x h) with EXIF Orientation 6 (display rotated 90 degrees clockwise), as a
    phone writes it; returns the displayed (w, h)."""
    im = Image.open(PHOTO).convert("RGB")
    im.thumbnail((160, 160))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return im.height, im.width


def coco(tmp_path: Path, size: tuple[int, int]) -> Path:
    w, h = size
    dataset = {
        "images": [{"id": 1, "file_name": "cat.jpg", "width": w, "height": h}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 40], "area": 1200, "iscrowd": 0}
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "cat"}],
    }
    path = tmp_path / f"ann_{w}x{h}.json"
    path.write_text(json.dumps(dataset))
    return path


def loader(ann: Path, root: Path):
    cfg = DetectionDataConfig(
        train_ann=str(ann), train_images=str(root), val_ann=str(ann), val_images=str(root),
        scale_factor=0.25, device="cpu", num_threads=1,
    )  # fmt: skip
    return build_detection_loader(cfg, "val", micro_batch=1)


def test_exif_orientation_is_the_same_in_dali_and_detect(tmp_path):
    displayed = rotated_jpeg(tmp_path / "cat.jpg")
    assert displayed[0] < displayed[1], "portrait once rotated"
    pil = load_image(str(tmp_path / "cat.jpg"))  # what launch/detect.py feeds the model
    assert pil.size == displayed
    images, mask, targets, infos = next(iter(loader(coco(tmp_path, displayed), tmp_path)))
    assert infos[0]["orig_size"] == [displayed[1], displayed[0]]
    h, w = infos[0]["size"]
    assert w < h and abs(h / w - displayed[1] / displayed[0]) < 0.02
    # Same pixels: DALI's (normalized, resized) image against the PIL one resized alike.
    dali = images[0, :, :h, :w]
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    dali = (dali.numpy() * std + mean) * 255
    ref = np.asarray(pil.resize((w, h), Image.BICUBIC), dtype=np.float64).transpose(2, 0, 1)
    assert np.abs(dali - ref).mean() < 8, "DALI's image is not the upright one detect.py sees"
    unrotated = np.asarray(pil.transpose(Image.ROTATE_90).resize((w, h)), dtype=np.float64)  # wrong way
    assert np.abs(dali - unrotated.transpose(2, 0, 1)).mean() > 3 * np.abs(dali - ref).mean()


def test_coco_size_of_the_stored_image_is_refused_naming_it(tmp_path):
    displayed = rotated_jpeg(tmp_path / "cat.jpg")
    stored = (displayed[1], displayed[0])
    with pytest.raises(ValueError) as e:
        next(iter(loader(coco(tmp_path, stored), tmp_path)))
    msg = str(e.value)
    assert f"image id 1 ({tmp_path / 'cat.jpg'}): the JSON says {stored[0]}x{stored[1]}" in msg, msg
    assert f"the decoded image is {displayed[0]}x{displayed[1]}" in msg


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int32)


def test_16bit_png_is_scaled_not_clipped():
    gray = np.asarray(Image.open(PHOTO).convert("L").resize((96, 64)), dtype=np.uint16) * 257  # full range
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I"), "a real 16-bit PNG"
    data, note = prepare_image(buf.getvalue())
    assert note is not None and "PNG" in note
    out = decode(data)
    expected = (gray // 257).astype(np.int32)
    assert np.abs(out[..., 0] - expected).mean() < 2, "16-bit values were not scaled to 8 bits"
    assert (out == 255).mean() < 0.05  # clipping would turn nearly every pixel white


def test_palette_and_alpha_images_become_rgb_on_white():
    rgb = Image.open(PHOTO).convert("RGB").resize((96, 64))
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :48] = 0  # left half transparent
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    rgba_png = io.BytesIO()
    # Transparent pixels keep their stored color (here the photo's) unless composited.
    rgba.save(rgba_png, format="PNG")
    quant = rgb.quantize(63)
    pal_arr = np.asarray(quant).astype(np.uint8) + 1  # index 0 is kept for the transparent color
    pal_arr[:, :48] = 0
    pal = Image.fromarray(pal_arr, mode="P")
    pal.putpalette([0, 0, 0] + quant.getpalette()[: 63 * 3])
    pal_png = io.BytesIO()
    pal.save(pal_png, format="PNG", transparency=0)
    for name, buf, opaque_ref in (
        ("RGBA", rgba_png, np.asarray(rgb, dtype=np.int32)),
        ("palette", pal_png, np.asarray(pal.convert("RGB"), dtype=np.int32)),
    ):
        out = decode(prepare_image(buf.getvalue())[0])
        assert np.abs(out[:, :44] - 255).mean() < 3, f"{name}: transparent half is not white"
        assert np.abs(out[:, 52:] - opaque_ref[:, 52:]).mean() < 6, f"{name}: opaque half changed"
