"""Loader contract shared by the DALI and fallback backends: sample plan, epochs, resume state, device.

Training on local shards follows one order for the whole split (order.py): epoch e is a permutation of
the split seeded by (seed, e), and rank r of w reads batch b from positions [(b w + r) u, (b w + r + 1) u)
of it, u = ceil(micro_batch / repeats). Global step s therefore reads the same samples at every world size
that makes the same global batch, and the position in an epoch is the number of samples consumed. The
samples are read by random access through the DALI index files (index.SampleTable); DALI gets them through
``fn.external_source`` and still decodes and augments them.

- train: batches_per_epoch = (n // r) // (w u), full batches only (the rest is left for that epoch).
- train with repeated augmentation r > 1: the epoch's order is cut to n // r samples, each read once and
  augmented r times (layout [view 0 of every sample, view 1, ...], cut to micro_batch), so epochs keep
  their length in batches (a little shorter when r does not divide micro_batch).
- remote shards can only be streamed: rank r of w reads the contiguous range [n*s/w, n*(s+1)/w) with
  s = (r + epoch) % w (with r > 1 repeats: w*r ranges, range (q*r + epoch) % (w*r)), buffer-shuffled,
  so their data position only holds for the world that wrote it.
- val: rank r reads range r; batches_per_epoch = ceil(ceil(n / w) / micro_batch); slots past the rank's
  own range are padding with label -1, so every sample is scored exactly once across ranks.

Augmentation is a function of (seed, epoch, rank) (DALI) or of (seed, epoch, sample) (fallback, global
order). `state_dict()` taken between batches lets a new loader continue the epoch with exactly the
batches that were not consumed yet: an identical loader also with the same augmentations (the DALI
checkpoint), one of another world size or micro batch in the global order with the same samples.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch

from pvt_dist.data import order
from pvt_dist.data.config import DataConfig
from pvt_dist.data.index import SampleTable, ShardSet, rank_range, resolve_shards


def mix_seed(*parts: int) -> int:
    """Stable 31-bit seed from integers (DALI wants a non-negative int32)."""
    h = 0x9E3779B1
    for p in parts:
        h = (h * 1000003 ^ (int(p) & 0xFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return h % (2**31 - 1)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Run timm augmentations (global python/torch RNG) reproducibly without touching the caller's RNG."""
    state = random.getstate()
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: a copy from pageable memory waits for the whole
    CUDA stream, one from pinned memory is queued on it. On the CPU the tensor itself."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def parse_label(raw: bytes, key: str, num_classes: int, fld: str) -> int:
    try:
        label = int(raw)
    except ValueError:
        raise ValueError(f"{fld}: sample {key}: .cls is not an integer ({raw[:20]!r})") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"{fld}: sample {key}: label {label} outside [0, data.num_classes={num_classes})")
    return label


