"""Shared fixtures data for the detection tests: the labelme COCO example (fetched once with pip)."""

from pathlib import Path

from pvt_dist.detection.fetch_example_data import fetch_example

ROOT = Path(__file__).resolve().parents[1]


def labelme_example() -> Path:
    """build/test-data/labelme_coco (annotations.json + JPEGImages/), extracted from the labelme sdist."""
    return fetch_example(ROOT / "build" / "test-data" / "labelme_coco", ROOT / "build" / "downloads").parent
