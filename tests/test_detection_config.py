"""DETR run configuration: YAML + overrides, and errors that name the key before any work starts."""

import copy
import json

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
