"""SetCriterion on cases whose loss values can be computed by hand, plus GIoU's degenerate-box error."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch_helpers import free_port

from pvt_dist.detection.box_ops import generalized_box_iou
from pvt_dist.detection.criterion import LossConfig, build_criterion, build_weight_dict


def _criterion(num_classes=2, layers=1, aux=False):
    return build_criterion(LossConfig(), num_classes, layers, aux)


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_hand_computed_single_box():
    # 2 classes + no-object; query 0 predicts the target's box shifted right by 0.1.
    logits = [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    outputs = {
        "pred_logits": torch.tensor([logits]),
        "pred_boxes": torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = _criterion()(outputs, targets)
    # CE weighted mean: query 0 -> class 0 (weight 1), query 1 -> no-object (weight 0.1).
    ce = (-math.log(_softmax(logits[0])[0]) + 0.1 * -math.log(_softmax(logits[1])[2])) / 1.1
    assert float(losses["loss_ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(losses["loss_bbox"]) == pytest.approx(0.1, rel=1e-5)
    # xyxy [0.5,.4,.7,.6] vs [.4,.4,.6,.6]: inter .02, union .06, hull .06 -> GIoU 1/3.
    assert float(losses["loss_giou"]) == pytest.approx(2 / 3, rel=1e-5)


def test_box_losses_divide_by_box_count_and_perfect_boxes_cost_nothing():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    outputs = {
        "pred_logits": torch.zeros(1, 3, 3),
        "pred_boxes": torch.cat([boxes + torch.tensor([0.0, 0.0, 0.0, 0.1]), torch.rand(1, 4) * 0.1 + 0.45])[
            None
        ],
    }
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes}]
    losses = _criterion()(outputs, targets)
    assert float(losses["loss_bbox"]) == pytest.approx(0.2 / 2, rel=1e-5)  # two boxes, each off by 0.1 in h
    outputs["pred_boxes"][0, :2] = boxes
    losses = _criterion()(outputs, targets)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.0, abs=1e-6)
    # Uniform logits: each matched query pays log 3 at weight 1, the unmatched one at weight 0.1.
    assert float(losses["loss_ce"]) == pytest.approx(math.log(3), rel=1e-5)


def test_empty_targets_only_classification():
    outputs = {
        "pred_logits": torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]], requires_grad=True),
        "pred_boxes": torch.rand(1, 2, 4, requires_grad=True),
    }
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    crit = _criterion()
    losses = crit(outputs, targets)
    expected = (-math.log(_softmax([0, 0, 1])[2]) - math.log(_softmax([1, 0, 0])[2])) / 2
    assert float(losses["loss_ce"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(losses["loss_bbox"].detach()) == 0.0 and float(losses["loss_giou"].detach()) == 0.0
    crit.total(losses).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_aux_terms_and_weights():
    gen = torch.Generator().manual_seed(0)
    layer = lambda: {
        "pred_logits": torch.randn(2, 4, 4, generator=gen),
        "pred_boxes": torch.rand(2, 4, 4, generator=gen) * 0.3 + 0.3,
    }  # noqa: E501
    outputs = {**layer(), "aux_outputs": [layer() for _ in range(5)]}
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]])},
    ]
    crit = _criterion(num_classes=3, layers=6, aux=True)
    losses = crit(outputs, targets)
    names = {f"loss_{t}{s}" for t in ("ce", "bbox", "giou") for s in ["", "_0", "_1", "_2", "_3", "_4"]}
    assert set(losses) == names == set(crit.weight_dict)
    assert crit.weight_dict["loss_bbox_3"] == 5 and crit.weight_dict["loss_giou_0"] == 2
    # Each aux layer is matched on its own: its terms equal the criterion run on that layer alone.
    alone = crit(outputs["aux_outputs"][2], targets)
    for t in ("ce", "bbox", "giou"):
        assert float(losses[f"loss_{t}_2"]) == pytest.approx(float(alone[f"loss_{t}"]), rel=1e-6)
    total = sum(float(losses[k]) * w for k, w in crit.weight_dict.items())
    assert float(crit.total(losses)) == pytest.approx(total, rel=1e-6)
    assert build_weight_dict(LossConfig(), 6, aux_loss=False) == {
        "loss_ce": 1,
        "loss_bbox": 5,
        "loss_giou": 2,
    }


def test_bad_targets_are_clear_errors():
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\].*0\.\.1"):
        _criterion()(outputs, [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}])
    with pytest.raises(ValueError, match="degenerate box at row 1"):
        generalized_box_iou(
            torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.2, 0.9]]), torch.tensor([[0.0, 0, 1, 1]])
        )
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), torch.tensor([[0.0, 0, 1, 1]]))


def _num_boxes_worker(rank, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = [1, 3][rank]  # 4 boxes over 2 ranks -> every rank divides by 2
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(n, 1)
    outputs = {
        "pred_logits": torch.zeros(1, 4, 3),
        "pred_boxes": (boxes + torch.tensor([0.1, 0, 0, 0]))[None],
    }
    outputs["pred_boxes"] = torch.cat([outputs["pred_boxes"], torch.full((1, 4 - n, 4), 0.5)], 1)
    losses = _criterion()(outputs, [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": boxes}])
    q.put((rank, float(losses["loss_bbox"])))
    dist.destroy_process_group()


def test_num_boxes_all_reduced_across_ranks():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_num_boxes_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    # L1 sums 0.1 per box; rank 0 has 1 box, rank 1 has 3; the divisor is the mean count 2 on both.
    assert results[0] == pytest.approx(0.1 / 2, rel=1e-5)
    assert results[1] == pytest.approx(0.3 / 2, rel=1e-5)
