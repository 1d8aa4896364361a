"""DALI (CPU) and fallback loaders on real Fashion-MNIST shards: sharding, order, resume, layout, Mixup."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pvt_dist.data import DataConfig, build_loader, build_mixup

BACKENDS = ["dali", "fallback"]


def make_cfg(path, **kw) -> DataConfig:
    base = dict(
        train_shards=str(path),
        val_shards=str(path),
        num_classes=10,
        train_size=32,
        val_size=32,
        crop_pct=1.0,
        num_threads=1,
        fallback_workers=0,
        shuffle_buffer=256,
    )
    return DataConfig(**{**base, **kw})


def run(loader, limit=None):
    """All (images, labels, keys) of one pass, optionally only the first `limit` batches."""
    return list(itertools.islice(loader, limit))


def keys_of(batches, real_only=True):
    return [k for _, y, ks in batches for k, lab in zip(ks, y.tolist()) if lab >= 0 or not real_only]


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_ranks_cover_epoch_once(fmnist_shards, backend):
    cfg = make_cfg(fmnist_shards, backend=backend)
    loaders = [build_loader(cfg, "train", r, 2, seed=3, micro_batch=64, return_keys=True) for r in range(2)]
    assert [ld.batches_per_epoch for ld in loaders] == [16, 16] and loaders[0].num_samples == 2048
    per_rank = [keys_of(run(ld)) for ld in loaders]
    assert [len(k) for k in per_rank] == [1024, 1024]
    assert len(set(per_rank[0]) | set(per_rank[1])) == 2048  # 2048 = 2 ranks x 16 x 64: all, once each
    # Epoch 1 is another permutation of the split; re-running epoch 0 reproduces its order exactly.
    for ld in loaders:
        assert ld.epoch == 1
    nxt = [keys_of(run(ld)) for ld in loaders]
    assert len(set(nxt[0]) | set(nxt[1])) == 2048 and set(nxt[0]) != set(per_rank[0])
    again = build_loader(cfg, "train", 0, 2, seed=3, micro_batch=64, return_keys=True)
    again.set_epoch(0)
    assert keys_of(run(again)) == per_rank[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_exactly_once_with_padding(fmnist_shards, backend):
    cfg = make_cfg(fmnist_shards, backend=backend)
    world, mb = 3, 50  # 512 = 170 + 171 + 171 -> 4 batches of 50 on every rank, the rest label -1
    runs = [
        run(build_loader(cfg, "val", r, world, seed=0, micro_batch=mb, return_keys=True))
        for r in range(world)
    ]
    assert [len(b) for b in runs] == [4, 4, 4]
    real = [k for b in runs for k in keys_of(b)]
    assert len(real) == len(set(real)) == 512
    padded = sum(int((y == -1).sum()) for b in runs for _, y, _ in b)
    assert padded == world * 4 * mb - 512
    for b in runs:
        for x, y, _ in b:
            assert x.shape == (mb, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert int(y.max()) < 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_is_exact(fmnist_shards, backend):
    cfg = make_cfg(fmnist_shards, backend=backend)
    full = run(build_loader(cfg, "train", 1, 2, seed=7, micro_batch=32, return_keys=True))
    ld = build_loader(cfg, "train", 1, 2, seed=7, micro_batch=32, return_keys=True)
    head = run(ld, limit=5)
    state = ld.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 5)
    resumed = build_loader(cfg, "train", 1, 2, seed=7, micro_batch=32, return_keys=True)
    resumed.load_state_dict([{"rank": 0}, state])  # all ranks' states, e.g. gathered and saved by rank 0
    assert resumed.state_dict() == state  # saved again before the first step: the same position
    resumed.set_epoch(0)  # what a trainer does at the top of the epoch loop; keeps the position
    tail = run(resumed)
    assert len(tail) == len(full) - 5
    assert keys_of(head) + keys_of(tail) == keys_of(full)
    for (xa, ya, _), (xb, yb, _) in zip(full[5:], tail):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)  # same augmentation too
    assert resumed.epoch == 1 and resumed.state_dict()["batch"] == 0
    with pytest.raises(ValueError, match="seed=7 but this loader has 8"):
        build_loader(cfg, "train", 1, 2, seed=8, micro_batch=32).load_state_dict(state)
    # Another world size continues from the samples consumed (5 rounds of 2 x 32 = 10 batches of 32).
    one = build_loader(cfg, "train", 0, 1, seed=7, micro_batch=32)
    one.load_state_dict(state)
    assert one.state_dict()["batch"] == 10 and one.state_dict()["samples"] == 320
    with pytest.raises(ValueError, match="320 samples of epoch 0 consumed, not whole batches of 96 on 1"):
        build_loader(cfg, "train", 0, 1, seed=7, micro_batch=96).load_state_dict(state)
    other = "fallback" if backend == "dali" else "dali"
    with pytest.raises(ValueError, match=rf"data\.backend: .*saved mid-epoch by the '{backend}' backend"):
        build_loader(cfg.replace(backend=other), "train", 1, 2, seed=7, micro_batch=32).load_state_dict(state)


def round_keys(world: int, micro_batch: int, cfg: DataConfig, limit: int) -> list[str]:
    """Keys of the first `limit` rounds (batch i of every rank, in rank order) of epoch 0 at this world."""
    runs = [
        run(build_loader(cfg, "train", r, world, seed=11, micro_batch=micro_batch, return_keys=True), limit)
        for r in range(world)
    ]
    return [k for i in range(limit) for r in range(world) for k in runs[r][i][2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_order_is_the_same_at_every_world_size(fmnist_shards, backend):
    """The samples of a round of 64 are the same on 1 x 64, 2 x 32 and 4 x 16, in the same order; a world
    continues another's mid-epoch position with exactly the samples not read yet."""
    cfg = make_cfg(fmnist_shards, backend=backend)
    one = round_keys(1, 64, cfg, 6)
    assert len(set(one)) == 6 * 64
    assert round_keys(2, 32, cfg, 6) == one and round_keys(4, 16, cfg, 6) == one
    two = build_loader(cfg, "train", 1, 2, seed=11, micro_batch=32, return_keys=True)
    run(two, 2)
    state = two.state_dict()  # 2 rounds of 2 x 32 consumed
    cont = build_loader(cfg, "train", 0, 1, seed=11, micro_batch=64, return_keys=True)
    cont.load_state_dict(state)
    assert [k for _, _, ks in run(cont, 4) for k in ks] == one[128:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_augmentation(fmnist_shards, backend):
    """repeated_aug=3: each batch is 16 images x 3 views; ranks read disjoint thirds of their halves."""
    cfg = make_cfg(fmnist_shards, backend=backend, repeated_aug=3, scale=(0.3, 1.0))
    loaders = [build_loader(cfg, "train", r, 2, seed=5, micro_batch=48, return_keys=True) for r in range(2)]
    assert loaders[0].batches_per_epoch == (2048 // 2) // 48  # the epoch keeps its length in steps
    seen, per_epoch = [[], []], []
    for epoch in range(3):
        this_epoch = []
        for rank, ld in enumerate(loaders):
            ld.set_epoch(epoch)
            batches = run(ld)
            assert len(batches) == 21
            for x, y, keys in batches:
                assert (
                    x.shape == (48, 3, 32, 32) and keys == keys[:16] * 3 and torch.equal(y, y[:16].repeat(3))
                )
                views = x.view(3, 16, -1)
                differ = [
                    not torch.equal(views[a, j], views[b, j]) for j in range(16) for a, b in ((0, 1), (1, 2))
                ]
                assert sum(differ) >= 28, "the three views of an image must be augmented independently"
            seen[rank] += [k for _, _, keys in batches for k in keys[:16]]
            this_epoch += [k for _, _, keys in batches for k in keys[:16]]
        per_epoch.append(this_epoch)
    # Per epoch 21 rounds x 2 ranks x 16 distinct images of the epoch's 682 (2048 // 3), none read twice;
    # every epoch draws another third of the split, so 3 epochs cover more than one.
    assert all(len(e) == len(set(e)) == 672 for e in per_epoch)
    assert len(set(seen[0]) | set(seen[1])) > 1200
    # Mid-epoch resume stays exact with repeated views.
    ld = build_loader(cfg, "train", 1, 2, seed=5, micro_batch=48, return_keys=True)
    head, state = run(ld, limit=4), ld.state_dict()
    tail = build_loader(cfg, "train", 1, 2, seed=5, micro_batch=48, return_keys=True)
    tail.load_state_dict(state)
    full = run(build_loader(cfg, "train", 1, 2, seed=5, micro_batch=48, return_keys=True), limit=7)
    for (xa, _, ka), (xb, _, kb) in zip(full[4:], run(tail, limit=3)):
        assert ka == kb and torch.equal(xa, xb)
    assert len(head) == 4
    # A micro batch that 3 does not divide: ceil(50 / 3) = 17 images, 51 views cut to 50.
    (x, y, keys), *_ = run(
        build_loader(cfg, "train", 0, 2, seed=5, micro_batch=50, return_keys=True), limit=1
    )
    assert x.shape[0] == 50 and keys == (keys[:17] * 3)[:50] and len(set(keys)) == 17
    with pytest.raises(ValueError, match="repeats=3 but this loader has 1"):
        build_loader(cfg.replace(repeated_aug=1), "train", 1, 2, seed=5, micro_batch=48).load_state_dict(
            state
        )


def val_pixel_difference(cfg: DataConfig, micro_batch: int) -> float:
    """Mean |DALI - fallback| of the validation outputs in 0-255 pixel units; also checks keys and labels."""
    dali = run(build_loader(cfg, "val", 0, 1, seed=0, micro_batch=micro_batch, return_keys=True))
    ref = run(
        build_loader(cfg.replace(backend="fallback"), "val", 0, 1, micro_batch=micro_batch, return_keys=True)
    )
    assert keys_of(dali) == keys_of(ref) and len(dali) == len(ref)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    total, count = 0.0, 0
    for (xa, ya, _), (xb, yb, _) in zip(dali, ref):
        assert torch.equal(ya, yb) and xa.shape == xb.shape
        real = ya >= 0
        total += float(((xa - xb).abs() * std * 255)[real].sum())
        count += int(real.sum()) * xa[0].numel()
    return total / count


def test_dali_matches_fallback_on_val(fmnist_shards, photo_shards):
    """Same samples, labels and layout; pixels differ only by the resampling filters' rounding."""
    fm = val_pixel_difference(make_cfg(fmnist_shards, val_size=40, crop_pct=0.875), 128)  # 28 -> 45 -> 40
    photos = val_pixel_difference(  # real photos of many aspect ratios, ImageNet eval geometry
        make_cfg(photo_shards, val_shards=str(photo_shards / "*.tar"), num_classes=3, val_size=224), 4
    )
    print(f"DALI vs fallback val mean |pixel difference| /255: fashion-mnist {fm:.3f}, photos {photos:.3f}")
    assert fm < 1.0 and photos < 1.0


def test_train_augmentations_dali(fmnist_shards):
    cfg = make_cfg(fmnist_shards, rand_augment="rand-m9-mstd0.5-inc1", random_erase=0.5)
    plain = run(build_loader(make_cfg(fmnist_shards), "train", 0, 1, seed=1, micro_batch=64), limit=2)
    aug = run(build_loader(cfg, "train", 0, 1, seed=1, micro_batch=64), limit=2)
    for (xa, ya), (xb, yb) in zip(plain, aug):
        assert torch.equal(ya, yb) and torch.isfinite(xb).all() and not torch.equal(xa, xb)
    again = run(build_loader(cfg, "train", 0, 1, seed=1, micro_batch=64), limit=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug, again))


def test_fallback_rand_augment_runs(fmnist_shards):
    cfg = make_cfg(fmnist_shards, backend="fallback", rand_augment="rand-m9-mstd0.5-inc1", random_erase=0.25)
    (x, y), *_ = run(build_loader(cfg, "train", 0, 1, seed=1, micro_batch=16), limit=1)
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all()


def test_mixup_cutmix_soft_targets(fmnist_shards):
    assert build_mixup(make_cfg(fmnist_shards)) is None
    cfg = make_cfg(fmnist_shards, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mix = build_mixup(cfg)
    (x, y), *_ = run(build_loader(cfg, "train", 0, 1, seed=0, micro_batch=32), limit=1)
    np.random.seed(0)  # timm draws lambda and the Mixup/CutMix switch from numpy
    xm, t = mix(x.clone(), y)
    assert xm.shape == x.shape and t.shape == (32, 10) and not torch.equal(xm, x)
    # "batch" mode: every target is lam * smooth(y) + (1 - lam) * smooth(y flipped), one lam per batch.
    smooth = lambda labels: torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01
    own, other = smooth(y), smooth(y.flip(0))
    i = int((y != y.flip(0)).nonzero()[0])
    lam = float((t[i, y[i]] - other[i, y[i]]) / (own[i, y[i]] - other[i, y[i]]))
    assert 0.0 <= lam <= 1.0 and torch.allclose(t, lam * own + (1 - lam) * other, atol=1e-6)


def test_config_errors(fmnist_shards):
    with pytest.raises(ValueError, match=r"data\.crop_pct"):
        make_cfg(fmnist_shards, crop_pct=1.5).validate()
    with pytest.raises(ValueError, match=r"data\.backend"):
        make_cfg(fmnist_shards, backend="ffcv").validate()
    with pytest.raises(ValueError, match=r"data\.rand_augment"):
        make_cfg(fmnist_shards, rand_augment="rand-x9").validate()
    with pytest.raises(ValueError, match=r"data\.train_shards: 2048 samples cannot fill one batch"):
        build_loader(make_cfg(fmnist_shards), "train", 0, 2, micro_batch=2000)


@pytest.mark.gpu
def test_dali_gpu_decoding(photo_shards):
    """The "mixed" nvJPEG path: same samples as the CPU graph, outputs on the GPU, exact mid-epoch resume."""
    cfg = make_cfg(
        photo_shards, val_shards=str(photo_shards / "*.tar"), num_classes=3, val_size=224, device="gpu"
    )
    gpu = run(build_loader(cfg, "val", 0, 1, micro_batch=4, device="cuda", return_keys=True))
    cpu = run(
        build_loader(cfg.replace(device="cpu"), "val", 0, 1, micro_batch=4, device="cpu", return_keys=True)
    )
    assert keys_of(gpu) == keys_of(cpu)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    for (xg, yg, _), (xc, yc, _) in zip(gpu, cpu):
        assert xg.is_cuda and yg.is_cuda and torch.equal(yg.cpu(), yc)
        assert float(((xg.cpu() - xc).abs() * std * 255).mean()) < 2.0  # nvJPEG vs libjpeg-turbo rounding
    train = cfg.replace(train_size=64, rand_augment="rand-m9-mstd0.5-inc1", random_erase=0.25)
    full = run(build_loader(train, "train", 0, 1, seed=2, micro_batch=2, device="cuda", return_keys=True))
    ld = build_loader(train, "train", 0, 1, seed=2, micro_batch=2, device="cuda", return_keys=True)
    head = run(ld, 2)
    resumed = build_loader(train, "train", 0, 1, seed=2, micro_batch=2, device="cuda", return_keys=True)
    resumed.load_state_dict(ld.state_dict())
    tail = run(resumed)
    assert keys_of(head + tail) == keys_of(full)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], tail))


