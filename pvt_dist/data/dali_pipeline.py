"""DALI pipelines: one definition for GPU ("mixed" nvJPEG decoding + GPU ops) and CPU (device_id=None).

Samples of local shards are read by offset through the index files (index.SampleTable, which retries a
read that a network filesystem fails for a moment) into `fn.external_source`: training in the global order
(loader.py, order.py, `OrderSource`), validation as each rank's contiguous range (`RangeSource`). Remote
shards (http, s3, pipe:) are streamed by the webdataset library into `fn.external_source`. The same graph
decodes and augments all of them.

Training builds a fresh pipeline per epoch with a seed from (seed, epoch, rank): an epoch's plan (its
order and seed) is fixed at build time, so a persistent pipeline would carry its RNG state into the next
epoch; the order would then depend on history and an epoch-boundary resume would need a DALI checkpoint.
Mid-epoch state is DALI's own checkpoint (the source's iteration and the operator RNGs). Validation has
neither randomness nor a per-epoch plan: one pipeline serves every evaluation (its source wraps to the
first batch after each pass).
"""

from __future__ import annotations

import collections
import io
import math

import numpy as np
import torch

from pvt_dist.data.config import DataConfig, parse_rand_augment
from pvt_dist.data.dali_import import dmath, fn, pipeline_def, types
from pvt_dist.data.dali_randaugment import rand_augment
from pvt_dist.data.index import SampleTable
from pvt_dist.data.loader import ShardLoader, parse_label
from pvt_dist.data.stream import external_source_batches

INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}
# nvJPEG scratch memory sized once for the largest ImageNet image instead of regrown while training (the
# values of NVIDIA's ResNet-50 DALI example): device and pinned-host padding in bytes, and the hardware
# decoder's preallocation for a 5980 x 6430 image.
MIXED_DECODER_HINTS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


def decoder_args(decode_dev: str) -> dict:
    """Keyword arguments of every image decoder of both stages, for ``device="cpu"`` or ``"mixed"``.

    ``jpeg_fancy_upsampling``: the GPU decoder upsamples chroma as libjpeg-turbo does (the CPU decoder,
    PIL), so GPU-decoded pixels match the CPU path and the reference pipelines.
    """
    args: dict = dict(jpeg_fancy_upsampling=True)
    if decode_dev == "mixed":
        args.update(MIXED_DECODER_HINTS)
    return args


def shorter_side_size(jpegs, short: int):
    """Per-sample (H', W') after resizing the shorter side to `short`, as torchvision/timm compute it:
    the longer side is floor(short * long / shorter). DALI's own resize_shorter rounds it instead, which
    scales e.g. 640x427 photos differently from the reference pipeline.

    The size comes from the JPEG header (CPU, before decoding), so the GPU path needs no GPU->CPU sync.
    """
    hw = fn.peek_image_shape(jpegs, dtype=types.INT32, adjust_orientation=False)[0:2]
    shorter = dmath.min(hw[0], hw[1])
    return (short * hw) // shorter


