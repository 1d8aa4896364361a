"""Annotation validation and the DALI detection pipeline on the real labelme COCO example."""

import copy
import json
import shutil

import pytest
import torch
from detection_helpers import labelme_example

from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader
from pvt_dist.detection.targets import validate_coco_dataset


@pytest.fixture(scope="module")
def example():
    root = labelme_example()
    return root, json.loads((root / "annotations.json").read_text())


def _cfg(ann, images, **kw):
    return DetectionDataConfig(
        train_ann=str(ann),
        train_images=str(images),
        val_ann=str(ann),
        val_images=str(images),
        scale_factor=0.25,
        device="cpu",
        num_threads=1,
        **kw,
    )


def test_example_is_renumbered_from_one(example):
    _, d = example
    assert sorted(i["id"] for i in d["images"]) == [1, 2, 3]
    assert sorted(a["id"] for a in d["annotations"]) == list(range(1, 13))
    assert all(c["id"] >= 1 for c in d["categories"]) and len(d["categories"]) == 20


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bbox", [10.0, 10.0, -5.0, 20.0], r"image id 2, annotation id 5: negative width"),
        (
            "bbox",
            [400.0, 10.0, 150.0, 20.0],
            r"image id 2, annotation id 5: bbox .* outside the 500x375 image",
        ),
        ("category_id", 99, r"image id 2, annotation id 5: unknown category id 99"),
        ("id", 0, r"annotation id 0: annotation ids must be unique ints >= 1"),
        ("image_id", 42, r"image id 42, annotation id 5: unknown image id"),
    ],
)
def test_invalid_annotations_name_image_and_annotation(example, field, value, match):
    _, d = example
    bad = copy.deepcopy(d)
    ann = next(a for a in bad["annotations"] if a["id"] == 5)
    assert ann["image_id"] == 2
    ann[field] = value
    with pytest.raises(ValueError, match=match):
        validate_coco_dataset(bad, "bad.json")


def test_invalid_file_fails_when_the_loader_is_built(example, tmp_path):
    root, d = example
    bad = copy.deepcopy(d)
    bad["annotations"][3]["bbox"][2] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json: image id 2, annotation id 4: negative width"):
        build_detection_loader(_cfg(tmp_path / "bad.json", root), "train")


def test_val_batches_match_annotations(example):
    root, d = example
    loader = build_detection_loader(_cfg(root / "annotations.json", root), "val", micro_batch=2)
    ann = loader.annotations
    assert loader.num_samples == 3 and loader.batches_per_epoch == 2
    assert ann.label_to_cat == list(range(1, 21)) and ann.class_names[14] == "person"
    seen = {}
    for images, mask, targets, infos in loader:
        assert images.dtype == torch.float32 and images.shape[:2] == (2, 3)
        assert mask.shape == (2, *images.shape[2:]) and mask.dtype == torch.bool
        for b, info in enumerate(infos):
            h, w = info["size"]
            assert min(h, w) == 200  # val_size 800 * 0.25
            assert not mask[b, :h, :w].any() and mask[b].sum() == mask[b].numel() - h * w
            assert images[b, :, h:, :].abs().sum() == 0 and images[b, :, :, w:].abs().sum() == 0
            seen[info["image_id"]] = (info, targets[b])
    assert sorted(seen) == [1, 2, 3]
    for iid, (info, t) in seen.items():
        img = next(i for i in d["images"] if i["id"] == iid)
        assert info["orig_size"] == [img["height"], img["width"]]
        gt = [a for a in d["annotations"] if a["image_id"] == iid]
        # Labels map back to the category ids of the file, boxes to its pixel coordinates.
        assert [ann.label_to_cat[int(x)] for x in t["labels"]] == [a["category_id"] for a in gt]
        cx, cy, bw, bh = t["boxes"].unbind(1)
        xywh = torch.stack(
            [
                (cx - bw / 2) * img["width"],
                (cy - bh / 2) * img["height"],
                bw * img["width"],
                bh * img["height"],
            ],
            1,
        )
        assert torch.allclose(xywh, torch.tensor([a["bbox"] for a in gt]), atol=0.05)


