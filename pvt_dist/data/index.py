"""Shard lists: expanding shard specs, reading DALI index files and manifests, catching bad shards early.

Every check here runs before the first batch so that a missing, truncated or re-written shard fails the
job at start-up with the shard and sample key in the message instead of hours into an epoch.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field

import braceexpand
import numpy as np

from pvt_dist.data.config import is_remote
from pvt_dist.paths import stays_inside

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REQUIRED_EXTS = ("jpg", "cls")


@dataclass
class IndexEntry:
    """One sample of a shard as recorded in its DALI index file."""

    key: str
    components: dict[str, tuple[int, int]]  # ext -> (data offset, size) in bytes


@dataclass
class ShardSet:
    """The resolved shards of one split."""

    field: str  # config field the shards came from, for error messages ("data.train_shards")
    urls: list[str]  # local paths or remote URLs, in dataset order
    counts: list[int]  # samples per shard
    index_paths: list[str] = field(default_factory=list)  # local only: DALI .idx per shard
    remote: bool = False
    retries: int = 0  # reopen attempts per failed shard read (data.stream_retries)
    retry_max_s: float = 0.0  # total retry time per shard (data.stream_retry_max_s)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def index_path_for(tar_path: str) -> str:
    """train-000001.tar -> train-000001.idx (the convention make_shards and wds2idx use)."""
    return tar_path[: -len(".tar")] + ".idx" if tar_path.endswith(".tar") else tar_path + ".idx"


def read_manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_index(idx_path: str) -> list[IndexEntry]:
    """Parse a DALI webdataset index ("v1.2 N" then per sample: `ext offset size name` groups)."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v"):
            raise ValueError(f"{idx_path}: not a DALI webdataset index (header {' '.join(header)!r})")
        entries = []
        for line in f:
            parts = line.split()
            if not parts:
                continue
            comps, key = {}, None
            for i in range(0, len(parts) - 3, 4):
                ext, off, size, name = parts[i : i + 4]
                comps[ext] = (int(off), int(size))
                key = name[: name.find(".")] if "." in name else name
            entries.append(IndexEntry(key=key, components=comps))
    if len(entries) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(entries)}")
    return entries


def index_count(tar_path: str, idx_path: str, fld: str) -> int:
    """Samples in a shard from its index header alone (cheap; no validation of the shard)."""
    if not os.path.isfile(tar_path):
        raise FileNotFoundError(f"{fld}: shard {tar_path} does not exist")
    try:
        with open(idx_path) as f:
            return int(f.readline().split()[1])
    except (OSError, IndexError, ValueError):
        raise FileNotFoundError(f"{fld}: shard {tar_path} has no readable index {idx_path}") from None


def _tar_member_name(header: bytes) -> str:
    """Name stored in a 512-byte ustar header (prefix + name)."""
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{prefix}/{name}" if prefix else name


