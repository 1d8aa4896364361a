"""Images/s of the train and val input pipelines: DALI (cpu, and gpu when CUDA is present) vs the fallback.

    .venv/bin/python bench/data_throughput.py                      # real photos at ImageNet size (built once)
    .venv/bin/python bench/data_throughput.py --shards data/in1k --size 224 --batch 128 --json out.json

All backends read the same shards with the same batch size; each row is one rank reading the whole split
(world size 1). After `--warmup` batches the prefetch queue is drained (its batches were made while the
consumer was not timing), so the `--batches` timed batches are all produced inside the timed window.
Training rows apply the recipe's augmentation (configs/pretrain/_imagenet_recipe.yaml: RandAugment
rand-m9-mstd0.5-inc1 and random erasing 0.25; `--aug basic` for crop + flip only). The DALI "mixed" row
(nvJPEG on the GPU) is reported as skipped without a CUDA GPU. The default data set is a few hundred
real photos (scikit-image / scikit-learn samples, resized to ImageNet's typical ~500x375 and re-encoded at
several qualities), so the JPEG decode cost is representative, unlike 28x28 Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pvt_dist.data import DataConfig, build_loader  # noqa: E402
from pvt_dist.data.imagenet import make_imagenet_shards  # noqa: E402

PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
]


def sample_photos() -> list[Path]:
    """The real photos scikit-image and scikit-learn ship."""
    import skimage
    import sklearn.datasets

    srcs = [Path(skimage.__file__).parent / "data" / p for p in PHOTOS]
    return srcs + [Path(sklearn.datasets.__file__).parent / "images" / p for p in ("china.jpg", "flower.jpg")]


def photo_shards_dir(copies: int, photos: str | None = None) -> Path:
    """Where the shards of ``copies`` copies per photo are cached (one folder per size of the set)."""
    return ROOT / "build/bench-data" / (f"photos-x{copies}" if not photos else f"photos-dir-x{copies}")


def build_photo_shards(out: Path, copies: int, photos: Path | None = None) -> Path:
    """ImageNet-like shards of real photos: 2 classes x photos x copies, each copy a distinct JPEG.

    ``photos``: a folder of images to use instead of the scikit-image / scikit-learn samples (the GPU
    machine has neither package; bench/gpu_wheels.sh carries the same photos as files).
    """
    from PIL import Image

    if (out / "manifest.json").is_file():
        return out
    srcs = sorted(p for p in photos.iterdir() if p.is_file()) if photos else sample_photos()
    tree = out.with_name(out.name + "-tree")
    for split, n in (("train", copies), ("val", copies)):
        for c, cls in enumerate(("n00000001", "n00000002")):
            d = tree / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i, src in enumerate(srcs[c::2]):
                im = Image.open(src).convert("RGB")
                im.thumbnail((500, 500))
                for k in range(n):  # distinct bytes per copy: the quality varies the compressed stream
                    im.save(d / f"{cls}_{i}_{k}.JPEG", quality=75 + k % 20)
    make_imagenet_shards(str(tree), str(out), shard_samples=256, workers=1, progress=False)
    return out


def recipe_augmentation() -> dict:
    """RandAugment and random erasing of the authors' recipe, read from its config file."""
    import yaml

    data = yaml.safe_load((ROOT / "configs/pretrain/_imagenet_recipe.yaml").read_text())["data"]
    return {"rand_augment": data["rand_augment"], "random_erase": data["random_erase"]}


def prefetched_batches(cfg: DataConfig) -> int:
    """Batches a loader holds ready ahead of the consumer: DALI's queue, or the DataLoader workers'."""
    if cfg.backend == "dali":
        return cfg.prefetch
    return cfg.prefetch * (cfg.fallback_workers or 0)


