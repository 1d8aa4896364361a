"""COCO evaluation of a detector over a (sharded) validation loader."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .coco_eval import CocoEvaluator, coco_from_dict
from .postprocess import PostProcess


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def evaluate_coco(
    model,
    loader,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    print_fn=print,
    input_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, float], tuple]:
    """Run ``model`` over every batch of ``loader`` (a ``DetectionLoader``) on this rank, gather all ranks'
    detections and score them with pycocotools. Every rank must call it (it ends in a collective).

    ``input_dtype``: the dtype of the model's weights (bf16/fp16 under DeepSpeed) the images are cast to.
    Returns (the 12 COCO stats by name, this rank's first batch as (images, targets, infos, detections)).
    The 12-line summary is printed on rank 0 only.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    ann = loader.annotations
    evaluator = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    post = PostProcess.for_model(model)
    first = None
    loader.set_epoch(0)
    for images, mask, targets, infos in loader:
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            outputs = model(images.to(device=device, dtype=input_dtype), mask.to(device))
        dets = post(outputs, torch.tensor([i["orig_size"] for i in infos]))
        evaluator.update([i["image_id"] for i in infos], dets)
        if first is None:
            first = (
                images.cpu(),
                [{k: v.cpu() for k, v in t.items()} for t in targets],
                infos,
                [{k: v.cpu() for k, v in d.items()} for d in dets],
            )
    evaluator.synchronize()
    stats = evaluator.summarize(print_fn=print_fn if _is_main() else None)
    model.train(was_training)
    return stats, first