def test_train_augmentation_sizes_and_boxes(example):
    root, _ = example
    cfg = _cfg(root / "annotations.json", root)
    loader = build_detection_loader(cfg, "train", micro_batch=3, seed=1)
    scales = {cfg.scaled(s) for s in cfg.train_scales}
    for epoch in range(4):
        loader.set_epoch(epoch)
        for images, _mask, targets, infos in loader:
            for b, info in enumerate(infos):
                h, w = info["size"]
                assert min(h, w) in scales or max(h, w) == cfg.scaled(cfg.max_size)
                assert images.shape[2] == max(i["size"][0] for i in infos)
                t = targets[b]
                assert t["boxes"].shape == (len(t["labels"]), 4)
                assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
                assert ((t["labels"] >= 0) & (t["labels"] < 20)).all()


def test_crowd_excluded_empty_images_and_sharding(example, tmp_path):
    root, d = example
    d = copy.deepcopy(d)
    shutil.copytree(root / "JPEGImages", tmp_path / "JPEGImages")
    d["annotations"][0]["iscrowd"] = 1  # image 1 keeps 2 of its 3 boxes
    shutil.copy(root / d["images"][0]["file_name"], tmp_path / "JPEGImages" / "empty.jpg")
    d["images"].append({**d["images"][0], "id": 4, "file_name": "JPEGImages/empty.jpg"})  # no annotations
    (tmp_path / "ann.json").write_text(json.dumps(d))
    cfg = _cfg(tmp_path / "ann.json", tmp_path)
    per_rank = []
    for rank in range(2):
        loader = build_detection_loader(cfg, "val", rank=rank, world_size=2, micro_batch=1)
        assert loader.batches_per_epoch == 2
        per_rank.append(
            {info["image_id"]: len(t["labels"]) for _, _, ts, infos in loader for t, info in zip(ts, infos)}
        )
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    counts = {**per_rank[0], **per_rank[1]}
    assert counts == {1: 2, 2: 3, 3: 6, 4: 0}


def test_more_ranks_than_images(example):
    """4 ranks on the 3 labelme photos (DALI refuses more shards than images): every rank gets a batch, the
    validation ranks together cover each image, and the extra rank's copy has its own augmentation."""
    root, _ = example
    cfg = _cfg(root / "annotations.json", root)
    val = [build_detection_loader(cfg, "val", rank=r, world_size=4, micro_batch=1) for r in range(4)]
    seen = [[info["image_id"] for _, _, _, infos in loader for info in infos] for loader in val]
    assert all(len(ids) == 1 for ids in seen), seen
    assert {i for ids in seen for i in ids} == {1, 2, 3} and seen[3] == seen[0]
    train = [
        build_detection_loader(cfg, "train", rank=r, world_size=4, seed=3, micro_batch=1) for r in (0, 3)
    ]
    (img0, _, t0, i0), (img3, _, t3, i3) = (next(iter(loader)) for loader in train)
    assert i0[0]["image_id"] == i3[0]["image_id"]  # the same shard ...
    assert img0.shape != img3.shape or not torch.equal(img0, img3)  # ... augmented differently


def test_train_loader_resumes_mid_epoch_exactly(example):
    root, _ = example
    cfg = _cfg(root / "annotations.json", root)
    loader = build_detection_loader(cfg, "train", micro_batch=2, seed=3)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = list(it)
    loader.set_epoch(1)
    rest += list(loader)
    again = build_detection_loader(cfg, "train", micro_batch=2, seed=3)
    again.set_epoch(0)
    again.load_state_dict(state)
    resumed = list(again)
    again.set_epoch(1)
    resumed += list(again)
    assert len(resumed) == len(rest) == 3
    for x, y in zip(rest, resumed):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        assert [i["image_id"] for i in x[3]] == [i["image_id"] for i in y[3]]
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(x[2], y[2]))


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(example):
    """nvJPEG ("mixed") decoding and GPU resizing: same geometry and targets, nearly the same pixels."""
    root, _ = example
    batches = {}
    for device in ("cpu", "gpu"):
        cfg = _cfg(root / "annotations.json", root)
        cfg.device = device
        loader = build_detection_loader(cfg, "val", micro_batch=3, device="cuda")
        batches[device] = next(iter(loader))
    (ic, mc, tc, nc), (ig, mg, tg, ng) = batches["cpu"], batches["gpu"]
    assert ig.device.type == "cuda" and ic.shape == ig.shape and torch.equal(mc, mg) and nc == ng
    for a, b in zip(tc, tg):
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["boxes"], b["boxes"])
    assert (ic - ig).abs().mean() < 0.05  # decoders differ by a few 8-bit levels