def center_crop_anchor(size_hw, crop: int):
    """torchvision's center-crop corner, round-half-to-even((in - crop) / 2), per axis.

    DALI's crop_pos=0.5 rounds .5 up: on odd margins one pixel off the torchvision/timm crop, which on
    small sharp images (28 px Fashion-MNIST) alone costs ~20/255 mean absolute difference.
    """
    margin = size_hw - crop
    half = margin // 2
    return half + (margin - 2 * half) * (half - 2 * (half // 2))  # +1 only when margin odd and half odd


def train_views(jpegs, cfg: DataConfig, decode_dev: str, out_type, mean, std, interp, repeats: int) -> list:
    """`repeats` independently augmented views of every image: RandomResizedCrop, RandAugment (timm's
    policy, dali_randaugment.py), flip.

    One view decodes only the crop's region (fused ROI decode); several views decode each image once and
    crop the decoded image `repeats` times.
    """
    size, crop = cfg.train_size, dict(random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio))
    if repeats == 1:
        # adjust_orientation=False: like PIL/timm, EXIF orientation is not applied.
        decoded = fn.decoders.image_random_crop(
            jpegs, device=decode_dev, output_type=out_type, num_attempts=10, adjust_orientation=False,
            **crop, **decoder_args(decode_dev),
        )  # fmt: skip
        crops = [fn.resize(decoded, size=[size, size], interp_type=interp, antialias=True)]
    else:
        decoded = fn.decoders.image(
            jpegs,
            device=decode_dev,
            output_type=out_type,
            adjust_orientation=False,
            **decoder_args(decode_dev),
        )
        crops = [
            fn.random_resized_crop(
                decoded, size=[size, size], num_attempts=10, interp_type=interp, antialias=True, **crop
            )
            for _ in range(repeats)
        ]
    views = []
    for images in crops:
        if cfg.rand_augment:
            # timm's policy; timm's train transform fills with img_mean = round(255 * mean). DALI's warps
            # have no bicubic: bicubic and bilinear resample linearly there.
            images = rand_augment(
                images, parse_rand_augment(cfg.rand_augment), (size, size),
                fill=tuple(min(255, round(255 * m)) for m in cfg.mean[: len(mean)]),
                interp_type=types.INTERP_NN if cfg.interpolation == "nearest" else types.INTERP_LINEAR,
            )  # fmt: skip
        views.append(
            fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=mean,
                std=std,
                mirror=fn.random.coin_flip(probability=cfg.hflip),
            )  # fmt: skip
        )
    return views


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def image_pipeline(
    cfg: DataConfig, train: bool, gpu: bool, source, repeats: int = 1, jpegs_only: bool = False
):
    """`source`: ``fn.external_source`` batches of (encoded .jpg, raw .cls, "shard.tar:key" name) uint8
    arrays, or with ``jpegs_only`` of the .jpg alone (the local shards' sources: the loader reads each
    batch's labels and names from the sample table without DALI). Outputs: `repeats` (1 for validation)
    views, each images float [B,C,S,S] normalized (C=3, or 1 without gray_to_rgb); unless ``jpegs_only``,
    then the raw `.cls` bytes [B] and the sample names [B]."""
    if jpegs_only:
        jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8)
        meta = ()
    else:
        jpegs, cls, names = fn.external_source(source=source, num_outputs=3, batch=True, dtype=types.UINT8)
        meta = (cls, names)
    decode_dev = "mixed" if gpu else "cpu"
    out_type = types.RGB if cfg.gray_to_rgb else types.GRAY
    channels = 3 if cfg.gray_to_rgb else 1
    mean = [255.0 * m for m in cfg.mean[:channels]]
    std = [255.0 * s for s in cfg.std[:channels]]
    interp = INTERP[cfg.interpolation]
    if train:
        return (*train_views(jpegs, cfg, decode_dev, out_type, mean, std, interp, repeats), *meta)
    size = cfg.val_size
    images = fn.decoders.image(
        jpegs, device=decode_dev, output_type=out_type, adjust_orientation=False, **decoder_args(decode_dev)
    )
    hw = shorter_side_size(jpegs, math.floor(size / cfg.crop_pct))  # [2] int: (H', W')
    hw_f = fn.cast(hw, dtype=types.FLOAT)
    images = fn.resize(images, resize_y=hw_f[0], resize_x=hw_f[1], interp_type=interp, antialias=True)
    images = fn.slice(
        images, center_crop_anchor(hw, size), [size, size], axes=[0, 1],
        normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad",
    )  # fmt: skip
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
    return images, *meta


def _name(raw: np.ndarray) -> str:
    """A source's "shard.tar:key" name bytes -> str."""
    return bytes(raw).decode("utf-8", "replace")


