"""COCO-format detection data through DALI: reader, DETR augmentation, padding with masks, sharding.

One pipeline definition serves both devices: JPEGs are decoded by ``decoders.image(device="cpu")`` or
``"mixed"`` (nvJPEG) depending on the device picked at build time; all geometry (resize sizes, crop windows,
boxes) is computed on the CPU from the encoded image's shape, so both paths produce the same sizes.

A batch is ``(images [B, 3, H, W] float, mask [B, H, W] bool (True = padding), targets, infos)``:
``targets[b]`` = ``{'labels': int64 [N] contiguous, 'boxes': float [N, 4] cxcywh normalized by the
un-padded augmented size}`` and ``infos[b]`` = ``{'image_id', 'orig_size' (h, w), 'size' (h, w)}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pvt_dist.data.dali_import import dmath, fn, pipeline_def, types
from pvt_dist.data.dali_pipeline import decoder_args
from pvt_dist.data.loader import host_to_device

from .box_ops import box_xyxy_to_cxcywh
from .targets import CocoAnnotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectionDataConfig:
    """COCO-format data and DETR's augmentation. Sizes are DETR's, multiplied by ``scale_factor``."""

    train_ann: str = ""
    """COCO JSON of the training split."""
    train_images: str = ""
    """Folder the training ``file_name`` entries are relative to."""
    val_ann: str = ""
    """COCO JSON of the validation split (evaluated with pycocotools)."""
    val_images: str = ""
    """Folder the validation ``file_name`` entries are relative to."""
    nominal_train_images: int | None = None
    """Images of the full training split the recipe is written for (COCO train2017: 118,287). Only
    ``--plan`` reads it, to count epochs when ``train_ann`` cannot be read; real runs count the file."""
    nominal_val_images: int | None = None
    """The same for the validation split (COCO val2017: 5,000)."""
    scale_factor: float = 1.0
    """Multiplies every size below; e.g. 0.25 for quick CPU runs (short side 120-200, max 333)."""
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    """Short-side sizes picked uniformly per training image (multi-scale)."""
    max_size: int = 1333
    """Longest side after resizing (the short side shrinks to respect it)."""
    crop_prob: float = 0.5
    """Probability of the random-crop branch (resize short side, random crop, then multi-scale resize)."""
    crop_resize: list[int] = field(default_factory=lambda: [400, 500, 600])
    """Short sides the crop branch resizes to before cropping."""
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    """Crop width and height are drawn uniformly from [min, min(max, image side)]."""
    hflip_prob: float = 0.5
    """Horizontal flip probability."""
    val_size: int = 800
    """Short side at evaluation."""
    device: str = "auto"
    """"cpu", "gpu" (nvJPEG "mixed" decoding and GPU augmentation) or "auto" (gpu when CUDA is available)."""
    num_threads: int = 2
    """DALI CPU worker threads."""
    prefetch: int = 2
    """DALI prefetch queue depth."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel mean of RGB in [0, 1]."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel std of RGB in [0, 1]."""

    def scaled(self, v: float) -> int:
        return max(1, int(round(v * self.scale_factor)))

    def validate(self) -> None:
        for key in ("train_ann", "train_images", "val_ann", "val_images"):
            if not getattr(self, key):
                raise ValueError(f"data.{key}: must be set")
        for key in ("nominal_train_images", "nominal_val_images"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"data.{key}: must be null or a positive integer, got {v!r}")
        if self.scale_factor <= 0:
            raise ValueError(f"data.scale_factor: must be > 0, got {self.scale_factor}")
        if not self.train_scales or min(self.train_scales) <= 0:
            raise ValueError(
                f"data.train_scales: must be a non-empty list of positive sizes, got {self.train_scales}"
            )
        if len(self.crop_size) != 2 or not 0 < self.crop_size[0] <= self.crop_size[1]:
            raise ValueError(f"data.crop_size: must be [min, max] with 0 < min <= max, got {self.crop_size}")
        if not self.crop_resize or min(self.crop_resize) < self.crop_size[0]:
            raise ValueError(
                f"data.crop_resize: sizes must be >= crop_size min {self.crop_size[0]}, got "
                f"{self.crop_resize}"
            )
        for key in ("crop_prob", "hflip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"data.device: must be auto, cpu or gpu, got {self.device!r}")
        if self.device == "gpu" and not torch.cuda.is_available():
            raise ValueError("data.device: 'gpu' requested but CUDA is not available")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"data.mean/std: need 3 values each, got {self.mean} / {self.std}")


def _float(x):
    return fn.cast(x, dtype=types.FLOAT)


def _short_side_size(h, w, size, max_size=None):
    """DETR's ``get_size`` on DALI CPU scalars: short side -> ``size``, long side capped at ``max_size``."""
    short, long = dmath.min(h, w), dmath.max(h, w)
    if max_size is not None:
        size = dmath.min(_float(size), max_size * short / long)
    scale = size / short
    return dmath.floor(h * scale + 0.5), dmath.floor(w * scale + 0.5)