class ShardLoader:
    """Base of both backends; subclasses implement `_run_epoch` and optionally `_checkpoint`."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        shards: ShardSet,
        rank: int,
        world_size: int,
        seed: int,
        micro_batch: int,
        device: torch.device,
        return_keys: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.split, self.shards = cfg, split, shards
        self.train = split == "train"
        self.rank, self.world_size, self.seed, self.micro_batch = rank, world_size, seed, micro_batch
        self.device, self.return_keys = device, return_keys
        self.num_samples = shards.num_samples
        self.repeats = cfg.repeated_aug if self.train else 1
        self.unique_batch = -(-micro_batch // self.repeats)  # distinct samples read per batch (ceil)
        self.num_slots = world_size * self.repeats
        n, w, b = self.num_samples, world_size, micro_batch
        # Local training shards follow one order for the whole split (order.py); remote shards can only be
        # streamed, so each rank streams its own range of them.
        self.global_order = self.train and not shards.remote
        self.table = SampleTable(shards) if self.global_order else None
        if self.global_order:
            self.batches_per_epoch = order.batches_per_epoch(n, w, self.unique_batch, self.repeats)
        elif self.train:
            # The shortest range must feed every batch: with r > 1 that is n // (w r) // ceil(b / r).
            self.batches_per_epoch = min((n // w) // b, (n // self.num_slots) // self.unique_batch)
        if self.train:
            if self.batches_per_epoch == 0:
                raise ValueError(
                    f"{shards.field}: {n} samples cannot fill one batch of {b} on each of {w} ranks"
                )
        else:
            self.batches_per_epoch = math.ceil(math.ceil(n / w) / b)
        self.epoch = 0
        self._consumed = 0  # batches of self.epoch already handed out
        self._resume: dict | None = None
        self._eraser = None
        if self.train and cfg.random_erase > 0:
            from timm.data.random_erasing import RandomErasing

            self._eraser = RandomErasing(cfg.random_erase, mode="pixel", max_count=1, device=str(device))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rank_slot(self, epoch: int) -> int:
        """Which of the `num_slots` contiguous ranges this rank reads in `epoch`."""
        return (self.rank * self.repeats + epoch) % self.num_slots if self.train else self.rank

    def rank_samples(self, epoch: int) -> tuple[int, int]:
        return rank_range(self.num_samples, self.rank_slot(epoch), self.num_slots)

    def epoch_seed(self, epoch: int) -> int:
        return mix_seed(self.seed, epoch, self.rank, self.train)

    def order_seed(self, epoch: int) -> int:
        """Seed of the epoch's global order: (seed, epoch) only, the same on every rank and world size."""
        return mix_seed(self.seed, epoch, 0x6F72646572)  # "order"

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's samples in reading order, for every rank (global order only)."""
        return order.epoch_order(self.num_samples, self.order_seed(epoch), self.repeats)

    def batch_samples(self, sequence: np.ndarray, batch: int) -> np.ndarray:
        """Global numbers of the samples this rank reads in ``batch`` of the epoch ``sequence``."""
        return sequence[order.batch_positions(batch, self.rank, self.world_size, self.unique_batch)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration runs; a pending resume of another epoch is dropped."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        if epoch != self.epoch:
            self._consumed = 0
        self.epoch = epoch

    def state_dict(self) -> dict:
        """This rank's position after the batches consumed so far, plus the backend state (DALI checkpoint)
        needed to continue exactly. Ranks differ: save every rank's dict (or a list of all of them)."""
        sd = {
            "rank": self.rank,
            "epoch": self.epoch,
            "batch": self._consumed,
            "batches_per_epoch": self.batches_per_epoch,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "repeats": self.repeats,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "backend": self.cfg.backend,
            "order": "global" if self.global_order else "rank",
        }
        if self._resume is not None:  # restored but not iterated yet: hand the restored position on
            sd.update(epoch=self._resume["epoch"], batch=self._resume["batch"])
            sd["backend_state"] = self._resume["backend_state"]
        elif 0 < self._consumed < self.batches_per_epoch:
            sd["backend_state"] = self._checkpoint()
        if self.global_order:  # the position any world size can continue from
            sd["samples"] = sd["batch"] * self.world_size * self.unique_batch
        return sd

    def load_state_dict(self, sd: dict | list[dict]) -> None:
        """Continue from this rank's `state_dict()`, or from the list of every rank's state (by rank).

        In the global order (local training shards) a state saved by another world size, rank or micro
        batch continues too: from the samples consumed, which must be whole rounds of this loader (the
        same global batch). The backend state (DALI's augmentation RNGs) is the saving rank's and is not
        carried over then: the same samples follow, augmented differently.
        """
        if isinstance(sd, (list, tuple)):
            if len(sd) != self.world_size:
                raise ValueError(f"data loader state: {len(sd)} rank states for world size {self.world_size}")
            sd = sd[self.rank]
        keys = ("world_size", "rank", "micro_batch", "repeats", "seed", "num_samples")
        elastic = self.global_order and sd.get("order") == "global"
        for k in keys[3:] if elastic else keys:
            saved = sd.get(k, 1)  # states from before repeated augmentation have no "repeats"
            if saved != getattr(self, k):
                raise ValueError(
                    f"data loader state: saved with {k}={saved} but this loader has {getattr(self, k)}; "
                    "a mid-epoch position only transfers to an identical loader"
                )
        epoch, consumed, backend_state = sd["epoch"], sd["batch"], sd.get("backend_state")
        if elastic and any(sd[k] != getattr(self, k) for k in keys[:3]):
            round_ = self.world_size * self.unique_batch
            if sd["samples"] % round_:
                raise ValueError(
                    f"data loader state: {sd['samples']} samples of epoch {epoch} consumed, not whole "
                    f"batches of {self.unique_batch} on {self.world_size} ranks; keep the global batch"
                )
            consumed, backend_state = sd["samples"] // round_, None
        if consumed >= self.batches_per_epoch:
            epoch, consumed = epoch + 1, 0
        if consumed and sd["backend"] != self.cfg.backend:
            # The backends augment differently: another backend cannot continue the epoch's augmentations.
            raise ValueError(
                f"data.backend: loader state saved mid-epoch by the {sd['backend']!r} backend cannot resume "
                f"with {self.cfg.backend!r}; switch backends at an epoch boundary"
            )
        self.epoch, self._consumed = epoch, consumed
        self._resume = {"epoch": epoch, "batch": consumed, "backend_state": backend_state}

    def _checkpoint(self):
        return None

    def _run_epoch(self, epoch: int, start_batch: int, backend_state) -> Iterator:
        """Yield (images [B,C,H,W] float, labels int64 [B] (-1 = pad), keys list[str]) from start_batch."""
        raise NotImplementedError

    def __iter__(self):
        epoch = self.epoch
        start, state = 0, None
        if self._resume is not None and self._resume["epoch"] == epoch:
            start, state = self._resume["batch"], self._resume["backend_state"]
        self._resume = None
        self._consumed = start
        for i, (images, labels, keys) in enumerate(self._run_epoch(epoch, start, state), start):
            images = host_to_device(images, self.device)  # no-op for DALI "mixed" (already there)
            labels = host_to_device(labels, self.device)
            if self._eraser is not None:
                with seeded_rng(mix_seed(self.epoch_seed(epoch), i), self.device):
                    images = self._eraser(images)
            self._consumed = i + 1
            yield (images, labels, keys) if self.return_keys else (images, labels)
        self.epoch, self._consumed = epoch + 1, 0


def resolve_device(device) -> torch.device:
    if device is None:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    return torch.device(device)


def build_loader(
    cfg: DataConfig,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    micro_batch: int = 64,
    device=None,
    return_keys: bool = False,
) -> ShardLoader:
    """Loader of one split for one rank; see the module docstring for the sharding contract.

    Iterating yields `images` float [B,C,H,W] normalized and `labels` int64 [B] on `device` (plus a list
    of "shard:key" strings when return_keys). Local shards are validated here, before any batch.
    """
    cfg.validate()
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    dev = resolve_device(device)
    fld = f"data.{split}_shards"
    spec = cfg.train_shards if split == "train" else cfg.val_shards
    count = cfg.train_samples if split == "train" else cfg.val_samples
    shards = resolve_shards(spec, fld, split, count)
    shards.retries, shards.retry_max_s = cfg.stream_retries, cfg.stream_retry_max_s
    args = (cfg, split, shards, rank, world_size, seed, micro_batch, dev, return_keys)
    if cfg.backend == "dali":
        from pvt_dist.data.dali_pipeline import DaliLoader

        return DaliLoader(*args)
    from pvt_dist.data.fallback import FallbackLoader

    return FallbackLoader(*args)
