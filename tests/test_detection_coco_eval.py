"""COCO evaluator: known mAP values, perfect predictions, gathering across ranks without double counting."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detection_helpers import labelme_example

from pvt_dist.detection.coco_eval import STAT_NAMES, CocoEvaluator, coco_from_dict
from pvt_dist.detection.targets import CocoAnnotations


def _one_box_gt():
    return coco_from_dict(
        {
            "images": [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"}],
            "annotations": [
                {
                    "id": 1,
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [214, 41, 348, 244],
                    "area": 348 * 244,
                    "iscrowd": 0,
                }
            ],
            "categories": [{"id": 1, "name": "thing"}],
        }
    )


def test_torchmetrics_docstring_example():
    ev = CocoEvaluator(_one_box_gt(), label_to_cat=[1])
    ev.update(
        [1],
        [
            {
                "boxes": torch.tensor([[258.0, 41.0, 606.0, 285.0]]),
                "scores": torch.tensor([0.536]),
                "labels": torch.tensor([0]),
            }
        ],
    )
    ev.synchronize()
    lines = []
    stats = ev.summarize(print_fn=lines.append)
    assert stats["AP"] == pytest.approx(0.6, abs=1e-6)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(1.0)
    assert list(stats) == STAT_NAMES
    assert len(lines[0].splitlines()) == 12 and lines[0].splitlines()[0].startswith(" Average Precision")


def _perfect(ann: CocoAnnotations, image_ids):
    dets = []
    for iid in image_ids:
        anns = [a for a in ann.dataset["annotations"] if a["image_id"] == iid]
        xyxy = torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ]
        ).reshape(-1, 4)
        dets.append(
            {
                "boxes": xyxy,
                "scores": torch.linspace(0.9, 0.5, len(anns)),
                "labels": torch.tensor([ann.cat_to_label[a["category_id"]] for a in anns]),
            }
        )
    return dets


def test_perfect_predictions_on_real_annotations():
    root = labelme_example()
    ann = CocoAnnotations(root / "annotations.json", root)
    ev = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    ev.update(ann.image_ids, _perfect(ann, ann.image_ids))
    ev.synchronize()
    stats = ev.summarize(print_fn=None)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    # Wrong class everywhere -> nothing matches.
    ev = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    dets = _perfect(ann, ann.image_ids)
    for d in dets:
        d["labels"] = (d["labels"] + 1) % ann.num_classes
    ev.update(ann.image_ids, dets)
    ev.synchronize()
    assert ev.summarize(print_fn=None)["AP"] == pytest.approx(0.0)


def test_missing_image_is_an_error_and_empty_results_score_zero():
    root = labelme_example()
    ann = CocoAnnotations(root / "annotations.json", root)
    ev = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    ev.update(ann.image_ids[:2], _perfect(ann, ann.image_ids[:2]))
    with pytest.raises(RuntimeError, match=r"missing ids \[3\]"):
        ev.synchronize()
    ev = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    ev.update(ann.image_ids, [empty] * 3)
    ev.synchronize()
    assert ev.summarize(print_fn=None)["AP"] <= 0.0


def test_labels_without_a_category_are_dropped():
    """A 91-class head (the COCO recipe) on a 20-category file: a box labelled 90 has no category, matches
    nothing and is dropped; the perfect boxes still score AP 1."""
    root = labelme_example()
    ann = CocoAnnotations(root / "annotations.json", root)
    ev = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    dets = _perfect(ann, ann.image_ids)
    for d in dets:
        d["boxes"] = torch.cat([d["boxes"], torch.tensor([[0.0, 0.0, 50.0, 50.0]])])
        d["scores"] = torch.cat([d["scores"], torch.tensor([0.95])])
        d["labels"] = torch.cat([d["labels"], torch.tensor([90])])
    ev.update(ann.image_ids, dets)
    ev.synchronize()
    assert all(len(r) == len(d["labels"]) - 1 for r, d in zip(ev.results.values(), dets))
    assert ev.summarize(print_fn=None)["AP"] == pytest.approx(1.0)


def _gather_worker(rank, port, ann_path, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ann = CocoAnnotations(ann_path)
    ids = [[1, 2, 2], [3, 3]][rank]  # rank 0 sees image 2 twice (a padded batch); each rank sees a share
    ev = CocoEvaluator(coco_from_dict(ann.dataset), ann.label_to_cat)
    ev.update(ids, _perfect(ann, ids))
    ev.synchronize()
    q.put((rank, sorted(ev.results), ev.summarize(print_fn=None)["AP"]))
    dist.destroy_process_group()


def test_gather_across_ranks_each_image_once():
    root = labelme_example()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_gather_worker, args=(r, port, str(root / "annotations.json"), q))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for _, ids, ap in results:
        assert ids == [1, 2, 3] and ap == pytest.approx(1.0)
