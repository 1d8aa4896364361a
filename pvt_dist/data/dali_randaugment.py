"""timm's RandAugment (`rand_augment_transform`, e.g. "rand-m9-mstd0.5-inc1") as a DALI graph.

The same policy as timm 1.0's `RandAugment` of `AugmentOp`s: `n` ops drawn uniformly with replacement
from timm's 15 (the increasing set for inc1), each applied with probability `p`, each application with its
own magnitude gauss(m, mstd) clipped to [0, mmax] and, for signed ops, its own random sign; every op maps
the level (0-10) to its argument with timm's formula. Built from DALI's auto_aug blocks: `@augmentation`
ops whose parameters are tabulated per magnitude bin (`mag_range` = the level grid below), `signed_bin`
for the signs, `select` to split the batch among the ops; DALI's own ops (`augmentations` module) where
they compute what PIL does, new ones for the rest (PIL's affine geometry, per-channel fill).

What DALI's `rand_augment` lacks and is built here: a continuous per-sample magnitude (quantized to
LEVEL_STEP), the p gate (a not-applied op is `identity`), Invert and
SolarizeAdd in the suite, timm's posterize (4 - int(4 level / 10) bits, down to 0), the translate range
relative to the image side, and the per-channel fill `img_mean`. DALI's warps resample nearest or
linear only, so the geometric ops are bilinear where timm's train transform (interpolation "bicubic")
uses PIL bicubic: docs/data_fidelity.md measures every op against timm's on the same photos.

One graph for both devices: the images are uint8 HWC on "cpu" or "gpu" (after the "mixed" decoder);
parameter tables live on the images' device where an op computes with them, on the CPU where they are
operator arguments (angles, matrices, factors). The pipeline needs `enable_conditionals=True`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from nvidia.dali.auto_aug import augmentations as dali_aug
from nvidia.dali.auto_aug.core import _Augmentation, augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

from pvt_dist.data.config import RandAugmentSpec
from pvt_dist.data.dali_import import dmath, fn, types

LEVEL_STEP = 0.1
"""Resolution of the noisy magnitude: levels are drawn continuously and rounded to this grid, whose every
point has its op parameters precomputed (one bin of DALI's auto_aug tables per step). 0.1 level is 0.3
deg of rotation, 0.003 of shear, 1/5 of mstd 0.5. Tracing the pipeline cost time per bin while DALI's
autograph converted the table computation (~80 s at 0.01 on one CPU core, measured); the tables are now
computed once per process outside it (`TabulatedAugmentation`), finer grids not re-measured."""

TIMM_FILL = (124, 116, 104)
"""timm's `img_mean` for the ImageNet mean: round(255 * (0.485, 0.456, 0.406)), the geometric ops' fill."""


def levels(mmax: float) -> np.ndarray:
    """The magnitude grid [0, LEVEL_STEP, ..., mmax] (float64), index = magnitude bin."""
    return np.arange(round(mmax / LEVEL_STEP) + 1) * LEVEL_STEP


# --- level -> op argument, as timm's LEVEL_TO_ARG (signed levels come negated by DALI's random sign) ---


def _enhance_increasing(signed_level: float) -> float:
    """ColorIncreasing & co.: factor 1 +- 0.9 level / 10, kept >= 0.1."""
    return max(0.1, 1.0 + signed_level / 10 * 0.9)


def _enhance(level: float) -> float:
    """Color & co. (inc0): factor 0.1 .. 1.9 over the level, no sign."""
    return level / 10 * 1.8 + 0.1


def _posterize_mask(level: float, increasing: bool) -> np.ndarray:
    """uint8 mask keeping timm's number of most significant bits: 4 - int(4 level / 10) (inc1) or
    int(4 level / 10); 0 bits is a black image, as PIL's ImageOps.posterize gives."""
    bits = int(level / 10 * 4)
    bits = 4 - bits if increasing else bits
    return np.array(~(2 ** (8 - bits) - 1) & 0xFF, dtype=np.uint8)


def _solarize_threshold(level: float, increasing: bool) -> np.ndarray:
    thresh = min(256, int(level / 10 * 256))
    return np.array(256 - thresh if increasing else thresh, dtype=np.int32)


def _pil_rotation(degrees: float, h: int, w: int) -> np.ndarray:
    """PIL's `Image.rotate(degrees)` (counter-clockwise about the center) as its output->input matrix."""
    a = -math.radians(degrees)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15)]
    cx, cy = w / 2.0, h / 2.0
    m.append(0.0)
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy
    return np.array(m, dtype=np.float32).reshape(2, 3)


