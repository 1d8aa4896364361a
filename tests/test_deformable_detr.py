"""Deformable-DETR head: output layouts, variants, Deformable-DETR's state_dict keys, loading, focal loss."""

import math
import re

import pytest
import torch

from pvt_dist.detection import (
    BackboneConfig,
    DETRConfig,
    LossConfig,
    PostProcess,
    build_criterion,
    build_detector,
)
from pvt_dist.detection.deformable_detr import load_deformable_detr_weights
from pvt_dist.detection.deformable_transformer import DeformableTransformerConfig
from pvt_dist.detection.matcher import HungarianMatcher

SMALL = dict(
    d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=128, dropout=0.0
)


def _model(**kw):
    torch.manual_seed(0)
    cfg = DETRConfig(
        head="deformable",
        backbone=BackboneConfig(name="pvt_v2_b0", drop_path_rate=0.0),
        deformable=DeformableTransformerConfig(**{**SMALL, **kw}),
        num_classes=3,
        num_queries=20,
    )
    return build_detector(cfg)


def _batch():
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 80:] = True  # image 1 is 96x80, padded
    return images, mask


TARGETS = [
    {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
]


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_forward_backward_shapes_and_every_parameter_learns(variant):
    kw = {"box_refine": {"with_box_refine": True}, "two_stage": {"with_box_refine": True, "two_stage": True}}
    model = _model(**kw.get(variant, {}))
    cfg_two = variant == "two_stage"
    images, mask = _batch()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 20, 3) and out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == 2 and ("enc_outputs" in out) == cfg_two
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    # The 3 backbone stages (strides 8/16/32) plus the stride-64 conv level.
    srcs, masks, _ = model.levels(images, mask)
    assert [tuple(s.shape[-2:]) for s in srcs] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    assert masks[0][1, 0].tolist() == [False] * 10 + [True] * 6
    crit = build_criterion(LossConfig(), 3, 3, True, "deformable", cfg_two)
    losses = crit(out, TARGETS)
    assert {"loss_ce", "loss_bbox_1", "loss_giou_0"} <= set(losses) and ("loss_ce_enc" in losses) == cfg_two
    crit.total(losses).backward()
    # At init the box MLP's last layer and the offset / attention-weight projections are zero (as in the
    # reference), which blocks the gradient to what lies behind them; nothing else may be disconnected.
    silent = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    blocked = re.compile(r"transformer\.level_embed|(.*\.)?bbox_embed\.\d+\.layers\.[01]\.(weight|bias)")
    assert all(blocked.fullmatch(n) for n in silent), silent
    with torch.no_grad():  # as after a first step: the zero-initialized weights move off zero
        for name, p in model.named_parameters():
            if name.endswith(("layers.2.weight", "sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(0, 1e-2)
    model.zero_grad()
    crit.total(crit(model(images, mask), TARGETS)).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_param_groups_split_linear_projections():
    model = _model()
    groups = model.param_groups()
    proj = [n for n, _ in groups["linear_proj"]]
    assert "transformer.reference_points.weight" in proj
    assert "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in proj
    assert "transformer.decoder.layers.2.cross_attn.sampling_offsets.bias" in proj
    assert not any("attention_weights" in n or "value_proj" in n for n in proj)
    assert all(n.startswith("backbone.") for n, _ in groups["backbone"])
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


def test_postprocess_keeps_top_k_query_class_pairs():
    logits = torch.tensor([[[0.0, 3.0], [2.0, 1.0], [-1.0, -2.0]]])  # [B=1, Q=3, K=2]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    det = PostProcess("sigmoid", top_k=3)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )[0]
    # Best pairs: (q0, class 1) 3.0, (q1, class 0) 2.0, (q1, class 1) 1.0.
    assert det["labels"].tolist() == [1, 0, 1]
    torch.testing.assert_close(det["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(det["boxes"][0], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    torch.testing.assert_close(det["boxes"][2], torch.tensor([0.0, 0.0, 100.0, 50.0]))
    assert PostProcess.for_model(_model()).score_activation == "sigmoid"


def _focal_terms(p, alpha=0.25, gamma=2.0):
    """Per-element focal loss of a positive and of a negative with probability p (by hand)."""
    pos = alpha * (1 - p) ** gamma * -math.log(p)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p)
    return pos, neg


def test_focal_matcher_cost_and_loss_by_hand():
    # One class, two queries with p = 0.5 and p = sigmoid(2); one target box equal to query 1's.
    logits = torch.tensor([[[0.0], [2.0]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.6, 0.6, 0.2, 0.2]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.6, 0.2, 0.2]])}]
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=0.25)
    cost = matcher.cost_matrices(outputs, targets)[0][:, 0]
    p1 = 1 / (1 + math.exp(-2.0))
    # query 0: class (pos - neg at 0.5), L1 = 4 * 0.4... cx, cy off by 0.4, w, h by 0.1 -> 1.0; GIoU of
    # disjoint [.15,.15,.25,.25] vs [.5,.5,.7,.7]: 0 - (0.3025 - 0.05) / 0.3025.
    giou0 = -(0.55**2 - 0.05) / 0.55**2
    pos0, neg0 = _focal_terms(0.5)
    pos1, neg1 = _focal_terms(p1)
    assert float(cost[0]) == pytest.approx(2 * (pos0 - neg0) + 5 * 1.0 - 2 * giou0, rel=1e-5)
    assert float(cost[1]) == pytest.approx(2 * (pos1 - neg1) - 2 * 1.0, rel=1e-5)
    assert [j.tolist() for j in matcher(outputs, targets)[0]] == [[1], [0]]

    losses = build_criterion(LossConfig(), 1, 1, False, "deformable")(outputs, targets)
    # Sum over every (query, class) element, divided by num_boxes = 1: query 0 negative, query 1 positive.
    assert float(losses["loss_ce"]) == pytest.approx(neg0 + pos1, rel=1e-5)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    crit = build_criterion(LossConfig(), 1, 6, True, "deformable")
    assert crit.weight_dict["loss_ce"] == 2.0 and crit.weight_dict["loss_ce_4"] == 2.0
    assert crit.weight_dict["loss_bbox"] == 5.0 and crit.weight_dict["loss_giou_0"] == 2.0


