"""Bad shards fail before the first batch (or at the sample, when streamed) naming the shard and the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import webdataset as wds
from wds2idx import IndexCreator

from pvt_dist.data import DataConfig, build_loader
from pvt_dist.data.index import read_index


def cfg_for(shards: str, **kw) -> DataConfig:
    base = dict(
        train_shards=shards,
        val_shards=shards,
        num_classes=10,
        train_size=32,
        val_size=32,
        num_threads=1,
        fallback_workers=0,
    )
    return DataConfig(**{**base, **kw})


def copy_shards(src: Path, dst: Path, names=("val-000000",)) -> Path:
    dst.mkdir(exist_ok=True)
    for n in names:
        for ext in (".tar", ".idx"):
            shutil.copy(src / f"{n}{ext}", dst / f"{n}{ext}")
    return dst


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    with IndexCreator(str(path), str(path.with_suffix(".idx")), verbose=False) as ic:
        ic.create_index()


def jpg_of(fmnist_shards: Path) -> bytes:
    return next(iter(wds.WebDataset(str(fmnist_shards / "val-000000.tar"), shardshuffle=False)))["jpg"]


@pytest.mark.parametrize("backend", ["dali", "fallback"])
def test_missing_shard(fmnist_shards, backend):
    spec = str(fmnist_shards / "train-{000000..000005}.tar")
    with pytest.raises(
        FileNotFoundError, match=r"data\.train_shards: shard .*/train-000004\.tar does not exist"
    ):
        build_loader(cfg_for(spec, backend=backend), "train", micro_batch=8)


def test_missing_index(fmnist_shards, tmp_path):
    d = copy_shards(fmnist_shards, tmp_path)
    (d / "val-000000.idx").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"data\.val_shards: index .*val-000000\.idx for shard .*wds2idx"
    ):
        build_loader(cfg_for(str(d / "val-000000.tar")), "val", micro_batch=8)


def test_truncated_tar(fmnist_shards, tmp_path):
    d = copy_shards(fmnist_shards, tmp_path)
    tar = d / "val-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size * 2 // 3])
    last = read_index(str(d / "val-000000.idx"))[-1].key
    with pytest.raises(ValueError, match=rf"shard {tar} is truncated: sample '{last}' ends at byte"):
        build_loader(cfg_for(str(tar)), "val", micro_batch=8)


def test_stale_index_other_shard(fmnist_shards, tmp_path):
    d = copy_shards(fmnist_shards, tmp_path, names=("train-000000",))
    shutil.copy(fmnist_shards / "train-000001.tar", d / "train-000000.tar")  # tar replaced, index kept
    first = read_index(str(d / "train-000000.idx"))[0].key
    with pytest.raises(ValueError, match=rf"stale index .*sample '{first}' \.(cls|jpg) is indexed at byte"):
        build_loader(cfg_for(str(d / "train-000000.tar")), "train", micro_batch=8)


def test_stale_index_after_append(fmnist_shards, tmp_path):
    jpg = jpg_of(fmnist_shards)
    tar = tmp_path / "x-000000.tar"
    write_shard(tar, [{"__key__": f"k{i}", "jpg": jpg, "cls": i} for i in range(3)])
    idx = (tmp_path / "x-000000.idx").read_bytes()
    write_shard(tar, [{"__key__": f"k{i}", "jpg": jpg, "cls": i} for i in range(4)])
    (tmp_path / "x-000000.idx").write_bytes(idx)
    with pytest.raises(ValueError, match=r"stale index .* has members after the last indexed sample 'k2'"):
        build_loader(cfg_for(str(tar)), "val", micro_batch=2)


@pytest.mark.parametrize("backend", ["dali", "fallback"])
def test_sample_without_cls(fmnist_shards, tmp_path, backend):
    jpg = jpg_of(fmnist_shards)
    tar = tmp_path / "x-000000.tar"
    write_shard(tar, [{"__key__": "a", "jpg": jpg, "cls": 1}, {"__key__": "nolabel", "jpg": jpg}])
    with pytest.raises(ValueError, match=rf"shard {tar}: sample 'nolabel' has no \.cls component"):
        build_loader(cfg_for(str(tar), backend=backend), "val", micro_batch=2)


def test_streamed_sample_without_cls(fmnist_shards, tmp_path):
    """Remote shards cannot be checked up front: the error comes with the sample, naming it."""
    jpg = jpg_of(fmnist_shards)
    tar = tmp_path / "x-000000.tar"
    write_shard(tar, [{"__key__": "a", "jpg": jpg, "cls": 1}, {"__key__": "nolabel", "jpg": jpg}])
    for backend in ("dali", "fallback"):
        cfg = cfg_for(f"pipe:cat {tar}", backend=backend, val_samples=2)
        with pytest.raises(
            (ValueError, RuntimeError), match=r"shard pipe:cat .*x-000000\.tar: sample 'nolabel' has"
        ):
            list(build_loader(cfg, "val", micro_batch=2))


def test_streamed_truncated_shard(fmnist_shards, tmp_path):
    d = copy_shards(fmnist_shards, tmp_path)
    tar = d / "val-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    cfg = cfg_for(f"pipe:cat {tar}", backend="fallback", val_samples=512)
    with pytest.raises(
        ValueError, match=r"shard pipe:cat .*val-000000\.tar.* (read failed|ended after|has no \.jpg)"
    ):
        list(build_loader(cfg, "val", micro_batch=64))


@pytest.mark.parametrize("backend", ["dali", "fallback"])
def test_corrupt_jpeg_in_shard(fmnist_shards, tmp_path, backend):
    jpg = jpg_of(fmnist_shards)
    tar = tmp_path / "x-000000.tar"
    write_shard(
        tar, [{"__key__": "good", "jpg": jpg, "cls": 1}, {"__key__": "broken", "jpg": b"\xff\xd8garbage"}]
    )
    with pytest.raises((ValueError, RuntimeError)) as err:
        list(build_loader(cfg_for(str(tar), backend=backend), "val", micro_batch=2))
    assert (
        "data.val_shards" in str(err.value)
        and "x-000000.tar" in str(err.value)
        and "broken" in str(err.value)
    )


def test_label_out_of_range(fmnist_shards):
    cfg = cfg_for(str(fmnist_shards), num_classes=5)
    with pytest.raises(
        ValueError, match=r"sample val-000000\.tar:fmnist_val_\d+: label \d outside \[0, data\.num"
    ):
        list(build_loader(cfg, "val", micro_batch=64))


def test_remote_without_count(fmnist_shards):
    with pytest.raises(ValueError, match=r"data\.train_shards: cannot count .* set data\.train_samples"):
        build_loader(cfg_for(f"pipe:cat {fmnist_shards}/train-000000.tar"), "train", micro_batch=8)