def _affine(*coefficients: float) -> np.ndarray:
    """PIL's affine tuple (a, b, c, d, e, f) as the 2 x 3 matrix DALI's warp_affine takes."""
    return np.array(coefficients, dtype=np.float32).reshape(2, 3)


# --- DALI ops ---


@augmentation
def pil_affine(data, matrix, fill, interp_type):
    """PIL's `Image.transform(size, AFFINE, matrix, fillcolor=fill)`: `matrix` maps output pixel centers to
    input ones (DALI's inverse map, same pixel-center convention). DALI's warp fills with one scalar; timm
    fills with the per-channel mean, so the image is shifted by -fill, warped with fill 0 and shifted back:
    the interpolation weights sum to 1, so in-image pixels are unchanged and outside pixels get `fill`."""
    fill = types.Constant(np.array(fill, dtype=np.float32), device=data.device or "cpu")
    shifted = fn.cast(data, dtype=types.FLOAT) - fill
    warped = fn.warp_affine(shifted, matrix=matrix, inverse_map=True, fill_value=0.0, interp_type=interp_type)
    return fn.cast(dmath.clamp(warped + fill, 0.0, 255.0), dtype=types.UINT8)


@augmentation
def luma_color(data, factor):
    """PIL's ImageEnhance.Color: blend with the ITU-R 601 luma image (DALI's `saturation` for RGB)."""
    return fn.saturation(data, saturation=factor)


class TabulatedAugmentation(_Augmentation):
    """DALI's `Augmentation` whose parameter table is computed once, as plain Python.

    DALI tabulates ``mag_to_param`` over the magnitude grid every time an op is called in a pipeline
    definition, and with ``enable_conditionals`` that runs under autograph (which converts
    nvidia.dali.auto_aug): ~2.5 ms per bin, ~9 s of every training pipeline build (one per epoch) on a
    CPU core, measured at rand-m9-mstd0.5-inc1. The table depends on the grid only, so it is computed
    unconverted and kept on the augmentation; `timm_ops` keeps one suite per process, so later builds
    reuse it."""

    @do_not_convert
    def _map_mags_to_params(self, magnitudes):
        tables = self.__dict__.setdefault("_tables", {})
        key = np.asarray(magnitudes).tobytes()
        if key not in tables:
            tables[key] = super()._map_mags_to_params(magnitudes)
        return tables[key]


@functools.cache
def timm_ops(spec: RandAugmentSpec, shape_hw: tuple[int, int], channels: int = 3) -> tuple:
    """timm's RandAugment op list for `spec` (its order: `_RAND_INCREASING_TRANSFORMS` or
    `_RAND_TRANSFORMS`), as (timm name, DALI Augmentation) pairs over the magnitude grid `levels(mmax)`.

    Call an op as `op(images, magnitude_bin=signed_bin(bins, random_sign=signs),
    num_magnitude_bins=len(levels(spec.mmax)), fill=..., interp_type=...)`; `shape_hw` is the images'
    (H, W) (every RandAugment input of a pipeline has the train crop's size). Built once per arguments
    and process: the ops keep their parameter tables (`TabulatedAugmentation`).
    """
    h, w = shape_hw
    grid, inc = levels(spec.mmax), spec.increasing

    def tabulated(op, to_param, negate: bool):
        kw = dict(mag_range=grid, randomly_negate=negate, mag_to_param=to_param)
        return op.augmentation(**kw, augmentation_cls=TabulatedAugmentation)

    def signed(op, to_param):
        return tabulated(op, to_param, True)

    def unsigned(op, to_param):
        return tabulated(op, to_param, False)

    def warp(to_matrix):
        return signed(pil_affine, to_matrix)

    def enhance(op, to_factor=None):
        if inc:
            return signed(op, to_factor or (lambda lv: np.float32(_enhance_increasing(lv))))
        return unsigned(op, to_factor or (lambda lv: np.float32(_enhance(lv))))

    def sharp_kernel(lv):  # factor -> DALI's PIL-equivalent 3x3 kernel
        factor = _enhance_increasing(lv) if inc else _enhance(lv)
        return dali_aug.sharpness_kernel(np.float32(factor - 1.0)).astype(np.float32)

    suffix = "Increasing" if inc else ""
    color = enhance(luma_color) if channels == 3 else dali_aug.identity  # PIL: Color of "L" is a no-op
    return (
        ("AutoContrast", dali_aug.auto_contrast),
        ("Equalize", dali_aug.equalize),
        ("Invert", dali_aug.invert),
        ("Rotate", warp(lambda lv: _pil_rotation(lv / 10 * 30.0, h, w))),
        ("Posterize" + suffix, unsigned(dali_aug.posterize, lambda lv: _posterize_mask(lv, inc))),
        ("Solarize" + suffix, unsigned(dali_aug.solarize, lambda lv: _solarize_threshold(lv, inc))),
        ("SolarizeAdd", unsigned(dali_aug.solarize_add, lambda lv: np.uint8(min(128, int(lv / 10 * 110))))),
        ("Color" + suffix, color),
        ("Contrast" + suffix, enhance(dali_aug.contrast)),
        ("Brightness" + suffix, enhance(dali_aug.brightness)),
        ("Sharpness" + suffix, enhance(dali_aug.sharpness, sharp_kernel)),
        ("ShearX", warp(lambda lv: _affine(1, lv / 10 * 0.3, 0, 0, 1, 0))),
        ("ShearY", warp(lambda lv: _affine(1, 0, 0, lv / 10 * 0.3, 1, 0))),
        ("TranslateXRel", warp(lambda lv: _affine(1, 0, lv / 10 * 0.45 * w, 0, 1, 0))),
        ("TranslateYRel", warp(lambda lv: _affine(1, 0, 0, 0, 1, lv / 10 * 0.45 * h))),
    )