def measure(
    cfg: DataConfig, split: str, batch: int, batches: int, warmup: int, device: str
) -> tuple[float, float]:
    """(images/s, CPU ms per image of this process: all DALI threads, but no DataLoader worker processes)."""
    loader = build_loader(cfg, split, 0, 1, seed=0, micro_batch=batch, device=device)
    drain = prefetched_batches(cfg)
    n = min(batches + warmup + drain, loader.batches_per_epoch)
    if n <= warmup + drain:
        raise SystemExit(f"{split}: only {loader.batches_per_epoch} batches per epoch; use a smaller --batch")
    it = iter(loader)
    for _ in range(warmup + drain):  # the last `drain` of these were ready before anyone asked
        next(it)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n - warmup - drain):
        images, _ = next(it)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    images_done = (n - warmup - drain) * batch
    return images_done / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / images_done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None, help="shard directory with manifest.json (default: real photos)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the manifest")
    p.add_argument("--size", type=int, default=224, help="train crop / val crop side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="timed batches per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="DALI threads / fallback DataLoader workers")
    p.add_argument("--copies", type=int, default=64, help="copies per photo in the default data set")
    p.add_argument("--photos", default=None, help="folder of photos for the default data set (GPU machine)")
    p.add_argument("--aug", default="recipe", choices=["recipe", "basic"],
                   help="train rows: recipe = RandAugment + random erasing; basic = crop + flip")  # fmt: skip
    p.add_argument("--backends", nargs="+", default=["dali", "fallback"], choices=["dali", "fallback"])
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shards = (
        Path(args.shards)
        if args.shards
        else build_photo_shards(
            photo_shards_dir(args.copies, args.photos), args.copies, args.photos and Path(args.photos)
        )
    )
    with open(shards / "manifest.json") as f:
        manifest = json.load(f)
    num_classes = args.num_classes or len(manifest["classes"])
    base = DataConfig(
        train_shards=str(shards), val_shards=str(shards), num_classes=num_classes, train_size=args.size,
        val_size=args.size, num_threads=args.threads, shuffle_buffer=512,
    )  # fmt: skip
    aug = recipe_augmentation() if args.aug == "recipe" else {}
    # (backend, DALI device, output device, fallback worker processes)
    setups = [
        ("dali", "gpu", "cuda", None),
        ("dali", "cpu", "cpu", None),
        ("fallback", "cpu", "cpu", args.threads),
        ("fallback", "cpu", "cpu", 0),
    ]
    rows = []
    print(f"shards: {shards} ({manifest['splits']['train']['num_samples']} train / "
          f"{manifest['splits']['val']['num_samples']} val), size {args.size}, batch {args.batch}, "
          f"threads {args.threads}, cpus {os.cpu_count()}; train aug {aug or 'crop + flip'}")  # fmt: skip
    print(f"{'backend':<10} {'decode':<7} {'workers':<8} {'split':<6} {'img/s':>9} {'cpu ms/img':>11}")
    for backend, dali_device, out_device, workers in [s for s in setups if s[0] in args.backends]:
        decode = "mixed" if dali_device == "gpu" else dali_device
        label = "-" if workers is None else str(workers)
        for split in args.splits:
            row = dict(backend=backend, device=decode, fallback_workers=workers, split=split,
                       augmentation=(aug or None) if split == "train" else None)  # fmt: skip
            if out_device == "cuda" and not torch.cuda.is_available():
                rows.append(row | {"images_per_s": None, "skipped": "no CUDA GPU"})
                na = "n/a"
                print(
                    f"{backend:<10} {decode:<7} {label:<8} {split:<6} {na:>9} {na:>11}  skipped: no CUDA GPU"
                )
                continue
            cfg = base.replace(backend=backend, device=dali_device, fallback_workers=workers)
            if split == "train":
                cfg = cfg.replace(**aug)
            ips, cpu_ms = measure(cfg, split, args.batch, args.batches, args.warmup, out_device)
            cpu = f"{cpu_ms:11.2f}" if not workers else f"{'n/a':>11}"  # worker processes are not counted
            rows.append(
                row | {"images_per_s": round(ips, 1), "cpu_ms_per_image": None if workers else cpu_ms}
            )
            print(f"{backend:<10} {decode:<7} {label:<8} {split:<6} {ips:>9.1f} {cpu}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
