"""Fashion-MNIST (Debian package dataset-fashion-mnist) -> RGB JPEG shards with its 10 classes."""

from __future__ import annotations

import gzip
import os

import numpy as np

from pvt_dist.data.make_shards import Sample, convert_split, write_manifest

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _read_idx_gz(path: str) -> np.ndarray:
    """IDX (big-endian header, uint8 payload) as used by the (Fashion-)MNIST distribution."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_fashion_mnist_shards(
    out: str,
    source: str = FMNIST_DIR,
    limit_train: int | None = None,
    limit_val: int | None = None,
    shard_samples: int = 10000,
    **kw,
) -> dict:
    """Fashion-MNIST train (60k) / test (10k, our "val") -> RGB JPEG shards with its 10 classes."""
    files = {"train": "train", "val": "t10k"}
    limits = {"train": limit_train, "val": limit_val}
    os.makedirs(out, exist_ok=True)
    done = {}
    for split, prefix in files.items():
        img_path = os.path.join(source, f"{prefix}-images-idx3-ubyte.gz")
        lbl_path = os.path.join(source, f"{prefix}-labels-idx1-ubyte.gz")
        for p in (img_path, lbl_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: missing (apt-get install dataset-fashion-mnist)")
        images, labels = _read_idx_gz(img_path), _read_idx_gz(lbl_path)
        ids = np.arange(len(images))
        if limits[split] is not None:  # a class-balanced-in-expectation random subset, fixed by the seed
            ids = np.sort(np.random.default_rng(kw.get("seed", 0)).permutation(ids)[: limits[split]])
        samples = [
            Sample(f"fmnist_{split}_{i:05d}", int(labels[i]), f"{img_path}#{i}", pixels=images[i])
            for i in ids
        ]
        done[split] = convert_split(samples, out, split, shard_samples=shard_samples, **kw)
    return write_manifest(out, "fashion-mnist", list(FMNIST_CLASSES), done, kw.get("seed", 0))