def draw_levels(spec: RandAugmentSpec):
    """Per sample, [n] float magnitudes as timm's AugmentOp draws them: gauss(m, mstd) (uniform(0, m) for
    mstd inf, m for mstd 0), clipped to [0, mmax]."""
    shape = (spec.n,)
    if spec.mstd == math.inf:
        raw = fn.random.uniform(range=[0.0, spec.m], shape=shape)
    elif spec.mstd > 0:
        raw = fn.random.normal(mean=spec.m, stddev=spec.mstd, shape=shape)
    else:
        raw = fn.random.normal(shape=shape) * 0.0 + spec.m
    return dmath.clamp(raw, 0.0, spec.mmax)


def rand_augment(
    images,
    spec: RandAugmentSpec,
    shape_hw: tuple[int, int],
    fill: tuple[int, ...] = TIMM_FILL,
    interp_type=types.INTERP_LINEAR,
    return_draws: bool = False,
):
    """timm's RandAugment policy `spec` on a batch of uint8 HWC `images` of size `shape_hw`.

    fill: per-channel value of pixels the geometric ops bring in (timm's hparams["img_mean"]).
    interp_type: the geometric ops' resampling (DALI warps: INTERP_LINEAR or INTERP_NN).
    return_draws: also return, per sample, the [n] int32 index into `timm_ops(spec, ...)` of each layer's
    op (len(ops) where the p gate skipped it) and the [n] float32 levels used; for tests.
    """
    channels = len(fill)
    ops = [op for _, op in timm_ops(spec, shape_hw, channels)]
    skipped = len(ops)
    ops.append(dali_aug.identity)
    n = spec.n
    chosen = fn.random.uniform(values=list(range(skipped)), shape=(n,), dtype=types.INT32)
    applied = fn.random.coin_flip(probability=spec.p, shape=(n,), dtype=types.INT32)
    op_idx = applied * chosen + (1 - applied) * skipped
    bins = fn.cast(dmath.floor(draw_levels(spec) / LEVEL_STEP + 0.5), dtype=types.INT32)
    signs = fn.random.uniform(values=[0, 1], shape=(n,), dtype=types.INT32)
    mags = signed_bin(bins, random_sign=signs)  # sampled before the split, as DALI's auto_aug advises
    num_bins = len(levels(spec.mmax))
    for layer in range(n):
        images = select(
            ops, op_idx[layer], images, magnitude_bin=mags[layer], num_magnitude_bins=num_bins,
            fill=tuple(float(v) for v in fill), interp_type=interp_type,
        )  # fmt: skip
    if return_draws:
        return images, op_idx, fn.cast(bins, dtype=types.FLOAT) * LEVEL_STEP
    return images