def deformable_detr_reference_keys() -> dict[str, tuple[int, ...]]:
    """State dict of Deformable-DETR's R50 COCO model (``--num_feature_levels 4``, no box refine, no
    two-stage, 91 classes, 300 queries), written out from the reference's module definitions; the ResNet is
    represented by a few of its keys."""
    keys: dict[str, tuple[int, ...]] = {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.bn1.weight": (64,),
        "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "transformer.level_embed": (4, 256),
        "transformer.reference_points.weight": (2, 256),
        "transformer.reference_points.bias": (2,),
        "query_embed.weight": (300, 512),
    }
    deform = {
        "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256), "value_proj.bias": (256,),
        "output_proj.weight": (256, 256), "output_proj.bias": (256,),
    }  # fmt: skip
    ffn = {
        "linear1.weight": (1024, 256),
        "linear1.bias": (1024,),
        "linear2.weight": (256, 1024),
        "linear2.bias": (256,),
    }
    norm = {"weight": (256,), "bias": (256,)}
    for i in range(6):
        enc = f"transformer.encoder.layers.{i}."
        keys.update({enc + "self_attn." + k: v for k, v in deform.items()})
        keys.update({enc + k: v for k, v in ffn.items()})
        keys.update({f"{enc}{n}.{k}": v for n in ("norm1", "norm2") for k, v in norm.items()})
        dec = f"transformer.decoder.layers.{i}."
        keys.update({dec + "cross_attn." + k: v for k, v in deform.items()})
        keys.update({
            dec + "self_attn.in_proj_weight": (768, 256), dec + "self_attn.in_proj_bias": (768,),
            dec + "self_attn.out_proj.weight": (256, 256), dec + "self_attn.out_proj.bias": (256,),
        })  # fmt: skip
        keys.update({dec + k: v for k, v in ffn.items()})
        keys.update({f"{dec}{n}.{k}": v for n in ("norm1", "norm2", "norm3") for k, v in norm.items()})
        keys.update({f"class_embed.{i}.weight": (91, 256), f"class_embed.{i}.bias": (91,)})
        for j, shape in enumerate([(256, 256), (256, 256), (4, 256)]):
            keys.update(
                {f"bbox_embed.{i}.layers.{j}.weight": shape, f"bbox_embed.{i}.layers.{j}.bias": shape[:1]}
            )
    for lvl, c in enumerate((512, 1024, 2048)):
        keys.update({f"input_proj.{lvl}.0.weight": (256, c, 1, 1), f"input_proj.{lvl}.0.bias": (256,)})
        keys.update({f"input_proj.{lvl}.1.{k}": v for k, v in norm.items()})
    keys.update({"input_proj.3.0.weight": (256, 2048, 3, 3), "input_proj.3.0.bias": (256,)})
    keys.update({f"input_proj.3.1.{k}": v for k, v in norm.items()})
    return keys


