"""A self-contained detector file: weights plus what is needed to rebuild and label it.

``{'model': state_dict, 'detr': DETRConfig as dict, 'data': preprocessing fields, 'class_names': [...],
'label_to_cat': [...]}`` -- read by ``launch/detect.py`` and ``launch/evaluate_detr.py``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .backbone import BackboneConfig
from .deformable_transformer import DeformableTransformerConfig
from .detector import build_detector
from .detr import DETRConfig
from .transformer import TransformerConfig

PREPROCESS_KEYS = ("scale_factor", "val_size", "max_size", "mean", "std")


def save_detector(
    path: str | os.PathLike,
    model: nn.Module,
    cfg: DETRConfig,
    data_cfg,
    class_names: list[str],
    label_to_cat: list[int],
) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a truncated export."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": {
            k: v.detach().cpu().float() if v.is_floating_point() else v.cpu()
            for k, v in model.state_dict().items()
        },
        "detr": dataclasses.asdict(cfg),
        "data": {k: getattr(data_cfg, k) for k in PREPROCESS_KEYS},
        "class_names": list(class_names),
        "label_to_cat": list(label_to_cat),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def detr_config_from_dict(d: dict) -> DETRConfig:
    d = dict(d)
    backbone = BackboneConfig(**{**d.pop("backbone"), "pretrained": None})  # weights come from the export
    transformer = TransformerConfig(**d.pop("transformer"))
    deformable = DeformableTransformerConfig(**d.pop("deformable", {}))  # exports before the deformable head
    return DETRConfig(backbone=backbone, transformer=transformer, deformable=deformable, **d)


def load_detector(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model from an export; returns (model in eval mode, the export's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector weights not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "detr", "data", "class_names", "label_to_cat") if k not in blob]
    if missing:
        raise ValueError(
            f"{path}: not a detector export (missing {missing}); export one with finetune_detr.py"
        )
    model = build_detector(detr_config_from_dict(blob["detr"]))
    model.load_state_dict(blob["model"])
    model.eval()
    return model, {k: v for k, v in blob.items() if k != "model"}


def load_image(path: str):
    """An RGB PIL image the way the detector saw its data: EXIF orientation applied, like DALI's
    ``decoders.image`` (``adjust_orientation``, on by default) in training and evaluation."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")
