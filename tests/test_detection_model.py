"""DETR model parts: sine positions from the mask, transformer masking, PVT backbone stages and weights."""

import pytest
import torch

from pvt_dist.detection.backbone import Backbone, BackboneConfig
from pvt_dist.detection.detr import DETRConfig, build_detr
from pvt_dist.detection.position_encoding import PositionEmbeddingSine
from pvt_dist.detection.postprocess import PostProcess
from pvt_dist.detection.transformer import Transformer, TransformerConfig

SMALL = TransformerConfig(
    d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64, dropout=0.0
)


def test_sine_positions_ignore_padding():
    pe = PositionEmbeddingSine(16, normalize=True)
    alone = pe(torch.zeros(1, 5, 7, dtype=torch.bool))
    mask = torch.ones(1, 9, 12, dtype=torch.bool)
    mask[:, :5, :7] = False
    padded = pe(mask)
    assert alone.shape == (1, 32, 5, 7)
    assert torch.allclose(padded[:, :, :5, :7], alone, atol=1e-6)
    # normalize: the last valid row/column sits at 2*pi; first half of channels is y, second half x.
    assert float(alone[0, 0, -1, 0]) == pytest.approx(torch.sin(torch.tensor(2 * torch.pi)).item(), abs=1e-4)
    assert float(alone[0, 16, 0, -1]) == pytest.approx(0.0, abs=1e-4)


def test_transformer_shapes_and_padding_invariance():
    torch.manual_seed(0)
    tr = Transformer(SMALL).eval()
    src, pos = torch.randn(6, 1, 32), torch.randn(6, 1, 32)
    queries = torch.randn(5, 32)
    hs, memory = tr(src, torch.zeros(1, 6, dtype=torch.bool), queries, pos)
    assert hs.shape == (3, 1, 5, 32) and memory.shape == (6, 1, 32)
    # Extra padded tokens with garbage content must not change anything.
    src2 = torch.cat([src, 100 * torch.randn(4, 1, 32)])
    pos2 = torch.cat([pos, torch.randn(4, 1, 32)])
    mask2 = torch.tensor([[False] * 6 + [True] * 4])
    hs2, _ = tr(src2, mask2, queries, pos2)
    assert torch.allclose(hs, hs2, atol=1e-5)
    # Every intermediate output went through the final decoder norm (zero mean, unit variance per token).
    assert torch.allclose(hs.mean(-1), torch.zeros(3, 1, 5), atol=1e-5)


def test_backbone_stages_and_weights_from_an_export(tmp_path):
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(name="pvt_v2_b0", stages=[2, 4]))
    assert bb.num_channels == [64, 256] and bb.strides == [8, 32]
    x = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :, 64:] = True
    (f2, m2), (f4, m4) = bb(x, mask)
    assert f2.shape == (1, 64, 8, 12) and f4.shape == (1, 256, 2, 3)
    assert m4.tolist() == [[[False, False, True], [False, False, True]]]
    torch.save({"model": bb.body.state_dict()}, tmp_path / "export.pth")
    torch.manual_seed(1)
    loaded = Backbone(BackboneConfig(name="pvt_v2_b0", stages=[4], pretrained=str(tmp_path / "export.pth")))
    for k, v in loaded.body.state_dict().items():
        assert torch.equal(v, bb.body.state_dict()[k]), k
    with pytest.raises(ValueError, match="model.backbone.stages"):
        Backbone(BackboneConfig(name="pvt_v2_b0", stages=[5]))


def test_pvt_v1_backbone_from_authors_style_checkpoint(tmp_path):
    from pvt_dist.models import build_model

    torch.manual_seed(0)
    cls = build_model("pvt_tiny", num_classes=1000)  # the authors' layout: cls token, head, 224 pos embeds
    torch.save(cls.state_dict(), tmp_path / "pvt_tiny.pth")
    bb = Backbone(BackboneConfig(name="pvt_tiny", pretrained=str(tmp_path / "pvt_tiny.pth")))
    assert torch.equal(bb.body.block3[0].attn.q.weight, cls.block3[0].attn.q.weight)
    assert bb.load_report.missing == []
    feats = bb(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
    assert feats[0][0].shape == (1, 512, 3, 4)


def test_detr_outputs_follow_detr_conventions():
    torch.manual_seed(0)
    cfg = DETRConfig(
        backbone=BackboneConfig(name="pvt_v2_b0"), transformer=SMALL, num_classes=7, num_queries=9
    )
    model = build_detr(cfg)
    out = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    assert out["pred_logits"].shape == (2, 9, 8) and out["pred_boxes"].shape == (2, 9, 4)
    assert len(out["aux_outputs"]) == 2 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 9, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    groups = model.param_groups()
    assert groups["backbone"] and all(n.startswith("backbone.") for n, _ in groups["backbone"])
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups.values() for _, p in g) == n_params
    dets = PostProcess()(out, torch.tensor([[300, 400], [50, 80]]))
    assert dets[1]["boxes"].shape == (9, 4) and (dets[1]["boxes"][:, 2] <= 80 + 1e-4).all()
    assert (dets[0]["labels"] < 7).all()


def test_default_transformer_has_detrs_size():
    # DETR's 6+6 layers at d=256, 8 heads, FFN 2048: 7,890,432 encoder + 9,472,512 decoder + 512 final norm.
    tr = Transformer(TransformerConfig())
    assert sum(p.numel() for p in tr.encoder_layers.parameters()) == 7_890_432
    assert sum(p.numel() for p in tr.decoder_layers.parameters()) == 9_472_512
    assert sum(p.numel() for p in tr.parameters()) == 17_363_456