@pipeline_def(enable_checkpointing=True)
def detr_pipeline(
    ann_file: str,
    image_root: str,
    train: bool,
    cfg: DetectionDataConfig,
    shard_id: int,
    num_shards: int,
    decode_device: str,
    reader_seed: int,
):
    """Outputs: images [3, Hp, Wp] padded to the batch max, size (h, w), orig_size (h, w),
    boxes [N, 4] ltrb relative to the un-padded image, category ids [N], image id [1]."""
    jpegs, boxes, cats, image_ids = fn.readers.coco(
        name="Reader",
        file_root=image_root,
        annotations_file=ann_file,
        ltrb=True,
        ratio=True,
        image_ids=True,
        avoid_class_remapping=True,
        include_iscrowd=False,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=train,
        # One seed on every rank: the per-epoch global permutation must agree for shards to partition it.
        seed=reader_seed,
        pad_last_batch=not train,
        stick_to_shard=not train,
    )
    shape = fn.peek_image_shape(jpegs)
    orig_h, orig_w = _float(shape[0]), _float(shape[1])
    images = fn.decoders.image(
        jpegs, device=decode_device, output_type=types.RGB, **decoder_args(decode_device)
    )
    h, w = orig_h, orig_w
    if train:
        flip = fn.random.coin_flip(probability=cfg.hflip_prob)
        images = fn.flip(images, horizontal=flip)
        boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
        # DETR's crop branch (short side to one of crop_resize, random window, then the multi-scale resize) is
        # expressed without DALI conditionals: samples that skip it get the identity (their own short side
        # and a full-image window), so one graph serves the whole batch on CPU and GPU alike.
        do_crop = _float(fn.random.coin_flip(probability=cfg.crop_prob))
        crop_short = fn.random.choice([float(cfg.scaled(s)) for s in cfg.crop_resize])
        crop_short = do_crop * crop_short + (1.0 - do_crop) * dmath.min(h, w)
        h, w = _short_side_size(h, w, crop_short)
        images = fn.resize(images, size=fn.stack(h, w))
        lo, hi = float(cfg.scaled(cfg.crop_size[0])), float(cfg.scaled(cfg.crop_size[1]))
        crop_w = dmath.min(
            dmath.floor(lo + fn.random.uniform(range=[0.0, 1.0]) * (dmath.min(w, hi) - lo + 1)), w
        )
        crop_h = dmath.min(
            dmath.floor(lo + fn.random.uniform(range=[0.0, 1.0]) * (dmath.min(h, hi) - lo + 1)), h
        )
        crop_w = do_crop * crop_w + (1.0 - do_crop) * w
        crop_h = do_crop * crop_h + (1.0 - do_crop) * h
        anchor, crop_shape, boxes, cats = fn.random_bbox_crop(
            boxes,
            cats,
            crop_shape=fn.cast(fn.stack(crop_w, crop_h), dtype=types.INT32),
            input_shape=fn.cast(fn.stack(w, h), dtype=types.INT32),
            bbox_layout="xyXY",
            thresholds=[0.0],
            allow_no_crop=False,
            bbox_prune_threshold=1e-3,
            total_num_attempts=1,
        )
        images = fn.slice(
            images, anchor, crop_shape, axes=[1, 0], normalized_anchor=False, normalized_shape=False
        )
        h, w = crop_h, crop_w
        size = fn.random.choice([float(cfg.scaled(s)) for s in cfg.train_scales])
    else:
        size = float(cfg.scaled(cfg.val_size))
    h, w = _short_side_size(h, w, size, float(cfg.scaled(cfg.max_size)))
    images = fn.resize(images, size=fn.stack(h, w))
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
    )
    images = fn.pad(images, axes=(1, 2), fill_value=0.0)
    size_hw = fn.cast(fn.stack(h, w), dtype=types.INT32)
    orig_hw = fn.cast(fn.stack(orig_h, orig_w), dtype=types.INT32)
    return images, size_hw, orig_hw, boxes, cats, image_ids