def check_shard(tar_path: str, idx_path: str, fld: str, num_classes: int | None = None) -> int:
    """Validate a local shard against its index; return its sample count.

    Catches: missing tar or index, truncated tar (a sample ends past the end of the file), stale index
    (headers at the indexed offsets name other members, or the tar holds members after the last indexed
    sample), and samples without `.jpg` or `.cls`. Errors name the config field, shard and key.
    """
    if not os.path.isfile(tar_path):
        raise FileNotFoundError(f"{fld}: shard {tar_path} does not exist")
    if not os.path.isfile(idx_path):
        raise FileNotFoundError(
            f"{fld}: index {idx_path} for shard {tar_path} does not exist (create it: `wds2idx {tar_path}`)"
        )
    try:
        entries = read_index(idx_path)
    except ValueError as e:
        raise ValueError(f"{fld}: shard {tar_path}: {e}") from None
    if not entries:
        raise ValueError(f"{fld}: shard {tar_path} has no samples in {idx_path}")
    for e in entries:
        for ext in REQUIRED_EXTS:
            if ext not in e.components:
                raise ValueError(
                    f"{fld}: shard {tar_path}: sample {e.key!r} has no .{ext} component "
                    f"(has {sorted(e.components)})"
                )
    size = os.path.getsize(tar_path)
    end = max(off + sz for off, sz in entries[-1].components.values())
    if end > size:
        raise ValueError(
            f"{fld}: shard {tar_path} is truncated: sample {entries[-1].key!r} ends at byte {end} "
            f"but the file has {size} bytes"
        )
    with open(tar_path, "rb") as f:
        for e in (entries[0], entries[-1]):
            for ext, (off, _) in e.components.items():
                f.seek(off - 512)
                name = _tar_member_name(f.read(512))
                if name != f"{e.key}.{ext}":
                    raise ValueError(
                        f"{fld}: stale index {idx_path}: sample {e.key!r} .{ext} is indexed at byte {off} "
                        f"of {tar_path} but the tar has {name!r} there; re-run `wds2idx {tar_path}`"
                    )
        # After the last member only zero blocks (end-of-archive marker + record padding) may follow.
        f.seek((end + 511) // 512 * 512)
        trailer = f.read(512)
        if trailer.strip(b"\0"):
            raise ValueError(
                f"{fld}: stale index {idx_path}: {tar_path} has members after the last indexed sample "
                f"{entries[-1].key!r}; re-run `wds2idx {tar_path}`"
            )
    return len(entries)


def _expand_local(spec: str, fld: str, split: str) -> list[str]:
    paths: list[str] = []
    for part in spec.split("::"):
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            mpath = os.path.join(part, MANIFEST)
            if not os.path.isfile(mpath):
                raise FileNotFoundError(f"{fld}: directory {part} has no {MANIFEST}; give a shard pattern")
            manifest = read_manifest(mpath)
            if split not in manifest.get("splits", {}):
                raise ValueError(f"{fld}: {mpath} has no split {split!r}")
            names = [s["name"] for s in manifest["splits"][split]["shards"]]
            for name in names:
                if not stays_inside(name):
                    raise ValueError(f"{fld}: {mpath} names shard {name!r} outside {part}")
            paths += [os.path.join(part, name) for name in names]
        elif any(ch in part for ch in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise FileNotFoundError(f"{fld}: pattern {part} matches no shard")
            paths += found
        else:
            paths += list(braceexpand.braceexpand(part))
    return paths


S3_COMMAND = "aws s3 cp --quiet {url} -"


def stream_url(url: str) -> str:
    """URL webdataset can open: s3:// has no built-in opener, so it becomes the usual `pipe:aws s3 cp`.

    The URL is shell-quoted: webdataset runs a ``pipe:`` command through the shell, and a shard name with
    ``;``, ``$()`` or spaces must stay one argument, never a command."""
    return f"pipe:{S3_COMMAND.format(url=shlex.quote(url))}" if url.startswith("s3://") else url


def shard_label(url: str) -> str:
    """Short shard name for messages and sample names: the .tar file name inside a path, URL or pipe."""
    tars = [tok for tok in url.split() if ".tar" in tok]
    return os.path.basename(tars[-1] if tars else url)


def _remote_counts(urls: list[str], spec: str, fld: str, total: int | None) -> list[int]:
    """Samples per remote shard, from a manifest.json next to the shards, else spread `total` evenly."""
    import webdataset as wds

    base = urls[0].rsplit("/", 1)[0]
    names = [u.rsplit("/", 1)[-1] for u in urls]
    if not urls[0].startswith("pipe:"):
        try:
            with wds.gopen(stream_url(f"{base}/{MANIFEST}"), "rb") as f:
                manifest = json.load(f)
            by_name = {
                s["name"]: s["num_samples"] for sp in manifest["splits"].values() for s in sp["shards"]
            }
            if all(n in by_name for n in names):
                return [by_name[n] for n in names]
        except Exception:  # noqa: BLE001 - any failure means "no usable manifest"; fall through
            pass
    if total is None:
        raise ValueError(
            f"{fld}: cannot count the samples of remote shards {spec!r} (no {MANIFEST} next to them); "
            f"set data.{fld.split('.')[-1].replace('shards', 'samples')}"
        )
    base_n, rem = divmod(total, len(urls))
    return [base_n + (i < rem) for i in range(len(urls))]


def resolve_shards(
    spec: str, fld: str, split: str, num_samples: int | None = None, check: bool = True
) -> ShardSet:
    """Turn a shard spec into concrete shards with sample counts; local shards are validated."""
    if not spec:
        raise ValueError(f"{fld}: no shards given")
    if is_remote(spec):
        urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
        counts = _remote_counts(urls, spec, fld, num_samples)
        return ShardSet(field=fld, urls=[stream_url(u) for u in urls], counts=counts, remote=True)
    paths = [os.path.abspath(p) for p in _expand_local(spec, fld, split)]
    idx = [index_path_for(p) for p in paths]
    counts = [check_shard(p, i, fld) if check else index_count(p, i, fld) for p, i in zip(paths, idx)]
    if num_samples is not None and num_samples != sum(counts):
        raise ValueError(f"{fld}: shards hold {sum(counts)} samples but the config says {num_samples}")
    return ShardSet(field=fld, urls=paths, counts=counts, index_paths=idx)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Global sample range [begin, end) of a rank: DALI's reader shard split (floor(n*r/w))."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


# Failed shard reads retried in this process (streamed shards, and local ones on a network filesystem);
# the trainer logs it to TensorBoard as data/stream_retries.
RETRIES = {"count": 0}


def retry_delay(attempt: int, spent: float, retries: int, max_s: float) -> float | None:
    """Backoff before retry ``attempt + 1`` (1, 2, 4, ... s, capped at 30 s), None once past the limits:
    ``retries`` attempts or ``max_s`` seconds in all."""
    delay = min(2.0**attempt, 30.0)
    if attempt >= retries or spent + delay > max_s:
        return None
    return delay


class SampleTable:
    """Random access to the samples of local shards by global number (shard order), via their index files.

    What a world-size-independent order needs (see order.py): any sample read next, at the cost of one
    ``pread`` (its .jpg and .cls members at their indexed offsets), in any process (the files are opened
    per process, so DataLoader workers do not share offsets).
    """

    def __init__(self, shards: ShardSet):
        if shards.remote:
            raise ValueError(f"{shards.field}: remote shards cannot be read in random order")
        self.field, self.urls = shards.field, shards.urls
        self.labels = [shard_label(u) for u in shards.urls]
        shard, keys, offsets = [], [], []
        for s, idx in enumerate(shards.index_paths):
            for e in read_index(idx):
                shard.append(s)
                keys.append(e.key)
                offsets.append((*e.components["jpg"], *e.components["cls"]))
        self.shard = np.asarray(shard, dtype=np.int32)
        self.keys = keys
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 4)  # jpg off, size, cls off, size
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        # A network filesystem (NFS, Lustre, GPFS) can fail a read for a moment (EIO, ESTALE, a timeout):
        # the file is reopened and the read retried with backoff, within data.stream_retries /
        # data.stream_retry_max_s, each retry logged and counted (data/stream_retries in TensorBoard).
        self.retries, self.retry_max_s = shards.retries, shards.retry_max_s

    def __len__(self) -> int:
        return len(self.keys)

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.urls[s], os.O_RDONLY)
        return fd

    def read_batch(self, indices: np.ndarray) -> tuple[list[bytes], list[bytes], list[str]]:
        """(.jpg bytes, .cls bytes, names) of ``indices``: one ``pread`` per sample, spanning both members
        (they are neighbours in a webdataset tar), and the table looked up once per batch."""
        shards = self.shard[indices].tolist()
        rows = self.offsets[indices].tolist()
        jpgs, classes, names = [], [], []
        for i, s, (jo, js, co, cs) in zip(indices.tolist(), shards, rows):
            lo, hi = min(jo, co), max(jo + js, co + cs)
            blob = self._pread(s, i, hi - lo, lo)
            jpgs.append(blob[jo - lo : jo - lo + js])
            classes.append(blob[co - lo : co - lo + cs])
            names.append(f"{self.labels[s]}:{self.keys[i]}")
        return jpgs, classes, names

    def read_jpgs(self, indices: np.ndarray) -> list[bytes]:
        """.jpg bytes of ``indices``, one ``pread`` each of exactly the member (no slicing copy): what the
        DALI source feeds, as zero-copy ``np.frombuffer`` views."""
        return self._read_members(indices, 0)

    def read_classes(self, indices: np.ndarray) -> tuple[list[bytes], list[str]]:
        """(.cls bytes, "shard.tar:key" names) of ``indices``: the labels that go with ``read_jpgs``."""
        shards = self.shard[indices].tolist()
        names = [f"{self.labels[s]}:{self.keys[i]}" for i, s in zip(indices.tolist(), shards)]
        return self._read_members(indices, 2), names

    def _read_members(self, indices: np.ndarray, column: int) -> list[bytes]:
        """One member per sample: .jpg (``column`` 0) or .cls (2), at its indexed (offset, size)."""
        shards = self.shard[indices].tolist()
        rows = self.offsets[indices, column : column + 2].tolist()
        return [self._pread(s, i, size, off) for i, s, (off, size) in zip(indices.tolist(), shards, rows)]

    def _pread(self, s: int, i: int, size: int, offset: int) -> bytes:
        """Exactly ``size`` bytes of sample ``i`` at ``offset`` in shard ``s``, retrying failed reads; a short
        read (the shard is shorter than its index says) is an error naming shard and sample."""
        attempt, t0 = 0, time.monotonic()
        while True:
            try:
                blob = os.pread(self._fd(s), size, offset)
            except OSError as e:
                fd = self._fds.pop(s, None)  # a stale handle is useless: reopen on the next attempt
                if fd is not None:
                    os.close(fd)
                spent = time.monotonic() - t0
                delay = retry_delay(attempt, spent, self.retries, self.retry_max_s)
                if delay is None:
                    raise OSError(
                        f"{self.field}: shard {self.urls[s]}: reading sample {self.keys[i]!r} failed"
                        + (f" after {attempt} retries in {spent:.0f} s" if attempt else "")
                        + f": {e.strerror or e}"
                    ) from e
                attempt += 1
                RETRIES["count"] += 1
                log.warning(
                    "%s: shard %s: read failed (%s); retry %d/%d in %.0f s",
                    self.field, self.urls[s], e.strerror or e, attempt, self.retries, delay,
                )  # fmt: skip
                time.sleep(delay)
                continue
            if len(blob) != size:
                raise ValueError(f"{self.field}: shard {self.urls[s]}: sample {self.keys[i]!r} is truncated")
            return blob

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
