"""COCO annotation loading, validation and the category id <-> contiguous label mapping.

Bad ground truth is rejected when the annotation file is read, before any training step, with the image
id and annotation id in the message, instead of surfacing later as an assert inside the loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pvt_dist.paths import stays_inside

BOX_TOLERANCE = 1.0
"""Pixels a box may extend past the image border (COCO has rounding overshoots of a fraction of a pixel)."""


def validate_coco_dataset(
    dataset: dict, source: str, image_root: str | os.PathLike | None = None, tol: float = BOX_TOLERANCE
) -> None:
    """Raise ValueError naming ``source``, the image id and the annotation id of the first bad entry.

    Checks: required keys; unique positive ids (pycocotools treats annotation id 0 as "unmatched");
    image sizes; every annotation's image and category exist; bbox finite with non-negative width and
    height and inside its image (within ``tol`` pixels); image files exist when ``image_root`` is given.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{source}: missing or non-list key {key!r}")
    images: dict[int, dict] = {}
    files: dict[str, int] = {}
    for img in dataset["images"]:
        iid = img.get("id")
        if not isinstance(iid, int) or iid in images:
            raise ValueError(f"{source}: image id {iid!r} is missing, not an int or repeated")
        if not (img.get("width", 0) > 0 and img.get("height", 0) > 0):
            raise ValueError(
                f"{source}: image id {iid}: width/height must be > 0, got {img.get('width')}x"
                f"{img.get('height')}"
            )
        if "file_name" not in img:
            raise ValueError(f"{source}: image id {iid}: no file_name")
        if not stays_inside(str(img["file_name"])):
            raise ValueError(
                f"{source}: image id {iid}: file_name {img['file_name']!r} leaves the image folder "
                "(absolute or with ..)"
            )
        if img["file_name"] in files:  # DALI's COCO reader would silently read only one of them
            raise ValueError(
                f"{source}: image ids {files[img['file_name']]} and {iid} share file {img['file_name']}"
            )
        files[img["file_name"]] = iid
        if image_root is not None and not (Path(image_root) / img["file_name"]).is_file():
            raise ValueError(
                f"{source}: image id {iid}: file {Path(image_root) / img['file_name']} does not exist"
            )
        images[iid] = img
    cat_ids = set()
    for cat in dataset["categories"]:
        if not isinstance(cat.get("id"), int) or cat["id"] in cat_ids:
            raise ValueError(f"{source}: category id {cat.get('id')!r} is missing, not an int or repeated")
        cat_ids.add(cat["id"])
    ann_ids = set()
    for ann in dataset["annotations"]:
        aid, iid = ann.get("id"), ann.get("image_id")
        where = f"{source}: image id {iid}, annotation id {aid}"
        if not isinstance(aid, int) or aid < 1 or aid in ann_ids:
            raise ValueError(
                f"{where}: annotation ids must be unique ints >= 1 (pycocotools treats 0 as "
                "'no match'; renumber from 1)"
            )
        ann_ids.add(aid)
        if iid not in images:
            raise ValueError(f"{where}: unknown image id")
        if ann.get("category_id") not in cat_ids:
            raise ValueError(
                f"{where}: unknown category id {ann.get('category_id')!r} (known: {sorted(cat_ids)})"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise ValueError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise ValueError(f"{where}: non-finite bbox {bbox}")
        if w < 0 or h < 0:
            raise ValueError(f"{where}: negative width or height in bbox {bbox}")
        W, H = images[iid]["width"], images[iid]["height"]
        if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
            raise ValueError(f"{where}: bbox {bbox} lies outside the {W}x{H} image")


class CocoAnnotations:
    """A validated COCO annotation file plus the label mapping the model uses.

    Labels are contiguous 0..K-1 in ascending category id order; ``label_to_cat[label]`` maps back.
    """

    def __init__(self, ann_file: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        try:
            self.dataset = json.loads(self.ann_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file}: not valid JSON ({e})") from e
        self.image_root = Path(image_root) if image_root is not None else None
        validate_coco_dataset(self.dataset, str(self.ann_file), self.image_root)
        cats = sorted(self.dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat: list[int] = [c["id"] for c in cats]
        self.cat_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_cat)}
        self.class_names: list[str] = [c["name"] for c in cats]
        self.images: dict[int, dict] = {img["id"]: img for img in self.dataset["images"]}

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat)

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.images)

    def __len__(self) -> int:
        return len(self.images)
