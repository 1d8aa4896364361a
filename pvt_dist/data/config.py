"""Typed configuration of the input pipeline (shards, augmentation, Mixup/CutMix)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")


def is_remote(spec: str) -> bool:
    """True for shard locations that webdataset streams (object stores, HTTP, shell pipes)."""
    return spec.startswith(REMOTE_PREFIXES)


@dataclass
class DataConfig:
    """Where the WebDataset shards are and how their images become training tensors."""

    train_shards: str = ""
    """Training shards: a directory holding manifest.json (its train split), one .tar, a brace pattern
    (`/data/in1k/train-{000000..001023}.tar`), a glob, several of these joined by `::`, or a remote URL
    pattern (`https://...`, `s3://...`, `pipe:cmd ...`) streamed by webdataset."""

    val_shards: str = ""
    """Validation shards, same forms as `train_shards` (a directory means its manifest's val split)."""

    num_classes: int = 1000
    """Number of classes; every `.cls` label must lie in [0, num_classes)."""

    train_samples: int | None = None
    """Samples in the training split. Only needed for remote shards without a manifest.json next to them;
    local shards are counted from their index files."""

    val_samples: int | None = None
    """Samples in the validation split (see `train_samples`)."""

    nominal_train_samples: int | None = None
    """Samples of the full training split the recipe is written for (ImageNet-1k: 1,281,167). Only
    `--plan` reads it, to count epochs when the shards cannot be read (e.g. planning a cluster run on a
    laptop); real runs always count the shards."""

    nominal_val_samples: int | None = None
    """The same for the validation split (ImageNet-1k: 50,000)."""

    train_size: int = 224
    """Side of the square training crop."""

    val_size: int = 224
    """Side of the square validation center crop."""

    crop_pct: float = 0.875
    """Validation resizes the shorter side to floor(val_size / crop_pct) before the center crop."""

    interpolation: str = "bicubic"
    """Resize filter: "bicubic", "bilinear" or "nearest"."""

    scale: tuple[float, float] = (0.08, 1.0)
    """Area range of RandomResizedCrop, as fractions of the image."""

    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """Aspect-ratio range of RandomResizedCrop."""

    hflip: float = 0.5
    """Probability of a horizontal flip in training."""

    repeated_aug: int = 1
    """Repeated augmentation (DeiT, the PVT authors' recipe: 3): every training micro batch holds
    ceil(micro_batch / repeated_aug) distinct images, each augmented independently repeated_aug times
    (cut to the micro batch), and an epoch keeps its length in steps, so it reads 1 / repeated_aug of the
    images (every one over repeated_aug x world-size epochs). Without BatchNorm the gradient is that of
    DeiT's sampler, which spreads the copies over GPUs instead. 1 disables it."""

    backend: str = "dali"
    """"dali" (DALI decoding/augmentation) or "fallback" (webdataset + PIL + torchvision)."""

    device: str = "auto"
    """Where DALI decodes: "gpu" (mixed nvJPEG decoder + GPU ops), "cpu", or "auto" (gpu when the loader's
    output device is CUDA)."""

    num_threads: int = 2
    """DALI CPU threads per rank, or DataLoader worker processes for the fallback backend."""

    fallback_workers: int | None = None
    """DataLoader worker processes of the fallback backend (0 decodes in the training process);
    None uses `num_threads`."""

    prefetch: int = 2
    """Batches prepared ahead of the consumer (DALI prefetch queue depth / DataLoader prefetch factor)."""

    shuffle_buffer: int = 4096
    """Samples held by the training shuffle buffer; shards are already globally shuffled when written,
    so the buffer only has to break up the per-shard order."""

    stream_retries: int = 5
    """Remote shards (http(s)/s3/pipe:): reopen a shard whose read failed (dropped connection, reset,
    failed command) up to this many times, resuming after the last sample it delivered; 0 fails at once.
    Local shards (a network filesystem), training and validation: a failed read (EIO, ESTALE, ...) is
    retried the same way, the file reopened."""

    stream_retry_max_s: float = 120.0
    """...and for at most this many seconds in all per shard (backoff 1, 2, 4, ... s, capped at 30 s)."""

    rand_augment: str | None = None
    """timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1" (DeiT/PVT's recipe); None disables it. Keys: m
    magnitude (level / 10 of each op's range), n ops per image (2), mstd per-op gaussian magnitude noise
    (>100: uniform in [0, m]), mmax clip (10), inc1 the increasing ops, p per-op probability (0.5). The
    fallback backend runs timm's own `rand_augment_transform`; the DALI backend runs the same policy as a
    DALI graph (data/dali_randaugment.py): same 15 ops, ranges, noise, p and fill. Geometric ops resample
    bilinearly there (DALI's warps have no bicubic); per-op differences are measured in
    docs/data_fidelity.md."""

    random_erase: float = 0.0
    """Probability of timm RandomErasing (per-pixel noise) applied to each training image on the device."""

    mixup: float = 0.0
    """Mixup alpha; 0 disables Mixup."""

    cutmix: float = 0.0
    """CutMix alpha; 0 disables CutMix."""

    mixup_prob: float = 1.0
    """Probability that a batch is mixed at all when Mixup or CutMix is enabled."""

    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are enabled."""

    mixup_mode: str = "batch"
    """timm Mixup mode: "batch", "pair" or "elem"."""

    label_smoothing: float = 0.1
    """Label smoothing folded into the Mixup soft targets (without Mixup the loss applies it)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (0-1 scale) subtracted after decoding."""

    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation (0-1 scale) divided after mean subtraction."""

    gray_to_rgb: bool = True
    """Decode every image to 3 RGB channels (grayscale replicated). False decodes single-channel images
    ([B,1,H,W]; mean/std then use their first entry)."""

    def validate(self) -> DataConfig:
        """Check every field; raise ValueError("data.<field>: ...") on the first bad one."""

        def bad(name: str, msg: str):
            raise ValueError(f"data.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("train_shards", "val_shards"):
            if not isinstance(getattr(self, name), str):
                bad(name, "must be a string path, pattern or URL")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            bad("num_classes", "must be a positive integer")
        if self.fallback_workers is not None and (
            not isinstance(self.fallback_workers, int) or self.fallback_workers < 0
        ):
            bad("fallback_workers", "must be None or an integer >= 0")
        for name in ("train_samples", "val_samples", "nominal_train_samples", "nominal_val_samples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(name, "must be None or a positive integer")
        for name in ("train_size", "val_size", "num_threads", "prefetch", "shuffle_buffer", "repeated_aug"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, "must be a positive integer")
        if not isinstance(self.stream_retries, int) or self.stream_retries < 0:
            bad("stream_retries", "must be an integer >= 0")
        if not self.stream_retry_max_s > 0:
            bad("stream_retry_max_s", "must be positive")
        if not 0.0 < self.crop_pct <= 1.0:
            bad("crop_pct", "must be in (0, 1]")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            bad("interpolation", 'must be "bicubic", "bilinear" or "nearest"')
        self.scale = tuple(float(v) for v in self.scale)
        self.ratio = tuple(float(v) for v in self.ratio)
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            bad("scale", "must be (lo, hi) with 0 < lo <= hi <= 1")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            bad("ratio", "must be (lo, hi) with 0 < lo <= hi")
        for name in ("hflip", "random_erase", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be a probability in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad("label_smoothing", "must be in [0, 1)")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                bad(name, "alpha must be >= 0")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            bad("mixup_mode", 'must be "batch", "pair" or "elem"')
        if self.backend not in ("dali", "fallback"):
            bad("backend", 'must be "dali" or "fallback"')
        if self.device not in ("auto", "cpu", "gpu"):
            bad("device", 'must be "auto", "cpu" or "gpu"')
        if self.rand_augment is not None:
            if not isinstance(self.rand_augment, str) or not self.rand_augment.startswith("rand"):
                bad("rand_augment", 'must be None or a timm spec such as "rand-m9-mstd0.5-inc1"')
            parse_rand_augment(self.rand_augment)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != 3:
            bad("mean", "must have 3 entries")
        if len(self.std) != 3 or min(self.std) <= 0:
            bad("std", "must have 3 positive entries")
        return self

    def replace(self, **changes) -> DataConfig:
        """Copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes).validate()


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment spec with timm's defaults (timm.data.auto_augment.rand_augment_transform)."""

    n: int = 2
    """Ops applied per image, chosen uniformly with replacement."""

    m: float = 10.0
    """Magnitude: level on timm's 0-10 scale (level / 10 of each op's range)."""

    mstd: float = 0.0
    """Std of the gaussian noise added to the magnitude at every op application; inf: uniform in [0, m]."""

    mmax: float = 10.0
    """Upper clip of the noisy magnitude (timm's `magnitude_max`, default its level denominator 10)."""

    increasing: bool = False
    """inc1: the ops whose strength grows with the magnitude (PosterizeIncreasing, ColorIncreasing, ...)."""

    p: float = 0.5
    """Probability that each chosen op is applied."""


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse a timm RandAugment spec as timm 1.0 does: "rand-m9-mstd0.5-inc1" -> n=2, m=9, mstd=0.5,
    increasing; ValueError("data.rand_augment: ...") on a key timm does not know or a bad value."""
    if not spec.startswith("rand"):
        raise ValueError(f"data.rand_augment: {spec!r} is not a RandAugment spec (must start with 'rand')")
    fields: dict = {}
    for part in spec.split("-")[1:]:
        key = "".join(ch for ch in part if ch.isalpha())
        val = part[len(key) :]
        try:
            if key == "m":
                fields["m"] = float(int(val))
            elif key == "n":
                fields["n"] = int(val)
            elif key == "mstd":
                mstd = float(val)
                fields["mstd"] = math.inf if mstd > 100 else mstd  # timm: mstd > 100 means uniform
            elif key == "mmax":
                fields["mmax"] = float(int(val))
            elif key == "inc":
                fields["increasing"] = bool(int(val))
            elif key == "p":
                fields["p"] = float(val)
            else:
                raise ValueError(key)
        except ValueError:
            raise ValueError(f"data.rand_augment: cannot parse {part!r} in {spec!r}") from None
    out = RandAugmentSpec(**fields)
    if not 0 <= out.m <= 30 or out.n < 1 or out.mstd < 0 or not 0 <= out.p <= 1 or out.mmax <= 0:
        raise ValueError(
            f"data.rand_augment: need 0 <= m <= 30, n >= 1, mstd >= 0, 0 <= p <= 1, mmax > 0 in {spec!r}"
        )
    return out
