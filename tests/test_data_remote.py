"""Remote shards (http://, pipe:) streamed by webdataset into DALI's external source."""

from __future__ import annotations

import errno
import functools
import http.server
import itertools
import os
import shutil
import threading

import numpy as np
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


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, but the first `plan` requests for .tar files fail: "drop" closes the connection
    without a reply, "cut" sends the headers and 40% of the bytes, then closes."""

    plan: list[str] = []
    requests: list[str] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path.endswith(".tar"):
            self.requests.append(self.path)
            action = self.plan.pop(0) if self.plan else "serve"
            if action == "drop":
                self.close_connection = True
                return
            if action == "cut":
                data = open(self.translate_path(self.path), "rb").read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) * 2 // 5])
                self.close_connection = True
                return
        super().do_GET()


@pytest.fixture
def flaky_http(fmnist_shards):
    handler = functools.partial(FlakyHandler, directory=str(fmnist_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyHandler.requests.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}", FlakyHandler
    FlakyHandler.plan.clear()
    server.shutdown()


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http:// URLs with curl")
def test_http_shard_survives_cut_and_dropped_connections(fmnist_shards, flaky_http, caplog):
    """A read cut after 40% of the shard, then a dropped connection: two retries, each logged and counted,
    and the batches are exactly the local reader's (the retry resumes after the samples delivered)."""
    from pvt_dist.data.stream import RETRIES

    base, handler = flaky_http
    handler.plan[:] = ["cut", "drop"]
    before = RETRIES["count"]
    remote = build_loader(cfg("", f"{base}/val-000000.tar"), "val", 0, 1, micro_batch=128, return_keys=True)
    local = build_loader(cfg("", str(fmnist_shards)), "val", 0, 1, micro_batch=128, return_keys=True)
    with caplog.at_level("WARNING", "pvt_dist.data.stream"):
        batches = list(remote)
    assert len(batches) == 4
    for (xa, ya, ka), (xb, yb, kb) in itertools.zip_longest(batches, local):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)
    assert RETRIES["count"] - before == 2
    assert len(handler.requests) == 3
    assert "retry 1/5" in caplog.text and "retry 2/5" in caplog.text and "val-000000.tar" in caplog.text
    print(f"\n[data] http shard: survived {RETRIES['count'] - before} failed reads (cut at 40%, dropped)")


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http:// URLs with curl")
def test_http_shard_that_never_recovers_fails_naming_it(flaky_http):
    """Every connection dropped: 2 retries (1 s + 2 s of backoff), then an error naming the shard."""
    import time

    base, handler = flaky_http
    handler.plan[:] = ["drop"] * 100
    c = cfg("", f"{base}/val-000000.tar", stream_retries=2, stream_retry_max_s=60.0, val_samples=512)
    loader = build_loader(c, "val", 0, 1, micro_batch=128)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"val-000000\.tar") as e:
        list(loader)
    took = time.monotonic() - t0
    assert "gave up after 2 retries" in str(e.value), str(e.value)[-2000:]
    assert len(handler.requests) == 3 and took < 30
    print(f"\n[data] http shard never recovering: failed after 3 attempts in {took:.1f} s")


# ------------------------------------------------------------------ local shards on a network filesystem


def _train_table(root, **kw):
    from pvt_dist.data.index import SampleTable, resolve_shards

    shards = resolve_shards(str(root), "data.train_shards", "train")
    shards.retries, shards.retry_max_s = kw.get("retries", 5), kw.get("max_s", 120.0)
    return SampleTable(shards)


def test_local_shard_that_vanishes_for_a_moment_is_reread(tmp_path, fmnist_shards, caplog):
    """A training shard unreachable for ~1 s (a network filesystem remounting, failing over): the read is
    retried after 1 s of backoff, logged and counted, and returns the same bytes as an undisturbed read."""
    from pvt_dist.data.index import RETRIES

    root = tmp_path / "shards"
    shutil.copytree(fmnist_shards, root)
    expected = _train_table(root).read_batch(np.arange(4))
    table = _train_table(root)
    tar = root / table.urls[0].rsplit("/", 1)[-1]
    hidden = tar.with_suffix(".away")
    tar.rename(hidden)
    threading.Timer(0.5, hidden.rename, args=(tar,)).start()
    before = RETRIES["count"]
    with caplog.at_level("WARNING"):
        got = table.read_batch(np.arange(4))
    assert got == expected
    assert RETRIES["count"] - before == 1 and "retry 1/5" in caplog.text and tar.name in caplog.text


def test_local_shard_that_never_comes_back_fails_naming_it(tmp_path, fmnist_shards):
    root = tmp_path / "shards"
    shutil.copytree(fmnist_shards, root)
    table = _train_table(root, retries=2)
    tar = root / table.urls[0].rsplit("/", 1)[-1]
    tar.unlink()
    with pytest.raises(
        OSError, match=rf"data.train_shards: shard .*{tar.name}: reading sample .* failed after 2 retries"
    ):
        table.read_batch(np.arange(2))


def _eio_on(monkeypatch, fails) -> None:
    """os.pread failing with EIO (what NFS or Lustre return for a moment) on the calls n (from 0) where
    ``fails(n)``; SampleTable reads every sample with one pread."""
    real, calls = os.pread, itertools.count()

    def pread(fd, size, offset):
        if fails(next(calls)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)


def test_dali_validation_survives_failed_reads_and_counts_them(fmnist_shards, monkeypatch, caplog):
    """Validation of local shards reads through the index files too: a read failing with EIO at the first
    batch and another in the second are each retried after 1 s, logged and counted, and the evaluation
    returns exactly the batches of an undisturbed one."""
    from pvt_dist.data.index import RETRIES

    c = cfg("", str(fmnist_shards), backend="dali")
    expected = list(build_loader(c, "val", 1, 2, micro_batch=100, return_keys=True))
    loader = build_loader(c, "val", 1, 2, micro_batch=100, return_keys=True)
    _eio_on(monkeypatch, lambda n: n in (0, 150))
    before = RETRIES["count"]
    with caplog.at_level("WARNING"):
        got = list(loader)
    assert RETRIES["count"] - before == 2
    assert caplog.text.count("val-000000.tar: read failed (Input/output error); retry 1/5 in 1 s") == 2
    assert len(got) == 3
    for (xa, ya, ka), (xb, yb, kb) in zip(got, expected, strict=True):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_dali_validation_shard_that_never_recovers_fails_naming_it(fmnist_shards, monkeypatch):
    c = cfg("", str(fmnist_shards), backend="dali", stream_retries=2)
    loader = build_loader(c, "val", micro_batch=64)
    _eio_on(monkeypatch, lambda n: True)
    with pytest.raises(
        OSError,
        match=r"data\.val_shards: shard \S+/val-000000\.tar: reading sample 'fmnist_val_\d+' failed after 2 "
        r"retries in \d+ s: Input/output error",
    ):
        list(loader)
