"""Raw sample streams read by the webdataset library (local files or any URL it opens).

Used by the fallback loader for validation and remote shards, and as the DALI external source of remote
shards (local training shards are read in the global order, index.SampleTable). The stream of a rank and
epoch is the rank's contiguous sample range (see loader.py), buffer-shuffled for training with an
RNG seeded from (seed, epoch, rank), then cut into micro-batches; validation pads the last batches
with copies of its final sample, flagged as padding.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import time
from collections.abc import Iterator

import numpy as np
import webdataset as wds

from pvt_dist.data.index import REQUIRED_EXTS, RETRIES, ShardSet, retry_delay, shard_label

log = logging.getLogger(__name__)


def sample_name(url: str, key: str) -> str:
    """Name of a sample in batches and errors, e.g. "train-000003.tar:fmnist_train_01234"."""
    return f"{shard_label(url)}:{key}"


def _shard_samples(url: str, shards: ShardSet) -> Iterator[dict]:
    """The samples of one shard; a failed read is retried (bounded) by reopening the shard and skipping
    what was already delivered (a shard's order is fixed). Past the limits the last error is raised."""
    delivered, attempt, t0 = 0, 0, time.monotonic()
    while True:
        position = 0
        try:
            for s in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                position += 1
                if position > delivered:
                    delivered = position
                    yield s
            return
        except Exception as e:  # noqa: BLE001 - network, pipe and tar errors of a stream are all retried
            spent = time.monotonic() - t0
            delay = retry_delay(attempt, spent, shards.retries, shards.retry_max_s)
            if delay is None:
                if attempt:
                    why = f"gave up after {attempt} retries in {spent:.0f} s: {type(e).__name__}: {e}"
                    raise OSError(why) from e
                raise
            attempt += 1
            RETRIES["count"] += 1
            log.warning(
                "%s: shard %s: read failed after %d samples (%s: %s); retry %d/%d in %.0f s",
                shards.field, url, delivered, type(e).__name__, str(e)[:200], attempt, shards.retries, delay,
            )  # fmt: skip
            time.sleep(delay)


def _checked(samples: Iterator[dict], shards: ShardSet, urls: list[str], counts: list[int]) -> Iterator[dict]:
    """Pass samples through, turning read errors and missing components into errors naming shard and key."""
    seen = dict.fromkeys(urls, 0)
    url, key = urls[0], None
    try:
        for s in samples:
            url, key = s["__url__"], s["__key__"]
            for ext in REQUIRED_EXTS:
                if ext not in s:
                    have = sorted(k for k in s if not k.startswith("__"))
                    raise ValueError(
                        f"{shards.field}: shard {url}: sample {key!r} has no .{ext} component ({have})"
                    )
            seen[url] += 1
            yield s
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile, network and pipe errors all become one clear message
        where = f"after sample {key!r}" if key else "at its first sample"
        raise ValueError(f"{shards.field}: shard {url}: read failed {where}: {type(e).__name__}: {e}") from e
    for u, n in zip(urls, counts):
        if seen[u] < n:
            raise ValueError(
                f"{shards.field}: shard {u} ended after {seen[u]} samples (last key {key!r}) but should "
                f"hold {n}: truncated or replaced shard"
            )


def rank_stream(
    shards: ShardSet, begin: int, end: int, shuffle_seed: int | None, shuffle_buffer: int
) -> Iterator[dict]:
    """Raw samples [begin, end) of the split (global numbering in shard order), optionally shuffled."""
    if begin >= end:
        return iter(())
    starts = [0, *itertools.accumulate(shards.counts)]
    first = bisect.bisect_right(starts, begin) - 1
    last = bisect.bisect_left(starts, end)  # exclusive shard index
    urls, counts = shards.urls[first:last], shards.counts[first:last]
    raw = itertools.chain.from_iterable(_shard_samples(u, shards) for u in urls)
    skip = begin - starts[first]
    # Shards before `skip` and after `end` are read only as far as needed: skipping costs I/O, not decoding.
    samples = itertools.islice(_checked(iter(raw), shards, urls, counts), skip, skip + end - begin)
    if shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
        samples = wds.shuffle(bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng)(samples)
    return samples


def epoch_batches(
    samples: Iterator[dict], num_real: int, num_batches: int, batch: int, start_batch: int = 0
) -> Iterator[tuple[int, list[dict], int]]:
    """Yield (batch index, samples, number of real samples at the front) for batches start_batch..end."""
    samples = iter(samples)
    last = None
    for b in range(num_batches):
        group = list(itertools.islice(samples, batch)) if b * batch < num_real else []
        real = len(group)
        if group:
            last = group[-1]
        if real < batch:
            if last is None:  # a rank whose range is empty (more ranks than samples): pad with anything
                raise ValueError("validation rank has no samples to pad with; use fewer ranks than samples")
            group += [last] * (batch - real)
        if b >= start_batch:
            yield b, group, real


def external_source_batches(
    shards: ShardSet, begin: int, end: int, shuffle_seed, shuffle_buffer: int, num_batches: int, batch: int,
    start_batch: int,
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]:  # fmt: skip
    """Per batch: encoded jpg bytes, raw .cls bytes, sample names (uint8 arrays) for fn.external_source."""
    stream = rank_stream(shards, begin, end, shuffle_seed, shuffle_buffer)
    for _, group, _ in epoch_batches(stream, end - begin, num_batches, batch, start_batch):
        as_u8 = lambda b: np.frombuffer(b, dtype=np.uint8)
        yield (
            [as_u8(s["jpg"]) for s in group],
            [as_u8(s["cls"]) for s in group],
            [as_u8(sample_name(s["__url__"], s["__key__"]).encode()) for s in group],
        )
