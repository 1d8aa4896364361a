"""What a resume restores besides the engine: RNG streams, the data position, and its checks.

A checkpoint holds each rank's RNG states and data position (``DataStream.state_dict``). On the world size
that wrote it, every rank continues exactly where it stopped; on another one (an elastic resume) the data
continue from the samples consumed in the global order, and ranks without a saved stream get a fresh one
seeded from (seed, step, rank). The global batch may change only when the user says so.
"""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import torch

from pvt_dist.config import TrainConfig, peak_lr

log = logging.getLogger("pvt_dist.train")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Tests only (tests/test_elastic_resume.py): a path prefix; every rank appends the sample keys of each
# training batch it reads, one JSON line per batch ({"epoch", "keys"}), to PREFIX.rankN.
KEYS_ENV = "PVT_DIST_TEST_RECORD_KEYS"


class DataStream:
    """Endless iterator over a loader's epochs whose position (epoch + loader state) can be saved."""

    def __init__(self, loader, epoch: int = 0, loader_state: dict | None = None):
        self.loader = loader
        self.epoch = epoch
        self._keys_file = None
        if os.environ.get(KEYS_ENV) and hasattr(loader, "return_keys"):
            loader.return_keys = True
            self._keys_file = open(f"{os.environ[KEYS_ENV]}.rank{loader.rank}", "a")  # noqa: SIM115
        loader.set_epoch(epoch)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
            # A position saved at the very end of an epoch resumes at the start of the next one.
            self.epoch = getattr(loader, "epoch", epoch)
        self._it = iter(loader)

    def __next__(self):
        for _ in range(2):
            try:
                batch = next(self._it)
                if self._keys_file is not None:
                    images, labels, keys = batch
                    self._keys_file.write(json.dumps({"epoch": self.epoch, "keys": keys}) + "\n")
                    self._keys_file.flush()
                    batch = images, labels
                return batch
            except StopIteration:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
        raise RuntimeError("the training loader yields no batch in a whole epoch")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}


def check_global_batch(cfg: TrainConfig, world: int, checkpoint: str, meta: dict) -> None:
    """Refuse, before any loading, a resume from ``checkpoint`` that would silently change the global batch.

    ``meta``: the checkpoint's trainer state (``read_trainer_state``); ``world``: this run's ranks.
    """
    saved, now = meta.get("global_batch"), cfg.deepspeed.global_batch
    if saved is None or saved == now:
        return
    ds = cfg.deepspeed
    if not cfg.checkpoint.allow_global_batch_change:
        raise RuntimeError(
            f"deepspeed.global_batch: checkpoint {checkpoint} was trained with a "
            f"global batch of {saved}, this run has {now} (micro {ds.micro_batch} x accum "
            f"{ds.grad_accum} x {world} ranks). Set deepspeed.global_batch={saved} to keep it "
            f"(micro batch and accumulation are re-derived for {world} ranks), or "
            "checkpoint.allow_global_batch_change=true to change it"
        )
    scaled = getattr(cfg.optim, "scale_lr", False)  # stage 2 (DETR) never scales its lr
    lr = peak_lr(cfg) if scaled else cfg.optim.lr
    log.warning(
        "global batch %d -> %d (checkpoint.allow_global_batch_change): peak lr %.3g (%s)", saved, now, lr,
        "optim.scale_lr: lr x global batch / optim.lr_ref_batch" if scaled else "optim.lr as set",
    )  # fmt: skip


def elastic_rng(cfg: TrainConfig, step: int, rank: int, rank_state: dict | None) -> None:
    """RNG of a resume on another world size: a rank that existed in the writing run (``rank_state`` not
    None) continues its stream, a new rank starts one seeded from (seed, step, rank)."""
    from pvt_dist.data.loader import mix_seed

    if rank_state is not None:
        set_rng_state(rank_state["rng"])
    else:
        seed_all(mix_seed(cfg.seed, step, rank))


def elastic_data_position(data: dict, rank: int, world: int, saved_world: int) -> tuple:
    """Data position of a resume from ``saved_world`` ranks on ``world``: (data epoch, loader state or None).

    ``data``: a saved ``DataStream.state_dict()`` (this rank's, or rank 0's for a rank the writing run did
    not have). In the global order (local shards, ``pvt_dist/data/order.py``) the loader continues from the
    samples consumed, the same for every rank. Otherwise (remote shards; stage 2) the position is per rank
    for the writing world's rank plan, which another world cannot continue: a checkpoint taken mid-epoch
    resumes at the start of the next epoch and the rest of the interrupted one is not read (logged).
    """
    position = data["loader"]
    if position.get("order") == "global":
        if rank == 0:
            log.info(
                "elastic resume: the data continue at epoch %d + %d samples (global order) on %d ranks",
                position["epoch"], position["samples"], world,
            )  # fmt: skip
        return data["epoch"], position
    epoch, batch, batches = position["epoch"], position["batch"], position.get("batches_per_epoch")
    if batch == 0:
        return epoch, None
    if rank == 0 and (batches is None or batch < batches):
        left = "" if batches is None else f"its last {batches - batch} batches per rank "
        log.warning(
            "elastic resume: %d -> %d ranks mid-epoch %d (batch %d per rank): the data plan of an epoch "
            "depends on the world size, so the run continues at the start of epoch %d and %sof epoch %d "
            "are not read",
            saved_world, world, epoch, batch, epoch + 1, left or "the rest ", epoch,
        )  # fmt: skip
    return epoch + 1, None