def test_train_shards_partition_every_epoch(example, tmp_path):
    root, d = example
    d = copy.deepcopy(d)
    shutil.copytree(root / "JPEGImages", tmp_path / "JPEGImages")
    shutil.copy(root / d["images"][0]["file_name"], tmp_path / "JPEGImages" / "extra.jpg")
    d["images"].append({**d["images"][0], "id": 4, "file_name": "JPEGImages/extra.jpg"})
    (tmp_path / "ann.json").write_text(json.dumps(d))
    cfg = _cfg(tmp_path / "ann.json", tmp_path)
    loaders = [
        build_detection_loader(cfg, "train", rank=r, world_size=2, seed=5, micro_batch=1) for r in range(2)
    ]
    orders = []
    for epoch in range(3):
        ids = []
        for loader in loaders:
            loader.set_epoch(epoch)
            ids += [info["image_id"] for _, _, _, infos in loader for info in infos]
        assert sorted(ids) == [1, 2, 3, 4], (epoch, ids)
        orders.append(ids)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def test_flipped_and_cropped_boxes_cover_their_objects(tmp_path):
    """Ground truth that can be seen: a red and a blue rectangle painted exactly where their boxes are. After
    every random flip, crop and resize, each target box (converted to pixels of the augmented image) must
    be the bounding box of its color in the augmented image, and a box cropped away must have no color left.
    """
    import numpy as np
    from PIL import Image

    img = np.full((240, 320, 3), 128, np.uint8)
    objects = {1: ((100, 60, 80, 100), (255, 0, 0)), 2: ((230, 150, 60, 50), (0, 0, 255))}
    for (x, y, w, h), color in objects.values():
        img[y : y + h, x : x + w] = color
    Image.fromarray(img).save(tmp_path / "shapes.jpg", quality=98)
    dataset = {
        "images": [{"id": 1, "file_name": "shapes.jpg", "width": 320, "height": 240}],
        "annotations": [
            {
                "id": cid,
                "image_id": 1,
                "category_id": cid,
                "bbox": list(box),
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for cid, (box, _) in objects.items()
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(dataset))
    cfg = _cfg(tmp_path / "ann.json", tmp_path)
    loader = build_detection_loader(cfg, "train", micro_batch=1, seed=4)
    mean = torch.tensor(cfg.mean)[:, None, None]
    std = torch.tensor(cfg.std)[:, None, None]
    red_side, cropped, checked = set(), 0, 0
    for epoch in range(24):
        loader.set_epoch(epoch)
        for images, _mask, targets, infos in loader:
            h, w = infos[0]["size"]
            rgb = (images[0, :, :h, :w] * std + mean) * 255  # [3, h, w]
            cropped += abs(w / h - 320 / 240) > 0.03  # a crop window changes the aspect ratio
            labels = targets[0]["labels"].tolist()
            for label, color in enumerate((objects[1][1], objects[2][1])):
                c = torch.tensor(color, dtype=torch.float32)[:, None, None]
                hit = ((rgb - c).abs().max(0).values < 60).nonzero()  # [K, 2] (y, x)
                if label not in labels:
                    assert len(hit) < 0.001 * h * w, f"epoch {epoch}: a pruned box's object is still visible"
                    continue
                cx, cy, bw, bh = targets[0]["boxes"][labels.index(label)].tolist()
                box = torch.tensor(
                    [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
                )
                seen = torch.tensor(
                    [hit[:, 1].min(), hit[:, 0].min(), hit[:, 1].max() + 1, hit[:, 0].max() + 1]
                )
                assert (box - seen).abs().max() <= 3, (epoch, label, box.tolist(), seen.tolist(), (w, h))
                checked += 1
                if label == 0:
                    red_side.add(cx < 0.5)
    assert checked >= 30 and red_side == {True, False} and cropped > 0, (checked, red_side, cropped)
