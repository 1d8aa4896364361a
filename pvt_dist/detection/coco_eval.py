"""COCO box mAP over a whole (sharded) validation set with pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO index built from an in-memory annotation dict (without its stdout chatter)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoEvaluator:
    """Collects detections per image id, gathers them from every rank, and runs COCOeval (bbox).

    ``label_to_cat`` maps the model's contiguous labels back to the annotation file's category ids.
    Every ground-truth image must be seen exactly once across ranks after removing the duplicates that
    padded last batches produce; a missing image is an error, since it would silently inflate or deflate AP.
    """

    def __init__(self, coco_gt: COCO, label_to_cat: list[int]):
        self.coco_gt = coco_gt
        self.label_to_cat = list(label_to_cat)
        self.results: dict[int, list[dict]] = {}

    def update(self, image_ids: list[int], detections: list[dict]) -> None:
        """detections: per image ``scores`` [Q], ``labels`` [Q] contiguous, ``boxes`` [Q, 4] absolute xyxy."""
        if len(image_ids) != len(detections):
            raise ValueError(f"coco_eval: {len(image_ids)} image ids for {len(detections)} detection sets")
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            if image_id in self.results:  # a padded batch repeated this image; keep the first copy
                continue
            boxes = det["boxes"].detach().float().cpu().numpy()
            scores = det["scores"].detach().float().cpu().numpy()
            labels = det["labels"].detach().cpu().numpy()
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            # A head with more classes than the annotation file has categories (the COCO recipe's 91 on
            # another data set) can predict a label with no category: it matches no ground truth, drop it.
            self.results[image_id] = [
                {
                    "image_id": image_id,
                    "category_id": self.label_to_cat[int(lab)],
                    "bbox": [float(v) for v in b],
                    "score": float(s),
                }
                for b, s, lab in zip(xywh, scores, labels)
                if int(lab) < len(self.label_to_cat)
            ]

    def synchronize(self) -> None:
        """Merge every rank's results (keeping one copy per image) and check that no image is missing."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.results)
            merged: dict[int, list[dict]] = {}
            for part in gathered:
                for image_id, dets in part.items():
                    merged.setdefault(image_id, dets)
            self.results = merged
        expected = set(self.coco_gt.getImgIds())
        missing = sorted(expected - set(self.results))
        extra = sorted(set(self.results) - expected)
        if missing or extra:
            raise RuntimeError(
                f"coco_eval: predictions cover {len(self.results)} images but the ground truth has "
                f"{len(expected)}; missing ids {missing[:10]}, unknown ids {extra[:10]}"
            )

    def summarize(self, print_fn=print) -> dict[str, float]:
        """Run COCOeval on all gathered results; print the standard 12-line summary; return the 12 stats."""
        dets = [d for image_id in sorted(self.results) for d in self.results[image_id]]
        if dets:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = self.coco_gt.loadRes(dets)
        else:  # loadRes refuses an empty list; an empty result set must still score 0
            coco_dt = coco_from_dict({**self.coco_gt.dataset, "annotations": []})
        ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(self.results)
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.summary_text = "\n".join(
            line for line in text.getvalue().splitlines() if line.startswith(" Average")
        )
        if print_fn is not None:
            print_fn(self.summary_text)
        return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
