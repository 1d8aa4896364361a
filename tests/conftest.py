"""Shared fixtures: real data for everyone's tests, built once and cached under build/test-data/, and the
fault tests' run config and tmpfs mounts."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import skimage
import sklearn.datasets
from fault_helpers import STEPS as FAULT_STEPS
from launch_helpers import tiny_run_yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SKIMAGE = Path(skimage.__file__).parent / "data"
SKLEARN = Path(sklearn.datasets.__file__).parent / "images"
TEST_DATA = ROOT / "build" / "test-data"


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests are skipped (reported, not hidden) on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the CPU path of the same code is tested)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def jpeg_from(src: Path, dst: Path, mode: str = "RGB", max_side: int = 160, **save) -> None:
    """Save a (downscaled) copy of a packaged photo in another mode/format."""
    im = Image.open(src).convert(mode)
    im.thumbnail((max_side, max_side))
    im.save(dst, format=save.pop("format", "JPEG"), **save)


def build_tree(root: Path) -> dict:
    """root/train/<wnid>/*.JPEG (+ odd files), flat root/val + LOC-style CSV; returns expected labels."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    t = root / "train"
    for w in wnids:
        (t / w).mkdir(parents=True)
    # Baseline RGB JPEGs shipped by the packages, kept byte for byte.
    for name, cls in (("china.jpg", 0), ("flower.jpg", 1)):
        (t / wnids[cls] / f"{wnids[cls]}_{name.split('.')[0]}.JPEG").write_bytes(
            (SKLEARN / name).read_bytes()
        )
    (t / wnids[2] / f"{wnids[2]}_rocket.JPEG").write_bytes((SKIMAGE / "rocket.jpg").read_bytes())
    jpeg_from(SKIMAGE / "chelsea.png", t / wnids[0] / f"{wnids[0]}_chelsea.JPEG")
    jpeg_from(SKIMAGE / "astronaut.png", t / wnids[1] / f"{wnids[1]}_astronaut.JPEG")
    jpeg_from(SKIMAGE / "coffee.png", t / wnids[2] / f"{wnids[2]}_coffee.JPEG")
    # The real-ImageNet oddities: grayscale JPEG (kept), CMYK JPEG and PNG-named-.JPEG (re-encoded),
    # a truncated JPEG and a non-image (rejected).
    jpeg_from(SKIMAGE / "camera.png", t / wnids[0] / f"{wnids[0]}_camera.JPEG", mode="L")
    jpeg_from(SKIMAGE / "motorcycle_left.png", t / wnids[1] / f"{wnids[1]}_cmyk.JPEG", mode="CMYK")
    jpeg_from(SKIMAGE / "retina.jpg", t / wnids[2] / f"{wnids[2]}_png.JPEG", format="PNG")
    whole = (SKIMAGE / "hubble_deep_field.jpg").read_bytes()
    (t / wnids[0] / f"{wnids[0]}_truncated.JPEG").write_bytes(whole[: len(whole) // 3])
    (t / wnids[1] / f"{wnids[1]}_garbage.JPEG").write_bytes(b"this is not an image\n" * 10)
    # Flat validation layout + Kaggle LOC_val_solution.csv style ground truth.
    v = root / "val"
    v.mkdir()
    val = {
        "ILSVRC2012_val_00000001": (SKIMAGE / "coins.png", 2, "L"),
        "ILSVRC2012_val_00000002": (SKIMAGE / "hubble_deep_field.jpg", 0, "RGB"),
        "ILSVRC2012_val_00000003": (SKIMAGE / "motorcycle_right.png", 1, "RGB"),
        "ILSVRC2012_val_00000004": (SKIMAGE / "grass.png", 2, "RGB"),
    }
    rows = ["ImageId,PredictionString"]
    for stem, (src, cls, mode) in val.items():
        jpeg_from(src, v / f"{stem}.JPEG", mode=mode)
        rows.append(f"{stem},{wnids[cls]} 10 20 100 120 {wnids[cls]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    labels = {p.stem: wnids.index(p.parent.name) for p in t.rglob("*.JPEG")}
    labels.update({stem: cls for stem, (_, cls, _) in val.items()})
    return {"wnids": wnids, "labels": labels}


FMNIST_TRAIN, FMNIST_VAL, FMNIST_SHARD = 2048, 512, 512


def _cached(name: str, build) -> Path:
    """Build `TEST_DATA/name` once across processes and pytest sessions.

    A file lock serialises concurrent builders (parallel test processes share the cache), and the data is
    built in a temporary folder renamed into place, so a crashed build never looks finished.
    """
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    final = TEST_DATA / name
    with open(TEST_DATA / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "manifest.json").is_file():
            tmp = TEST_DATA / f".{name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    return final


@pytest.fixture(scope="session")
def fmnist_shards() -> Path:
    """Directory with a Fashion-MNIST subset as WebDataset shards (2048 train / 512 val, 10 classes).

    Layout: train-000000..000003.tar, val-000000.tar, matching .idx files, manifest.json. Use it as
    `DataConfig(train_shards=str(path), val_shards=str(path), num_classes=10, train_size=32, val_size=32,
    crop_pct=1.0)`: a directory selects the split from its manifest.
    """
    from pvt_dist.data.fashion_mnist import FMNIST_DIR, make_fashion_mnist_shards

    name = f"fmnist-{FMNIST_TRAIN}-{FMNIST_VAL}-v1"
    # Shards built elsewhere and carried here (the GPU machine, bench/gpu_prepare.py) need no source data.
    if not os.path.isdir(FMNIST_DIR) and not (TEST_DATA / name / "manifest.json").is_file():
        msg = f"{FMNIST_DIR} missing: apt-get install dataset-fashion-mnist"
        if os.environ.get("CI", "").lower() == "true":  # CI must not pass by skipping most of the suite
            pytest.fail(msg)
        pytest.skip(msg)
    build = lambda out: make_fashion_mnist_shards(
        out,
        limit_train=FMNIST_TRAIN,
        limit_val=FMNIST_VAL,
        shard_samples=FMNIST_SHARD,
        workers=1,
        progress=False,
    )
    return _cached(name, build)


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory):
    """(root, expectations) of a small ImageNet-style tree of real photos with the odd files of ImageNet."""
    root = tmp_path_factory.mktemp("imagenet-tree")
    return root, build_tree(root)


@pytest.fixture(scope="session")
def photo_shards(photo_tree, tmp_path_factory) -> Path:
    """photo_tree converted to shards (9 train in 3 shards, 4 val; 2 rejects)."""
    from pvt_dist.data.imagenet import make_imagenet_shards

    root, _ = photo_tree
    out = tmp_path_factory.mktemp("imagenet-shards")
    make_imagenet_shards(
        str(root),
        str(out),
        val_labels=str(root / "LOC_val_solution.csv"),
        shard_samples=4,
        workers=1,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory, fmnist_shards) -> Path:
    """The fault tests' run: pvt_v2_b0, 32 px, fp32, ZeRO-1, checkpoints every 2 steps."""
    path = tmp_path_factory.mktemp("faults-cfg") / "tiny.yaml"
    rest = f"""
optim: {{lr: 2.0e-3, scale_lr: false, weight_decay: 0.01}}
schedule: {{total_steps: {FAULT_STEPS}, warmup_steps: 1, min_lr: 1.0e-4}}
deepspeed: {{zero_stage: 1, precision: fp32, micro_batch: 16, grad_accum: 1}}
eval: {{every_steps: 1000, at_end: false}}
checkpoint: {{every_steps: 2, keep_last: 2}}
logging: {{log_every: 1, tensorboard: false}}
dist: {{backend: gloo, timeout_s: 20}}
"""
    path.write_text(tiny_run_yaml(fmnist_shards, rest))
    return path


@pytest.fixture
def mount_tmpfs():
    """mount_tmpfs(dir, "size=80m" | "ro"): a real filesystem with its own limits, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)
