"""MSDeformAttn: the grid_sample core against an explicit per-point bilinear sum, layouts, init and grads."""

import math

import pytest
import torch

from pvt_dist.detection.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from pvt_dist.engine.cpu_bf16 import fp32_gemm

SHAPES = [(6, 9), (3, 5), (2, 2)]  # non-square levels, coarsest last


def _level_start(shapes: torch.Tensor) -> torch.Tensor:
    return torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])


def bilinear_reference(value, shapes, locations, weights):
    """Explicit sum over points of the 4 corner pixels (pixel centres at (i + 0.5) / size, zeros outside)."""
    value, locations, weights = value.detach(), locations.detach(), weights.detach()
    n, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = locations.shape
    starts = _level_start(shapes).tolist()
    out = torch.zeros(n, q, m, d, dtype=torch.float64)
    for b in range(n):
        for qi in range(q):
            for h in range(m):
                for lvl in range(n_levels):
                    hl, wl = shapes[lvl].tolist()
                    for p in range(n_points):
                        x = float(locations[b, qi, h, lvl, p, 0]) * wl - 0.5
                        y = float(locations[b, qi, h, lvl, p, 1]) * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=torch.float64)
                        for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yy < hl and 0 <= xx < wl:
                                    acc += wy * wx * value[b, starts[lvl] + yy * wl + xx, h].double()
                        out[b, qi, h] += float(weights[b, qi, h, lvl, p]) * acc
    return out.flatten(2)


def _attn():
    """A small module whose offsets and weights depend on the query (at init their weights are zero)."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    return attn


def _random_case(seed=0, n=2, q=5, m=2, d=4, points=3):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    s = int(shapes.prod(1).sum())
    value = torch.randn(n, s, m, d, generator=g)
    # [-0.3, 1.3]: a good share of the samples fall partly or wholly outside the map.
    locations = torch.rand(n, q, m, len(SHAPES), points, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(n, q, m, len(SHAPES), points, generator=g)
    return value, shapes, locations, weights


def test_core_equals_explicit_bilinear_with_points_outside():
    value, shapes, loc, w = _random_case()
    outside = ((loc < 0) | (loc > 1)).any(-1)
    assert outside.float().mean() > 0.2 and (~outside).float().mean() > 0.2  # both kinds are exercised
    got = ms_deform_attn_core(value, shapes, loc, w)
    assert got.shape == (2, 5, 8)
    torch.testing.assert_close(got.double(), bilinear_reference(value, shapes, loc, w), rtol=1e-5, atol=1e-5)


def test_core_hits_pixel_centres_exactly():
    value, shapes, _, _ = _random_case(d=1, m=1)
    # Level 0 is 6x9: the centre of pixel (row 2, col 7) is ((7 + 0.5) / 9, (2 + 0.5) / 6).
    loc = torch.zeros(2, 1, 1, 3, 1, 2)
    loc[:, 0, 0, 0, 0] = torch.tensor([7.5 / 9, 2.5 / 6])
    w = torch.zeros(2, 1, 1, 3, 1)
    w[:, 0, 0, 0, 0] = 1.0
    got = ms_deform_attn_core(value, shapes, loc, w)
    torch.testing.assert_close(got[:, 0, 0], value[:, 2 * 9 + 7, 0, 0], rtol=1e-6, atol=1e-6)


def _module_inputs(ref_dim, seed=1, n=2, q=7, c=16):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    s = int(shapes.prod(1).sum())
    query = torch.randn(n, q, c, generator=g)
    x = torch.randn(n, s, c, generator=g)
    if ref_dim == 2:
        ref = torch.rand(n, q, len(SHAPES), 2, generator=g)
    else:
        ref = torch.cat(
            [torch.rand(n, q, len(SHAPES), 2, generator=g), 0.1 + 0.4 * torch.rand(n, q, len(SHAPES), 2)], -1
        )
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[1, ::3] = True  # image 1 has padding tokens on every level
    return query, ref, x, shapes, _level_start(shapes), mask


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_equals_explicit_sampling_locations(ref_dim):
    attn = _attn()
    query, ref, x, shapes, start, mask = _module_inputs(ref_dim)
    out = attn(query, ref, x, shapes, start, mask)
    assert out.shape == query.shape

    n, q, _ = query.shape
    value = attn.value_proj(x).masked_fill(mask[..., None], 0).view(n, -1, 2, 8)
    off = attn.sampling_offsets(query).view(n, q, 2, 3, 3, 2)
    w = attn.attention_weights(query).view(n, q, 2, 9).softmax(-1).view(n, q, 2, 3, 3)
    if ref_dim == 2:  # offsets in pixels of each level
        wh = torch.tensor([[w_, h_] for h_, w_ in SHAPES], dtype=torch.float32)
        loc = ref[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    else:  # offsets as fractions of half the reference box over n_points
        loc = ref[:, :, None, :, None, :2] + off / 3 * ref[:, :, None, :, None, 2:] * 0.5
    want = attn.output_proj(bilinear_reference(value, shapes, loc, w).float())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_padding_tokens_do_not_contribute():
    attn = _attn()
    query, ref, x, shapes, start, mask = _module_inputs(2)
    out = attn(query, ref, x, shapes, start, mask)
    x2 = x.clone()
    x2[mask] = 1e3 * torch.randn(int(mask.sum()), x.shape[-1])
    torch.testing.assert_close(attn(query, ref, x2, shapes, start, mask), out)


def test_init_matches_deformable_detr():
    attn = MSDeformAttn()  # 256, 4 levels, 8 heads, 4 points
    assert attn.sampling_offsets.weight.shape == (256, 256)
    assert attn.attention_weights.weight.shape == (128, 256)
    assert attn.sampling_offsets.weight.abs().max() == 0 and attn.attention_weights.weight.abs().max() == 0
    assert attn.attention_weights.bias.abs().max() == 0
    assert attn.value_proj.bias.abs().max() == 0 and attn.output_proj.bias.abs().max() == 0
    bias = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    # Head 1 points at 45 degrees (1, 1); head 2 straight down (0, 1); point i at distance i+1.
    torch.testing.assert_close(bias[1, 2, 3], torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[4, 3, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)


def test_gradients_reach_every_parameter_and_input():
    attn = _attn()
    query, ref, x, shapes, start, mask = _module_inputs(4)
    query.requires_grad_(True)
    ref.requires_grad_(True)
    x.requires_grad_(True)
    attn(query, ref, x, shapes, start, mask).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, t in (("query", query), ("reference_points", ref), ("input_flatten", x)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert x.grad[mask].abs().max() == 0  # padding values are masked out


@pytest.mark.parametrize("mode", ["autocast", "cpu_bf16_gemm"])
def test_bf16_modes_track_fp32(mode):
    attn = _attn()
    query, ref, x, shapes, start, mask = _module_inputs(2)
    want = attn(query, ref, x, shapes, start, mask)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(query, ref, x, shapes, start, mask)
    else:  # DeepSpeed bf16: weights and activations stored in bf16
        attn = attn.to(torch.bfloat16)
        with fp32_gemm():
            got = attn(query.bfloat16(), ref.bfloat16(), x.bfloat16(), shapes, start, mask)
        assert got.dtype == torch.bfloat16
    got.float().square().sum().backward()  # the backward runs in this mode too
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters())
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
