"""The training order of local shards, defined for the whole split and not per rank.

Epoch e reads ``epoch_order(n, seed(e), r)``: one permutation of the split's n samples seeded by
(seed, e), cut to n // r samples when each sample is read r times (repeated augmentation: r views of one
read). Rank q of w takes, for its batch b, the u = ceil(micro_batch / r) samples at positions
[(b w + q) u, (b w + q + 1) u) of that order. Batch b of every rank together is one "round" of w u samples,
and an optimizer step of grad_accum rounds reads positions [s G / r, (s + 1) G / r) for the global batch G:
the same samples at every world size, micro batch and accumulation that make the same G (when r divides
the micro batch). The position in an epoch is therefore one number, the samples consumed, which any world
can continue from.
"""

from __future__ import annotations

import numpy as np


def epoch_order(num_samples: int, order_seed: int, repeats: int = 1) -> np.ndarray:
    """int64 [num_samples // repeats]: the epoch's samples (global numbers, shard order) in reading order.

    ``order_seed``: from (seed, epoch) only (``ShardLoader.order_seed``), never from the rank."""
    rng = np.random.Generator(np.random.PCG64(order_seed))
    return rng.permutation(num_samples)[: num_samples // repeats]


def batches_per_epoch(num_samples: int, world_size: int, unique_batch: int, repeats: int = 1) -> int:
    """Full rounds of ``world_size x unique_batch`` samples in an epoch's order."""
    return (num_samples // repeats) // (world_size * unique_batch)


def batch_positions(batch: int, rank: int, world_size: int, unique_batch: int) -> slice:
    """Positions in the epoch's order of ``rank``'s batch ``batch``."""
    start = (batch * world_size + rank) * unique_batch
    return slice(start, start + unique_batch)
