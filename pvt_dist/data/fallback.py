"""Loader without DALI: webdataset reads the shards, PIL decodes, torchvision/timm transform.

Same rank plan, batch layout and resume semantics as the DALI backend, and the reference that DALI's
validation output is compared against. Worker w of a DataLoader decodes batches w, w+W, ... of the
rank's stream (every worker reads the stream, skipping foreign samples without decoding them); the
DataLoader's round-robin collection then returns the batches in order, independent of worker count.
Each sample's augmentation RNG is seeded from (seed, epoch, rank, batch, slot, view), so a resumed epoch
produces the same tensors as an uninterrupted one. With repeated augmentation a sample is decoded once and
transformed once per view.
"""

from __future__ import annotations

import io
import math
import random

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from pvt_dist.data.config import DataConfig
from pvt_dist.data.loader import ShardLoader, mix_seed, parse_label
from pvt_dist.data.stream import epoch_batches, rank_stream, sample_name

INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def build_transform(cfg: DataConfig, train: bool) -> T.Compose:
    """PIL image -> float tensor [C,S,S] normalized; mirrors the DALI graph in dali_pipeline.py."""
    channels = 3 if cfg.gray_to_rgb else 1
    interp = INTERP[cfg.interpolation]
    if train:
        ops = [
            T.RandomResizedCrop(cfg.train_size, scale=cfg.scale, ratio=cfg.ratio, interpolation=interp),
            T.RandomHorizontalFlip(cfg.hflip),
        ]
        if cfg.rand_augment:
            from timm.data.auto_augment import rand_augment_transform
            from timm.data.transforms import str_to_pil_interp

            # timm's transforms_imagenet_train: without "interpolation" timm's geometric ops would pick
            # bilinear or bicubic at random; DeiT/PVT's train transform passes the train interpolation.
            hparams = {
                "translate_const": int(cfg.train_size * 0.45),
                "img_mean": tuple(min(255, round(255 * m)) for m in cfg.mean),
                "interpolation": str_to_pil_interp(cfg.interpolation),
            }
            ops.append(rand_augment_transform(cfg.rand_augment, hparams))
    else:
        ops = [
            T.Resize(math.floor(cfg.val_size / cfg.crop_pct), interpolation=interp),
            T.CenterCrop(cfg.val_size),
        ]
    ops += [T.ToTensor(), T.Normalize(cfg.mean[:channels], cfg.std[:channels])]
    return T.Compose(ops)


class _EpochStream(IterableDataset):
    """One rank's epoch as batches (images [B,C,S,S], labels [B] with -1 padding, names)."""

    def __init__(self, loader: FallbackLoader, epoch: int, start_batch: int):
        self.cfg, self.shards = loader.cfg, loader.shards
        self.begin, self.end = loader.rank_samples(epoch)
        self.seed = loader.epoch_seed(epoch)
        self.train = loader.train
        self.num_batches, self.batch, self.start = loader.batches_per_epoch, loader.unique_batch, start_batch
        self.repeats, self.micro_batch = loader.repeats, loader.micro_batch
        self.transform = build_transform(self.cfg, self.train)
        self.loader, self.order = loader, loader.epoch_order(epoch) if loader.global_order else None
        if self.order is not None:  # augmentation from (seed, epoch, position): the same at any world size
            self.seed = mix_seed(loader.order_seed(epoch), 1)

    def _batches(self):
        """(batch index, samples, real count) of this rank from `start` on, in the global or rank order."""
        if self.order is None:
            stream = rank_stream(
                self.shards, self.begin, self.end, self.seed if self.train else None, self.cfg.shuffle_buffer
            )
            yield from epoch_batches(stream, self.end - self.begin, self.num_batches, self.batch, self.start)
            return
        table = self.loader.table
        for b in range(self.start, self.num_batches):
            indices = self.loader.batch_samples(self.order, b)
            jpgs, classes, _ = table.read_batch(indices)
            group = [
                {"jpg": jpg, "cls": cls, "__url__": table.urls[s], "__key__": table.keys[i], "__index__": i}
                for i, s, jpg, cls in zip(indices.tolist(), table.shard[indices].tolist(), jpgs, classes)
            ]
            yield b, group, len(group)

    def _decode(self, s: dict, seed: int) -> list[torch.Tensor]:
        """The sample's `repeats` views, each transformed with its own seed (view 0: `seed` itself)."""
        name = sample_name(s["__url__"], s["__key__"])
        try:
            im = Image.open(io.BytesIO(s["jpg"]))
            im = im.convert("RGB" if self.cfg.gray_to_rgb else "L")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise ValueError(f"{self.shards.field}: sample {name}: cannot decode .jpg: {e}") from None
        views = []
        for v in range(self.repeats):
            view_seed = seed if v == 0 else mix_seed(seed, v)
            random.seed(view_seed)
            torch.default_generator.manual_seed(view_seed)  # torch.manual_seed also inits CUDA lazily: ~6 ms
            views.append(self.transform(im))
        return views

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for b, group, real in self._batches():
            if (b - self.start) % nw != wid:
                continue
            # With num_workers=0 this runs in the trainer's process between steps: leave its RNGs as found.
            py_state, torch_state = random.getstate(), torch.get_rng_state()
            try:
                # Per sample: (batch, slot) in its rank's epoch, or its global number in the global order.
                seeds = [mix_seed(self.seed, *((s["__index__"],) if "__index__" in s else (b, j)))
                         for j, s in enumerate(group)]  # fmt: skip
                per_sample = [self._decode(s, seed) for s, seed in zip(group, seeds)]
                # [view 0 of every sample, view 1, ...], the DALI backend's layout
                images = torch.stack([views[v] for v in range(self.repeats) for views in per_sample])
                images = images[: self.micro_batch]
            finally:
                random.setstate(py_state)
                torch.set_rng_state(torch_state)
            names = [sample_name(s["__url__"], s["__key__"]) for s in group]
            labels = [
                parse_label(s["cls"], names[j], self.cfg.num_classes, self.shards.field) if j < real else -1
                for j, s in enumerate(group)
            ]
            labels, names = (
                (labels * self.repeats)[: self.micro_batch],
                (names * self.repeats)[: self.micro_batch],
            )
            yield images, torch.tensor(labels, dtype=torch.int64), names


class FallbackLoader(ShardLoader):
    """webdataset + PIL + torchvision backend of `build_loader` (see loader.py for the contract)."""

    def _run_epoch(self, epoch, start_batch, backend_state):
        workers = self.cfg.num_threads if self.cfg.fallback_workers is None else self.cfg.fallback_workers
        workers = min(workers, self.batches_per_epoch - start_batch)  # idle workers would only re-read
        dl = DataLoader(
            _EpochStream(self, epoch, start_batch),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch if workers else None,
            pin_memory=self.device.type == "cuda",
        )
        yield from dl