class TableSource:
    """``fn.external_source`` callable over local shards (index.SampleTable): iteration i -> this rank's
    batch ``batch_of(i)``, as encoded .jpg (uint8 views of the bytes read, no copy).

    Only the JPEGs go through DALI: each feed costs DALI's per-sample conversion, and each output read back
    a per-sample ``at()``, which for the labels and names cost more than the reading itself (profiled). The
    loader reads a batch's labels and names from the table (``labels``); ``fed`` records the batches handed
    to DALI, in order, so that the loader can check each output batch is the one it labels.

    A read that fails past SampleTable's retries is kept in ``read_error``: DALI reports it as its own
    failure, the loader raises the read error itself (it names the field, shard and sample)."""

    def __init__(self, loader: ShardLoader, first: int):
        self.loader, self.table, self.first = loader, loader.table, first
        self.read_error: OSError | None = None
        self.fed: collections.deque[int] = collections.deque()

    def batch_of(self, iteration: int) -> int:
        raise NotImplementedError

    def indices(self, batch: int) -> np.ndarray:
        """Global numbers of the samples of this rank's ``batch``."""
        raise NotImplementedError

    def __call__(self, iteration: int):
        batch = self.batch_of(iteration)
        try:
            jpgs = self.table.read_jpgs(self.indices(batch))
        except OSError as e:
            self.read_error = e
            raise
        self.fed.append(batch)
        return [np.frombuffer(b, dtype=np.uint8) for b in jpgs]

    def labels(self, batch: int) -> tuple[list[bytes], list[str]]:
        """(.cls bytes, "shard.tar:key" names) of DALI's next output batch, which must be ``batch``."""
        fed = self.fed.popleft()
        if fed != batch:  # an invariant of the source's FIFO, never a data error
            raise RuntimeError(f"{self.loader.shards.field}: DALI returned batch {fed} where {batch} was due")
        return self.table.read_classes(self.indices(batch))

    def undecodable(self, batch: int, prefetch: int) -> str | None:
        """Where the first JPEG that PIL cannot decode is, in batches ``batch`` .. ``batch + prefetch``
        (those DALI may have been decoding when it failed), e.g. "shard /d/train-0.tar, sample 'k' (.jpg)"."""
        from PIL import Image

        table, last = self.table, min(batch + prefetch, self.loader.batches_per_epoch - 1)
        for b in range(batch, last + 1):
            indices = self.indices(b)
            for i, jpg in zip(indices.tolist(), table.read_jpgs(indices)):
                try:
                    Image.open(io.BytesIO(jpg)).load()
                except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                    return f"shard {table.urls[table.shard[i]]}, sample {table.keys[i]!r} (.jpg)"
        return None


class OrderSource(TableSource):
    """Training: the global order (order.py) of ``epoch``, from this rank's batch ``first`` on."""

    def __init__(self, loader: ShardLoader, epoch: int, first: int):
        super().__init__(loader, first)
        self.order = loader.epoch_order(epoch)

    def batch_of(self, iteration: int) -> int:
        # DALI prefetches past the epoch's last batch; those batches are never run.
        return min(self.first + iteration, self.loader.batches_per_epoch - 1)

    def indices(self, batch: int) -> np.ndarray:
        return self.loader.batch_samples(self.order, batch)


class RangeSource(TableSource):
    """Validation: this rank's contiguous range [begin, end) of the split in shard order (loader.py), in
    micro batches from ``first`` on; slots past the range repeat its last sample (the loader labels them
    -1), so every rank runs the same number of batches and every sample is scored once."""

    def __init__(self, loader: ShardLoader, first: int):
        super().__init__(loader, first)
        self.begin, self.end = loader.rank_samples(0)
        if self.begin >= self.end:
            raise ValueError(
                f"{loader.shards.field}: rank {loader.rank} of {loader.world_size} has no validation "
                f"sample ({loader.num_samples} in all); use at most {loader.num_samples} ranks"
            )

    def batch_of(self, iteration: int) -> int:
        # One pipeline serves every evaluation: its prefetch runs on into the next pass's first batches.
        return (self.first + iteration) % self.loader.batches_per_epoch

    def indices(self, batch: int) -> np.ndarray:
        start = self.begin + batch * self.loader.unique_batch
        return np.minimum(np.arange(start, start + self.loader.unique_batch), self.end - 1)