def test_deformable_detr_checkpoint_loads_except_backbone_and_projections():
    cfg = DETRConfig(head="deformable", backbone=BackboneConfig(name="pvt_v2_b0"), num_classes=91)
    model = build_detector(cfg)  # the reference's sizes are the defaults: 256, 6+6, FFN 1024, 300 queries
    ref = deformable_detr_reference_keys()
    own = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith(("backbone.", "input_proj."))
    }
    ref_head = {k: v for k, v in ref.items() if not k.startswith(("backbone.", "input_proj."))}
    assert own == ref_head  # same keys, same shapes

    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v, generator=g) for k, v in ref.items()}
    report = load_deformable_detr_weights(model, sd)
    assert sorted(report.loaded) == sorted(ref_head)
    assert set(report.skipped) == {k for k in ref if k.startswith(("backbone.", "input_proj."))}
    assert all(k.startswith(("backbone.", "input_proj.")) for k in report.missing)
    state = model.state_dict()
    for key in ("transformer.encoder.layers.3.self_attn.sampling_offsets.weight", "query_embed.weight"):
        torch.testing.assert_close(state[key], sd[key])

    # Other class counts keep a fresh class head; anything else that does not fit is an error naming it.
    small = build_detector(
        DETRConfig(head="deformable", backbone=BackboneConfig(name="pvt_v2_b0"), num_classes=5)
    )
    report = load_deformable_detr_weights(small, sd)
    assert "class_embed.0.weight" in report.skipped and "bbox_embed.0.layers.2.weight" in report.loaded
    with pytest.raises(ValueError, match="unexpected transformer.extra"):
        load_deformable_detr_weights(model, {**sd, "transformer.extra": torch.zeros(1)})
    bad = {**sd, "transformer.level_embed": torch.zeros(3, 256)}
    with pytest.raises(ValueError, match=r"transformer.level_embed: checkpoint \(3, 256\)"):
        load_deformable_detr_weights(model, bad)
    with pytest.raises(ValueError, match="missing query_embed.weight"):
        load_deformable_detr_weights(model, {k: v for k, v in sd.items() if k != "query_embed.weight"})


def test_bf16_forward_under_cpu_gemm_mode():
    from pvt_dist.engine.cpu_bf16 import fp32_gemm

    model = _model().to(torch.bfloat16)
    images, mask = _batch()
    with fp32_gemm():
        out = model(images.bfloat16(), mask)
    assert out["pred_logits"].dtype == torch.bfloat16 and torch.isfinite(out["pred_boxes"]).all()


def test_optimizer_groups_get_the_recipes_learning_rates():
    from pvt_dist.detection.config import DetrOptimConfig
    from pvt_dist.detection.trainer import build_detection_optimizer

    opt = build_detection_optimizer(
        _model(), DetrOptimConfig(lr=2e-4, backbone_lr=2e-5, linear_proj_lr_mult=0.1), torch.device("cpu")
    )
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"rest": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5})
    assert opt.param_groups[0]["name"] == "rest"  # the engine logs group 0's lr
