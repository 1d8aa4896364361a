"""The DALI backend's RandAugment (data/dali_randaugment.py) against timm's on the same real photos."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.auto_aug.core import signed_bin  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402

from pvt_dist.data import dali_randaugment as dra  # noqa: E402
from pvt_dist.data.config import parse_rand_augment  # noqa: E402

SPEC = parse_rand_augment("rand-m9-mstd0.5-inc1")
SIZE = 224
LINEAR = types.INTERP_LINEAR
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
EXACT = {"Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"}
# Mean |difference| /255 allowed against timm (bicubic for geometric ops). Geometric: DALI's warps are
# bilinear (measured 1.0-2.1 vs PIL bicubic, 0.3-0.55 vs PIL bilinear); Equalize: OpenCV's lookup table vs
# PIL's (measured 3.7); the enhance ops and AutoContrast: rounding (measured <= 0.51).
TOL = {"Equalize": 4.5, **{n: 2.6 for n in GEOMETRIC}}


@pytest.fixture(scope="module")
def photos():
    import skimage

    sk = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    return [np.asarray(Image.open(sk / n).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)) for n in names]


def dali_ops(photos, level: float, sign: int) -> dict:
    """Every op of the DALI suite at one level and sign (0: positive) on `photos`."""
    ops = dra.timm_ops(SPEC, (SIZE, SIZE))
    b = len(photos)

    @pipeline_def(batch_size=b, num_threads=1, device_id=None, seed=1)
    def pipe():
        x = fn.external_source(source=lambda: photos, batch=True, layout="HWC")
        bins = fn.external_source(source=lambda: [np.array(np.int32(round(level / dra.LEVEL_STEP)))] * b)
        signs = fn.external_source(source=lambda: [np.array(np.int32(sign))] * b)
        mag = signed_bin(bins, random_sign=signs)
        n_bins = len(dra.levels(SPEC.mmax))
        return tuple(
            op(
                x,
                magnitude_bin=mag,
                num_magnitude_bins=n_bins,
                fill=dra.TIMM_FILL,
                interp_type=types.INTERP_LINEAR,
            )
            for _, op in ops
        )

    p = pipe()
    p.build()
    return {name: [np.array(o.at(i)) for i in range(b)] for (name, _), o in zip(ops, p.run())}


def timm_ops(photos, names, level: float, sign: int, interp, monkeypatch) -> dict:
    """timm's AugmentOp (prob 1, no magnitude noise) with its random sign fixed to `sign`."""
    monkeypatch.setattr(timm_aa.random, "random", lambda: 0.0 if sign == 0 else 1.0)
    hp = dict(img_mean=dra.TIMM_FILL, interpolation=interp, magnitude_std=0)
    out = {
        n: [
            np.asarray(timm_aa.AugmentOp(n, prob=1.0, magnitude=level, hparams=hp)(Image.fromarray(x)))
            for x in photos
        ]
        for n in names
    }
    monkeypatch.setattr(timm_aa.random, "random", random.random)
    return out


def mad(a, b) -> float:
    return float(np.mean([np.abs(x.astype(np.float64) - y.astype(np.float64)).mean() for x, y in zip(a, b)]))


@pytest.mark.parametrize("level,sign", [(9, 0), (9, 1), (5, 0)])
def test_each_op_matches_timm_on_photos(photos, level, sign, monkeypatch):
    dali = dali_ops(photos, level, sign)
    assert list(dali) == timm_aa._RAND_INCREASING_TRANSFORMS
    bicubic = timm_ops(photos, dali, level, sign, Image.BICUBIC, monkeypatch)
    bilinear = timm_ops(photos, GEOMETRIC, level, sign, Image.BILINEAR, monkeypatch)
    for name, out in dali.items():
        diff, effect = mad(out, bicubic[name]), mad(bicubic[name], photos)
        print(f"level {level} sign {sign} {name:22s} DALI vs timm {diff:5.2f}  timm effect {effect:6.2f}")
        if name in EXACT:
            assert all(np.array_equal(a, b) for a, b in zip(out, bicubic[name])), name
            continue
        assert diff <= TOL.get(name, 0.8), name
        assert effect > 2 * diff, name  # the op does something the comparison resolves
        if name in GEOMETRIC:  # same resampler: the geometry itself (matrix, center, sign, fill) agrees
            assert mad(out, bilinear[name]) <= 0.8, name


def test_policy_draws_op_choice_and_magnitudes_as_timm():
    """timm's policy as its code defines it: op choice uniform over 15 with replacement, p 0.5 for each of
    2 layers, magnitudes gauss(9, 0.5) clipped to 10 (the graph's own draws, 2048 layer applications)."""
    b, runs = 256, 4

    @pipeline_def(batch_size=b, num_threads=1, device_id=None, seed=7, enable_conditionals=True)
    def pipe():
        x = fn.random.uniform(range=[0, 255], shape=(8, 8, 3), dtype=types.UINT8)
        _, ops, lv = dra.rand_augment(fn.reshape(x, layout="HWC"), SPEC, (8, 8), return_draws=True)
        return ops, lv

    p = pipe()
    p.build()
    ops, lv = [], []
    for _ in range(runs):
        o, m = p.run()
        ops += [np.array(o.at(i)) for i in range(b)]
        lv += [np.array(m.at(i)) for i in range(b)]
    ops, lv = np.concatenate(ops), np.concatenate(lv)  # [2 * b * runs]
    total = len(ops)
    applied = ops < 15
    assert abs(applied.mean() - 0.5) < 4 * np.sqrt(0.25 / total)
    counts = np.bincount(ops[applied], minlength=15)
    expect = total * 0.5 / 15
    assert (np.abs(counts - expect) < 5 * np.sqrt(expect)).all(), counts
    m = lv[applied]
    # gauss(9, 0.5) clipped to [0, 10]: mean 8.998, std 0.49, P(level = 10) = 2.3 %; grid of 0.1 level.
    assert abs(m.mean() - 9.0) < 0.05 and abs(m.std() - 0.49) < 0.05 and m.max() <= 10.0
    assert 0.005 < (m >= 10.0).mean() < 0.05
