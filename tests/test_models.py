"""PVT v1 / v2: the authors' parameter counts, shapes, weights compatibility and attention math."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from pvt_dist.models import build_model, list_models, load_pretrained
from pvt_dist.models.summary import count_flops

# REFERENCE.md §1-2: parameters with a 1000-class head, and GMACs at 224.
AUTHORS = {
    "pvt_tiny": (13_229_288, 1.93),
    "pvt_small": (24_485_864, 3.82),
    "pvt_medium": (44_208_104, 6.66),
    "pvt_large": (61_369_320, 9.81),
    "pvt_v2_b0": (3_666_760, 0.57),
    "pvt_v2_b1": (14_009_000, 2.11),
    "pvt_v2_b2": (25_362_856, 4.03),
    "pvt_v2_b2_li": (22_553_512, 3.89),
    "pvt_v2_b3": (45_238_696, 6.90),
    "pvt_v2_b4": (62_556_072, 10.10),
    "pvt_v2_b5": (81_956_008, 11.72),
}


def test_registry_lists_all_variants_and_rejects_unknown():
    assert sorted(AUTHORS) == list_models()
    with pytest.raises(ValueError, match="unknown model 'pvt_huge'.*pvt_tiny"):
        build_model("pvt_huge")


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_parameter_count_equals_authors(name):
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == AUTHORS[name][0]


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li"])
def test_gmacs_within_two_percent(name):
    gmacs = count_flops(build_model(name), 224) / 2e9
    assert gmacs == pytest.approx(AUTHORS[name][1], rel=0.02)


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li"])
@pytest.mark.parametrize("size", [(224, 224), (320, 320), (800, 1333)])
def test_logits_and_pyramid_shapes(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    x = torch.randn(1, 3, *size)
    ceil = name.startswith("pvt_v2")  # v2's padded overlapping convs ceil, v1's k=s convs floor
    expect_hw = []
    h, w = size
    for stride in (4, 2, 2, 2):
        h, w = (math.ceil(h / stride), math.ceil(w / stride)) if ceil else (h // stride, w // stride)
        expect_hw.append((h, w))
    with torch.no_grad():
        maps = model.forward_pyramid(x)
        if size != (800, 1333):
            assert model(x).shape == (1, 7)
    assert [tuple(m.shape[2:]) for m in maps] == expect_hw
    assert [m.shape[1] for m in maps] == model.pyramid_channels
    if size == (800, 1333) and not ceil:
        assert expect_hw == [(200, 333), (100, 166), (50, 83), (25, 41)]


def test_out_indices_select_maps():
    model = build_model("pvt_v2_b0", features_only=True, out_indices=(3,)).eval()
    with torch.no_grad():
        (c5,) = model.forward_pyramid(torch.randn(2, 3, 128, 96))
    assert c5.shape == (2, 256, 4, 3)
    assert model.pyramid_channels == [256] and model.pyramid_strides == [32]


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b2_li"])
def test_state_dict_round_trip_is_strict_and_exact(name):
    torch.manual_seed(0)
    a = build_model(name, num_classes=5).eval()
    torch.manual_seed(1)
    b = build_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, img_size=64, drop_path_rate=0.0)
    model(torch.randn(2, 3, 64, 64)).square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_grad_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    model = build_model("pvt_tiny", num_classes=3, img_size=64, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sr", "plain", "linear"])
def test_sdpa_equals_explicit_softmax_attention(kind):
    from pvt_dist.models.layers import SpatialReductionAttention

    torch.manual_seed(0)
    attn = SpatialReductionAttention(64, 2, sr_ratio=4 if kind == "sr" else 1, linear=kind == "linear").eval()
    hw = (16, 12)
    x = torch.randn(3, hw[0] * hw[1], 64)
    q, k, v = attn.qkv(x, hw)
    weights = (q @ k.transpose(-2, -1) * attn.head_dim**-0.5).softmax(dim=-1)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(3, -1, 64))
    torch.testing.assert_close(attn(x, hw), ref, rtol=0, atol=1e-5)


def _authors_pvt_v1_forward(sd: dict, x: torch.Tensor, depths, heads=(1, 2, 5, 8), srs=(8, 4, 2, 1)):
    """PVT v1 written op by op over the authors' state-dict keys (their forward, explicit attention)."""
    bsz = x.shape[0]
    for i in range(1, 5):
        p = f"patch_embed{i}."
        x = F.conv2d(x, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=4 if i == 1 else 2)
        h, w = x.shape[2:]
        c = x.shape[1]
        x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-5)
        pos = sd[f"pos_embed{i}"]
        if i == 4:
            cls_pos, pos = pos[:, :1], pos[:, 1:]
        g = math.isqrt(pos.shape[1])
        if (g, g) != (h, w):
            pos = F.interpolate(pos.reshape(1, g, g, c).permute(0, 3, 1, 2), (h, w), mode="bilinear")
            pos = pos.flatten(2).transpose(1, 2)
        x = x + pos
        if i == 4:
            x = torch.cat([(sd["cls_token"] + cls_pos).expand(bsz, -1, -1), x], 1)
        nh, d = heads[i - 1], c // heads[i - 1]
        for j in range(depths[i - 1]):
            b = f"block{i}.{j}."
            y = F.layer_norm(x, (c,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
            q = (
                F.linear(y, sd[b + "attn.q.weight"], sd[b + "attn.q.bias"])
                .reshape(bsz, -1, nh, d)
                .transpose(1, 2)
            )
            if srs[i - 1] > 1:
                r = srs[i - 1]
                y = F.conv2d(y.transpose(1, 2).reshape(bsz, c, h, w), sd[b + "attn.sr.weight"],
                             sd[b + "attn.sr.bias"], stride=r).flatten(2).transpose(1, 2)  # fmt: skip
                y = F.layer_norm(y, (c,), sd[b + "attn.norm.weight"], sd[b + "attn.norm.bias"], 1e-5)
            kv = F.linear(y, sd[b + "attn.kv.weight"], sd[b + "attn.kv.bias"])
            kv = kv.reshape(bsz, -1, 2, nh, d).permute(2, 0, 3, 1, 4)
            a = (q @ kv[0].transpose(-2, -1) * d**-0.5).softmax(-1) @ kv[1]
            x = x + F.linear(
                a.transpose(1, 2).reshape(bsz, -1, c), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
            )
            y = F.layer_norm(x, (c,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            x = x + F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        if i < 4:
            x = x.transpose(1, 2).reshape(bsz, c, h, w)
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("size", [224, 320])
def test_pvt_v1_matches_authors_forward(tmp_path, size):
    torch.manual_seed(0)
    authors_sd = {k: v.clone() for k, v in build_model("pvt_tiny").state_dict().items()}
    # Non-trivial norms, so a wrong eps or a swapped K/V half would show.
    for k, v in authors_sd.items():
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            v.uniform_(0.5, 1.5)
        elif k.endswith("bias"):
            v.normal_(0, 0.05)
    torch.save({"model": authors_sd}, tmp_path / "pvt_tiny.pth")
    model = build_model("pvt_tiny").eval()
    report = load_pretrained(model, tmp_path / "pvt_tiny.pth", strict=True)
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours, ref = model(x), _authors_pvt_v1_forward(authors_sd, x, [2, 2, 2, 2])
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_pvt_v2_matches_timm_on_authors_keys(name):
    """timm converts the authors' PVTv2 checkpoints with checkpoint_filter_fn: our keys must be theirs."""
    from timm.models.pvt_v2 import checkpoint_filter_fn

    torch.manual_seed(0)
    ours = build_model(name).eval()
    sd = ours.state_dict()
    assert "block1.0.mlp.dwconv.dwconv.weight" in sd and "norm4.weight" in sd
    theirs = timm.create_model(name, pretrained=False).eval()
    theirs.load_state_dict(checkpoint_filter_fn(sd, theirs), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5


def test_load_pretrained_into_backbone_drops_classification_parts(tmp_path):
    torch.manual_seed(0)
    full = build_model("pvt_small").eval()
    torch.save(full.state_dict(), tmp_path / "plain.pth")
    backbone = build_model("pvt_small", features_only=True, img_size=320).eval()
    report = load_pretrained(backbone, tmp_path / "plain.pth")
    assert report.missing == [] and report.unexpected == []
    assert "dropped cls_token" in report.adapted and "dropped head.weight" in report.adapted
    assert backbone.pos_embed4.shape == (1, 100, 512)  # 10x10 grid, no cls slot
    # At the checkpoint's own size the backbone's stage-3 map equals the full model's.
    bb224 = build_model("pvt_small", features_only=True).eval()
    load_pretrained(bb224, tmp_path / "plain.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(bb224.forward_pyramid(x)[2], full.forward_pyramid(x)[2], atol=1e-6)


def test_load_pretrained_new_head_and_errors(tmp_path):
    torch.manual_seed(0)
    torch.save({"state_dict": build_model("pvt_v2_b0").state_dict()}, tmp_path / "wrapped.pth")
    model = build_model("pvt_v2_b0", num_classes=10)
    report = load_pretrained(model, tmp_path / "wrapped.pth")
    assert report.missing == [] and any(a.startswith("kept fresh head.weight") for a in report.adapted)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained(model, tmp_path / "garbage.pth")
    with pytest.raises(ValueError, match="shape mismatch for block1.0"):
        load_pretrained(build_model("pvt_v2_b1"), tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="missing=.*block1.2"):
        load_pretrained(
            build_model("pvt_v2_b2", embed_dims=[32, 64, 160, 256]), tmp_path / "wrapped.pth", strict=True
        )
