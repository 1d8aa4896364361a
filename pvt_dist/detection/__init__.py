"""Stage 2: DETR-style detection on a PVT backbone (model, matcher, losses, COCO data and evaluation).

    from pvt_dist.detection import build_detr, DETRConfig, build_criterion, LossConfig, PostProcess
    model = build_detr(DETRConfig(num_classes=20))
    outputs = model(images, mask)   # {'pred_logits': [B,Q,K+1], 'pred_boxes': [B,Q,4], 'aux_outputs': [...]}
    losses = criterion(outputs, targets); loss = criterion.total(losses)

``DETRConfig(head='deformable')`` with ``build_detector`` gives Deformable-DETR (multi-scale deformable
attention on stages 2-4 plus a stride-64 level, sigmoid focal-loss heads, 300 queries).

Training goes through the stage-1 DeepSpeed engine (``trainer.DetrTrainer``, ``launch/finetune_detr.py``).
"""

from .backbone import Backbone, BackboneConfig, build_backbone
from .coco_eval import CocoEvaluator, coco_from_dict
from .criterion import LossConfig, SetCriterion, build_criterion, build_weight_dict
from .deformable_detr import DeformableDETR, load_deformable_detr_weights
from .deformable_transformer import DeformableTransformer, DeformableTransformerConfig
from .detector import build_detector
from .detr import DETR, DETRConfig, build_detr
from .matcher import HungarianMatcher, build_matcher
from .ms_deform_attn import MSDeformAttn
from .postprocess import PostProcess
from .targets import CocoAnnotations, validate_coco_dataset
from .transformer import Transformer, TransformerConfig, build_transformer

__all__ = [
    "DETR",
    "Backbone",
    "BackboneConfig",
    "CocoAnnotations",
    "CocoEvaluator",
    "DETRConfig",
    "DeformableDETR",
    "DeformableTransformer",
    "DeformableTransformerConfig",
    "MSDeformAttn",
    "HungarianMatcher",
    "LossConfig",
    "PostProcess",
    "SetCriterion",
    "Transformer",
    "TransformerConfig",
    "build_backbone",
    "build_criterion",
    "build_detector",
    "build_detr",
    "load_deformable_detr_weights",
    "build_matcher",
    "build_transformer",
    "build_weight_dict",
    "coco_from_dict",
    "validate_coco_dataset",
]