def test_fallback_workers_keep_order(fmnist_shards):
    """Worker processes split the batches round-robin; the result is the in-process stream, bit for bit."""
    cfg = make_cfg(fmnist_shards, backend="fallback")
    inproc = run(build_loader(cfg, "train", 0, 2, seed=4, micro_batch=32, return_keys=True), 5)
    two = run(
        build_loader(
            cfg.replace(fallback_workers=2), "train", 0, 2, seed=4, micro_batch=32, return_keys=True
        ),
        5,
    )
    assert keys_of(inproc) == keys_of(two)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(inproc, two))


def test_dali_global_order_images_are_their_keys(fmnist_shards):
    """Training in the global order feeds DALI the JPEGs alone and labels them from the sample table: with
    the crop covering the whole image and no flip, DALI's batches (rank 1 of 2, resumed mid-epoch from its
    checkpoint as well) hold the fallback's pixels of the same keys, so every image sits at its own label."""
    cfg = make_cfg(fmnist_shards, train_size=28, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    ref = run(build_loader(cfg.replace(backend="fallback"), "train", 1, 2, seed=3, micro_batch=32,
                           return_keys=True), 6)  # fmt: skip
    ld = build_loader(cfg, "train", 1, 2, seed=3, micro_batch=32, return_keys=True)
    got = run(ld, 3)
    resumed = build_loader(cfg, "train", 1, 2, seed=3, micro_batch=32, return_keys=True)
    resumed.load_state_dict(ld.state_dict())
    got += run(resumed, 3)
    std = 255 * torch.tensor(cfg.std[: ref[0][0].shape[1]]).view(1, -1, 1, 1)  # normalized -> /255 units

    def pixel_diff(xa, xb):  # per image: mean |pixel difference| in /255
        return ((xa - xb).abs() * std).flatten(1).mean(1)

    for (xa, ya, ka), (xb, yb, kb) in zip(ref, got, strict=True):
        assert ka == kb and torch.equal(ya, yb)
        assert pixel_diff(xa, xb).max() < 2.0, f"up to {pixel_diff(xa, xb).max():.2f}/255"
    assert pixel_diff(ref[0][0][1:], got[0][0][:-1]).min() > 5.0  # a neighbour's image is far outside it
