"""Remote shards (http://, pipe:) streamed by webdataset into DALI's external source."""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import shutil
import threading

import pytest
import torch

from pvt_dist.data import DataConfig, build_loader


@pytest.fixture(scope="module")
def http_shards(fmnist_shards):
    """http:// base URL serving the Fashion-MNIST test shards (and their manifest.json)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fmnist_shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def cfg(train: str, val: str, **kw) -> DataConfig:
    base = dict(train_shards=train, val_shards=val, num_classes=10, train_size=32, val_size=32, crop_pct=1.0)
    return DataConfig(**{**base, "num_threads": 1, "fallback_workers": 0, "shuffle_buffer": 256, **kw})


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http:// URLs with curl")
def test_http_val_equals_local(fmnist_shards, http_shards):
    """Counts come from the manifest next to the shards; decoded batches equal the local reader's."""
    remote = build_loader(
        cfg("", f"{http_shards}/val-000000.tar"), "val", 0, 2, micro_batch=100, return_keys=True
    )
    local = build_loader(cfg("", str(fmnist_shards)), "val", 0, 2, micro_batch=100, return_keys=True)
    assert remote.shards.remote and remote.num_samples == 512 and remote.batches_per_epoch == 3
    for (xa, ya, ka), (xb, yb, kb) in itertools.zip_longest(remote, local):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_pipe_train_sharding_and_resume(fmnist_shards):
    spec = f"pipe:cat {fmnist_shards}/train-{{000000..000003}}.tar"
    c = cfg(spec, "", train_samples=2048)
    loaders = [build_loader(c, "train", r, 2, seed=5, micro_batch=64, return_keys=True) for r in range(2)]
    runs = [list(ld) for ld in loaders]
    assert [len(r) for r in runs] == [16, 16]
    keys = [[k for _, _, ks in r for k in ks] for r in runs]
    assert len(set(keys[0]) | set(keys[1])) == 2048 == len(keys[0]) + len(keys[1])
    # Mid-epoch resume skips the consumed batches of the (deterministically shuffled) stream.
    ld = build_loader(c, "train", 1, 2, seed=5, micro_batch=64, return_keys=True)
    head = list(itertools.islice(ld, 6))
    resumed = build_loader(c, "train", 1, 2, seed=5, micro_batch=64, return_keys=True)
    resumed.load_state_dict(ld.state_dict())
    tail = list(resumed)
    assert [k for _, _, ks in head + tail for k in ks] == keys[1]


def test_pipe_fallback_matches_local(fmnist_shards):
    c = cfg("", f"pipe:cat {fmnist_shards}/val-000000.tar", backend="fallback", val_samples=512)
    remote = list(build_loader(c, "val", 1, 3, micro_batch=64, return_keys=True))
    local = list(
        build_loader(c.replace(val_shards=str(fmnist_shards)), "val", 1, 3, micro_batch=64, return_keys=True)
    )
    assert len(remote) == len(local) == 3
    for (xa, ya, ka), (xb, yb, kb) in zip(remote, local):
        assert [k.split(":")[1] for k in ka] == [k.split(":")[1] for k in kb]
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_s3_urls_stream_through_aws_cli(fmnist_shards, tmp_path, monkeypatch):
    """s3:// becomes `pipe:aws s3 cp URL -`; an `aws` stand-in serving a local folder stands in for S3."""
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/bin/sh\n# aws s3 cp --quiet s3://bucket/KEY -\nexec cat "{fmnist_shards}/${{4#s3://bucket/}}"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    c = cfg("s3://bucket/train-{000000..000003}.tar", "s3://bucket/val-000000.tar")
    val = build_loader(c, "val", 0, 1, micro_batch=128, return_keys=True)
    assert val.num_samples == 512 and val.shards.urls == [
        "pipe:aws s3 cp --quiet s3://bucket/val-000000.tar -"
    ]
    local = build_loader(
        c.replace(val_shards=str(fmnist_shards)), "val", 0, 1, micro_batch=128, return_keys=True
    )
    for (xa, ya, ka), (xb, yb, kb) in itertools.zip_longest(val, local):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)
    train = build_loader(c, "train", 1, 2, seed=0, micro_batch=64, return_keys=True)
    assert train.num_samples == 2048 and len(list(train)) == 16
