"""Hungarian matcher: optimal assignments (vs brute force), empty targets, batched == per-image."""

import itertools

import pytest
import torch

from pvt_dist.detection.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from pvt_dist.detection.matcher import HungarianMatcher


def _random_case(gen, bs, nq, sizes, k=4):
    outputs = {
        "pred_logits": torch.randn(bs, nq, k + 1, generator=gen),
        "pred_boxes": torch.rand(bs, nq, 4, generator=gen) * 0.5 + 0.1,
    }
    targets = [
        {
            "labels": torch.randint(0, k, (n,), generator=gen),
            "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.1,
        }
        for n in sizes
    ]
    return outputs, targets


def _brute_force(cost):
    """Minimum total cost of a one-to-one assignment of every target column to a distinct query row."""
    nq, nt = cost.shape
    return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(nq), nt))


@pytest.mark.parametrize("seed", range(6))
def test_optimal_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    outputs, targets = _random_case(gen, 2, 5, [3, 5])
    matcher = HungarianMatcher(1.0, 5.0, 2.0)
    costs = matcher.cost_matrices(outputs, targets)
    for (rows, cols), cost, t in zip(matcher(outputs, targets), costs, targets):
        assert len(rows) == len(cols) == len(t["labels"])
        assert sorted(cols.tolist()) == list(range(len(t["labels"])))
        assert len(set(rows.tolist())) == len(rows)
        total = float(cost[rows, cols].sum())
        assert total == pytest.approx(float(_brute_force(cost.double())), abs=1e-5)


def test_cost_matrix_is_the_documented_formula():
    gen = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(gen, 1, 3, [2])
    cost = HungarianMatcher(1.0, 5.0, 2.0).cost_matrices(outputs, targets)[0]
    prob = outputs["pred_logits"][0].softmax(-1)
    pb, tb = outputs["pred_boxes"][0], targets[0]["boxes"]
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))
    for q in range(3):
        for j in range(2):
            expected = -prob[q, targets[0]["labels"][j]] + 5 * (pb[q] - tb[j]).abs().sum() - 2 * giou[q, j]
            assert float(cost[q, j]) == pytest.approx(float(expected), abs=1e-5)


def test_empty_targets():
    gen = torch.Generator().manual_seed(1)
    outputs, targets = _random_case(gen, 3, 4, [0, 2, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert [len(i) for i, _ in indices] == [0, 2, 0]
    assert all(i.dtype == torch.int64 and j.dtype == torch.int64 for i, j in indices)
    # A batch without any box at all.
    outputs, targets = _random_case(gen, 2, 4, [0, 0])
    assert [len(i) for i, _ in HungarianMatcher()(outputs, targets)] == [0, 0]


def test_batched_equals_per_image():
    gen = torch.Generator().manual_seed(2)
    outputs, targets = _random_case(gen, 4, 6, [1, 4, 0, 6])
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b, t in enumerate(targets):
        single = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [t])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_more_targets_than_queries_matches_every_query():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(gen, 1, 2, [4])
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert sorted(rows.tolist()) == [0, 1] and len(set(cols.tolist())) == 2


def test_match_detections_counts_found_duplicates_and_false_positives():
    """Two objects; detections by score: a hit on A, a second box on A, a hit on B, a box on nothing, and a
    low-IoU box inside B (IoU 0.25, below 0.5). Expected by hand: found 2, duplicates 1, false positives 2."""
    from pvt_dist.detection.box_ops import match_detections

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 0.0, 10.0, 10.0],
            [20.0, 20.0, 30.0, 31.0],
            [50.0, 50.0, 60.0, 60.0],
            [20.0, 20.0, 25.0, 25.0],
        ]  # fmt: skip
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert match_detections(boxes, scores, gt) == {
        "ground_truth": 2, "found": 2, "duplicates": 1, "false_positives": 2,
    }  # fmt: skip
    # The score order decides who is the duplicate: the same boxes with the near-copy ranked first.
    assert match_detections(boxes, torch.tensor([0.8, 0.9, 0.7, 0.6, 0.5]), gt)["duplicates"] == 1
    assert match_detections(boxes[:0], scores[:0], gt)["found"] == 0
    assert match_detections(boxes, scores, gt[:0])["false_positives"] == 5