def _pick_device(cfg: DetectionDataConfig) -> str:
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.device


def batches_per_epoch(num_images: int, world_size: int, micro_batch: int) -> int:
    """Batches per rank per epoch: ceil(ceil(images / world) / micro); the last one of a rank may be short."""
    return math.ceil(math.ceil(num_images / world_size) / micro_batch)


class DetectionLoader:
    """Iterates ``batches_per_epoch`` padded batches of one rank's shard (see module docstring)."""

    def __init__(
        self,
        cfg: DetectionDataConfig,
        split: str,
        rank: int,
        world_size: int,
        seed: int,
        micro_batch: int,
        device: torch.device | str = "cpu",
        annotations: CocoAnnotations | None = None,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        cfg.validate()
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.seed, self.micro_batch, self.device = seed, micro_batch, torch.device(device)
        self.train = split == "train"
        ann_file = cfg.train_ann if self.train else cfg.val_ann
        self.image_root = cfg.train_images if self.train else cfg.val_images
        self.annotations = annotations or CocoAnnotations(ann_file, self.image_root)
        self.num_samples = len(self.annotations)
        self.batches_per_epoch = batches_per_epoch(self.num_samples, world_size, micro_batch)
        # DALI cannot cut N images into more than N shards. With more ranks than images (a rehearsal on a
        # handful of photos), rank r reads shard r mod N: training sees the extra copies with their own
        # augmentation seeds, evaluation drops them (CocoEvaluator keeps one result per image id).
        self.reader_shards = max(1, min(world_size, self.num_samples))
        self.data_device = _pick_device(cfg)
        lut = np.full(max(self.annotations.cat_to_label) + 1, -1, dtype=np.int64)
        for cat, label in self.annotations.cat_to_label.items():
            lut[cat] = label
        self._cat_lut = torch.from_numpy(lut).to(self.device)  # category id -> contiguous label
        self.epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._pipe = None

    def _build(self, checkpoint: str | None = None):
        gpu = self.data_device == "gpu"
        pipe = detr_pipeline(
            str(self.annotations.ann_file),
            self.image_root,
            self.train,
            self.cfg,
            self.rank % self.reader_shards,
            self.reader_shards,
            "mixed" if gpu else "cpu",
            self.seed,
            batch_size=self.micro_batch,
            num_threads=self.cfg.num_threads,
            device_id=(torch.cuda.current_device() if gpu else None),
            seed=self.seed + 7919 * self.rank,
            prefetch_queue_depth=self.cfg.prefetch,
            checkpoint=checkpoint,
        )
        pipe.build()
        return pipe

    def set_epoch(self, epoch: int) -> None:
        """Train order comes from the reader's per-epoch reshuffle (same seed on every rank); validation
        restarts from the start of the shard so every evaluation sees the same images: the pipeline of
        a completed pass is kept (its reader wraps to the start of the padded shard), one left halfway is
        not."""
        if not self.train and self._batch != 0:
            self._pipe = None
        self.epoch = epoch
        self._batch = 0

    def state_dict(self) -> dict:
        """Position in the epoch plus DALI's checkpoint of the reader and augmentation RNG (exact resume)."""
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "batches_per_epoch": self.batches_per_epoch,
            "dali": self._pipe.checkpoint() if self._pipe is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self._batch = sd["epoch"], sd["batch"]
        self._pipe = self._build(sd["dali"]) if sd.get("dali") else None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        if self._pipe is None:
            self._pipe = self._build()
        while self._batch < self.batches_per_epoch:
            self._batch += 1
            yield self._convert(self._pipe.run())
        self._batch = 0

    def _check_size(self, image_id: int, decoded_hw: list[int]) -> None:
        """The JSON's width/height must be the decoded image's (EXIF orientation applied): DALI's COCO
        reader makes the boxes relative with the JSON's size, so a mismatch would silently distort them."""
        img = self.annotations.images[image_id]
        if [img["height"], img["width"]] != decoded_hw:
            path = Path(self.image_root) / img["file_name"]
            raise ValueError(
                f"{self.annotations.ann_file}: image id {image_id} ({path}): the JSON says "
                f"{img['width']}x{img['height']} (w x h), the decoded image is "
                f"{decoded_hw[1]}x{decoded_hw[0]} (EXIF orientation applied); fix width/height in the JSON"
            )

    def _convert(self, outs):
        images, size_hw, orig_hw, boxes, cats, image_ids = outs
        dev = self.device
        images = _to_torch(images, dev)  # [B, 3, Hp, Wp]
        sizes = size_hw.as_array().astype(np.int64)  # [B, 2] (h, w), host copy for the infos
        origs = orig_hw.as_array().astype(np.int64)
        bsz, _, hp, wp = images.shape
        # Built on the device from B sizes: one tiny upload instead of a [B, Hp, Wp] mask per batch.
        size_dev = host_to_device(torch.from_numpy(sizes), dev)
        ys = torch.arange(hp, device=dev)[None, :, None]
        xs = torch.arange(wp, device=dev)[None, None, :]
        mask = (ys >= size_dev[:, 0, None, None]) | (xs >= size_dev[:, 1, None, None])  # [B, Hp, Wp]
        # Every box and category of the batch in one upload each; label lookup and cxcywh on the device.
        counts = [int(np.asarray(cats[b]).size) for b in range(bsz)]
        ltrb = np.concatenate([np.asarray(boxes[b], dtype=np.float32).reshape(-1, 4) for b in range(bsz)])
        cat = np.concatenate([np.asarray(cats[b], dtype=np.int64).reshape(-1) for b in range(bsz)])
        labels = self._cat_lut[host_to_device(torch.from_numpy(cat), dev)]  # [sum N]
        cxcywh = box_xyxy_to_cxcywh(host_to_device(torch.from_numpy(ltrb), dev).clamp(0.0, 1.0))  # [sum N, 4]
        targets = [
            {"labels": lab, "boxes": box} for lab, box in zip(labels.split(counts), cxcywh.split(counts))
        ]
        infos = []
        for b in range(bsz):
            image_id = int(np.array(image_ids[b]).reshape(-1)[0])
            self._check_size(image_id, origs[b].tolist())
            infos.append({"image_id": image_id, "orig_size": origs[b].tolist(), "size": sizes[b].tolist()})
        return images, mask, targets, infos


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList (CPU or GPU) as one torch tensor on ``device``."""
    if hasattr(tl, "as_cpu") and type(tl).__name__.endswith("GPU"):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = tl.as_tensor()
        out = torch.empty(
            tensor.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device())
        )
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out.to(device)
    return torch.from_numpy(tl.as_array()).to(device)


def build_detection_loader(
    cfg: DetectionDataConfig,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    micro_batch: int = 2,
    device: torch.device | str = "cpu",
    annotations: CocoAnnotations | None = None,
) -> DetectionLoader:
    return DetectionLoader(cfg, split, rank, world_size, seed, micro_batch, device, annotations)