class DaliLoader(ShardLoader):
    """DALI backend of `build_loader` (see loader.py for the contract)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        cfg = self.cfg
        gpu = cfg.device == "gpu" or (cfg.device == "auto" and self.device.type == "cuda")
        if gpu and not torch.cuda.is_available():
            raise ValueError("data.device: 'gpu' needs a CUDA device; use 'cpu' or 'auto'")
        self.gpu = gpu
        self.dali_device = "gpu" if gpu else "cpu"
        self.device_id = None
        if gpu:  # decode on the output device when it is a GPU, else on the current one
            self.device_id = (
                self.device.index
                if self.device.type == "cuda" and self.device.index is not None
                else (torch.cuda.current_device())
            )
        self._pipe = None
        self._source: TableSource | None = None
        self._val_pipe = None  # kept between evaluations once a pass has completed
        if self.table is None and not self.shards.remote:  # validation reads by offset too
            self.table = SampleTable(self.shards)

    def _build(self, epoch: int, start_batch: int, checkpoint):
        cfg, shards = self.cfg, self.shards
        seed = self.epoch_seed(epoch)
        kw = dict(
            batch_size=self.unique_batch,
            num_threads=cfg.num_threads,
            device_id=self.device_id,
            seed=seed,
            prefetch_queue_depth=cfg.prefetch,
        )
        self._source = None
        if shards.remote:
            begin, end = self.rank_samples(epoch)
            source = external_source_batches(
                shards, begin, end, seed if self.train else None, cfg.shuffle_buffer,
                self.batches_per_epoch, self.unique_batch, start_batch,
            )  # fmt: skip
            # The stream is positioned by skipping consumed batches, so DALI need not checkpoint it.
            pipe = image_pipeline(
                cfg=cfg, train=self.train, gpu=self.gpu, source=source, repeats=self.repeats,
                enable_checkpointing=False, **kw,
            )  # fmt: skip
        elif self.train:
            first, dali_state = (
                (checkpoint["first"], checkpoint["dali"]) if checkpoint else (start_batch, None)
            )
            self._source = OrderSource(self, epoch, first)
            # DALI checkpoints the source's iteration with its RNGs: a restore continues both.
            pipe = image_pipeline(
                cfg=cfg, train=True, gpu=self.gpu, source=self._source, repeats=self.repeats,
                jpegs_only=True, checkpoint=dali_state, **kw,
            )  # fmt: skip
        else:  # validation has no RNG: the source's first batch is its whole position
            self._source = RangeSource(self, start_batch)
            pipe = image_pipeline(
                cfg=cfg, train=False, gpu=self.gpu, source=self._source, jpegs_only=True,
                enable_checkpointing=False, **kw,
            )  # fmt: skip
        pipe.build()
        return pipe

    def _checkpoint(self):
        # Remote streams are positioned by skipping consumed batches, validation by its batch number.
        if self._pipe is None or self.shards.remote or not self.train:
            return None
        return {"dali": self._pipe.checkpoint(), "first": self._source.first}

    def _to_torch(self, tl) -> torch.Tensor:
        tensor = tl.as_tensor()
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dev = torch.device("cuda", self.device_id)
            out = torch.empty(tensor.shape(), dtype=torch.float32, device=dev)
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(dev))
            return out
        return torch.from_numpy(np.array(tensor))

    def _run_epoch(self, epoch, start_batch, backend_state):
        # Every source starts at start_batch itself (remote streams skip to it, local ones read it).
        reuse = not self.shards.remote and not self.train
        if reuse and self._val_pipe is not None and start_batch == 0:
            # Taken, not shared: a pass abandoned halfway leaves the source mid-pass, so it is not kept.
            self._pipe, self._val_pipe = self._val_pipe, None
        else:
            self._val_pipe = None
            self._pipe = self._build(epoch, start_batch, backend_state)
        begin, end = self.rank_samples(epoch)
        real_total = end - begin if not self.global_order else self.num_samples  # train: full batches
        fld = self.shards.field
        for i in range(start_batch, self.batches_per_epoch):
            try:
                outputs = self._pipe.run()
            except Exception as e:
                source = self._source
                if source is not None and source.read_error is not None:
                    raise source.read_error from e  # names the shard and sample, after its retries
                # An external source has no source_info: find the sample that does not decode.
                where = (source.undecodable(i, self.cfg.prefetch) if source else None) or "a shard"
                raise RuntimeError(
                    f"{fld}: DALI failed on {where} in epoch {epoch}, batch {i} of rank {self.rank}: {e}"
                ) from e
            if self._source is not None:  # local shards: only the JPEGs went through DALI
                views, (classes, keys) = outputs, self._source.labels(i)
            else:
                *views, cls, names = outputs
                keys = [_name(names.at(j)) for j in range(len(names))]
                classes = [bytes(cls.at(j)) for j in range(len(keys))]
            real = max(0, min(self.unique_batch, real_total - i * self.unique_batch))
            labels = [
                parse_label(classes[j], keys[j], self.cfg.num_classes, fld) if j < real else -1
                for j in range(len(keys))
            ]
            if len(views) == 1:
                yield self._to_torch(views[0]), torch.tensor(labels, dtype=torch.int64), keys
                continue
            b, n = self.micro_batch, len(views)  # repeated augmentation: n views, cut to the micro batch
            images = torch.cat([self._to_torch(v) for v in views])[:b]
            yield images, torch.tensor((labels * n)[:b], dtype=torch.int64), (keys * n)[:b]
        if reuse and start_batch == 0:
            self._val_pipe = self._pipe
        self._pipe = None
