"""DETR run configuration: YAML + overrides, and errors that name the key before any work starts."""

import copy
import json
from pathlib import Path

import pytest
from detection_helpers import labelme_example

from pvt_dist.config import ConfigError
from pvt_dist.detection.config import load_detr_config, resolve_detr_config


def test_configs_load_and_resolve():
    for name in ("pvt_small_coco", "labelme_overfit", "labelme_demo"):
        cfg = load_detr_config(f"configs/detr/{name}.yaml")
        assert cfg.model.backbone.stages == [4]
    cfg = load_detr_config("configs/detr/pvt_small_coco.yaml")
    assert (cfg.optim.lr, cfg.optim.backbone_lr, cfg.optim.weight_decay, cfg.deepspeed.grad_clip) == (
        1e-4,
        1e-5,
        1e-4,
        0.1,
    )
    assert cfg.schedule.lr_drop_epoch == 33 and cfg.model.num_queries == 100


def test_overrides_and_derived_values():
    root = labelme_example()
    ann = root / "annotations.json"
    data = [
        f"data.train_ann={ann}",
        f"data.val_ann={ann}",
        f"data.train_images={root}",
        f"data.val_images={root}",
    ]
    extra = [
        "model.backbone.stages=[3,4]",
        "optim.lr=2e-4",
        "deepspeed.global_batch=12",
        "deepspeed.micro_batch=3",
    ]
    cfg = load_detr_config("configs/detr/labelme_overfit.yaml", data + extra)
    assert cfg.model.backbone.stages == [3, 4] and cfg.optim.lr == 2e-4
    resolved = resolve_detr_config(cfg, world_size=2)
    assert resolved.model.num_classes == 20 and resolved.deepspeed.grad_accum == 2
    with pytest.raises(ConfigError, match=r"model\.transformer\.d_modle: unknown key"):
        load_detr_config(None, ["model.transformer.d_modle=64"])
    with pytest.raises(ConfigError, match=r"model\.backbone\.stages\[0\]: expected an integer"):
        load_detr_config(None, ["model.backbone.stages=[four]"])
    bad = copy.deepcopy(cfg)
    bad.model.backbone.stages = [0]
    with pytest.raises(ConfigError, match=r"model\.backbone\.stages"):
        resolve_detr_config(bad, 1)
    bad = copy.deepcopy(cfg)
    bad.data.crop_size = [600, 384]
    with pytest.raises(ConfigError, match=r"data\.crop_size"):
        resolve_detr_config(bad, 1)


def test_bad_ground_truth_is_a_config_error(tmp_path):
    root = labelme_example()
    d = json.loads((root / "annotations.json").read_text())
    d["annotations"][7]["category_id"] = 77
    (tmp_path / "bad.json").write_text(json.dumps(d))
    cfg = load_detr_config(
        "configs/detr/labelme_overfit.yaml",
        [f"data.train_ann={tmp_path / 'bad.json'}", f"data.train_images={root}"],
    )
    with pytest.raises(ConfigError, match=r"bad.json: image id 3, annotation id 8: unknown category id 77"):
        resolve_detr_config(cfg, 1)


def _labelme_data():
    root = labelme_example()
    ann = root / "annotations.json"
    return [
        f"data.train_ann={ann}",
        f"data.val_ann={ann}",
        f"data.train_images={root}",
        f"data.val_images={root}",
    ]


def test_deformable_coco_config_has_the_reference_recipe():
    cfg = load_detr_config("configs/detr/pvt_v2_b2_deformable_coco.yaml", _labelme_data())
    o, s, ds = cfg.optim, cfg.schedule, cfg.deepspeed
    assert (o.lr, o.backbone_lr, o.linear_proj_lr_mult, o.weight_decay) == (2e-4, 2e-5, 0.1, 1e-4)
    assert (s.epochs, s.lr_drop_epoch, ds.grad_clip, ds.global_batch) == (50, 40, 0.1, 32)
    resolved = resolve_detr_config(cfg, world_size=16)
    assert resolved.deepspeed.grad_accum == 1 and resolved.model.num_queries == 300
    assert resolved.model.deformable.dim_feedforward == 1024 and resolved.model.backbone.stages == [2, 3, 4]
    assert (resolved.loss.cost_class, resolved.loss.ce_weight, resolved.loss.focal_alpha) == (2.0, 2.0, 0.25)


def test_head_defaults_follow_the_head():
    detr = resolve_detr_config(load_detr_config(None, _labelme_data()), 1)
    assert (detr.model.head, detr.model.backbone.stages, detr.model.num_queries) == ("detr", [4], 100)
    assert (detr.loss.cost_class, detr.loss.ce_weight) == (1.0, 1.0)
    deform = resolve_detr_config(load_detr_config(None, [*_labelme_data(), "model.head=deformable"]), 1)
    assert (deform.model.backbone.stages, deform.model.num_queries) == ([2, 3, 4], 300)
    assert (deform.loss.cost_class, deform.loss.ce_weight) == (2.0, 2.0)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.head=deformabel"], r"model\.head: must be 'detr' or 'deformable'"),
        (
            ["model.head=deformable", "model.deformable.num_feature_levels=2"],
            r"model\.deformable\.num_feature_levels",
        ),
        (
            ["model.head=deformable", "model.backbone.stages=[2,4]"],
            r"model\.backbone\.stages: the deformable head",
        ),
        (["model.head=deformable", "model.deformable.d_model=72"], r"model\.deformable\.d_model"),
        (["model.head=deformable", "model.deformable.enc_n_points=0"], r"model\.deformable\.enc_n_points"),
        (["optim.linear_proj_lr_mult=-1"], r"optim\.linear_proj_lr_mult"),
    ],
)
def test_deformable_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        resolve_detr_config(load_detr_config(None, [*_labelme_data(), *overrides]), 1)


def test_demo_stage2_config_is_the_two_stage_deformable_head_on_tree_crowns():
    """`make demo`'s stage 2 (scripts/demo.sh): the deformable head with both variants on stages 2-4 of the
    stage-1 model (pvt_tiny), scored on the held-out tree-crown split, not the training tiles."""
    cfg = resolve_detr_config(load_detr_config("configs/detr/demo_tree_crowns.yaml"), 1, check_files=False)
    m = cfg.model
    assert (m.head, m.backbone.name, m.backbone.stages) == ("deformable", "pvt_tiny", [2, 3, 4])
    assert m.deformable.two_stage and m.deformable.with_box_refine and m.num_classes == 1
    assert cfg.data.train_ann == "data/tree_crowns/train/annotations.json"
    assert cfg.data.val_ann == "data/tree_crowns/val/annotations.json"
    assert (cfg.schedule.total_steps, cfg.deepspeed.global_batch) == (700, 4)
    assert "demo_tree_crowns.yaml" in Path("scripts/demo.sh").read_text()
