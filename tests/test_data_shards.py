"""make_shards on a tree of real photos (scikit-image / scikit-learn) with the odd files of real ImageNet."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import SKIMAGE, SKLEARN, jpeg_from
from PIL import Image

from pvt_dist.data.fashion_mnist import FMNIST_DIR, make_fashion_mnist_shards
from pvt_dist.data.imagenet import make_imagenet_shards
from pvt_dist.data.index import check_shard, read_index
from pvt_dist.data.make_shards import main, prepare_image


def read_split(out: Path, split: str) -> dict[str, tuple[int, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
    return {s["__key__"]: (int(s["cls"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)}


@pytest.fixture
def tree(photo_tree):
    return photo_tree


def test_prepare_image_kinds(tree):
    root, _ = tree
    t = root / "train"
    gray = (t / "n01440764" / "n01440764_camera.JPEG").read_bytes()
    assert prepare_image(gray) == (gray, None)
    data, note = prepare_image((t / "n01443537" / "n01443537_cmyk.JPEG").read_bytes())
    assert "CMYK" in note and Image.open(io.BytesIO(data)).mode == "RGB"
    data, note = prepare_image((t / "n01484850" / "n01484850_png.JPEG").read_bytes())
    assert "PNG" in note and Image.open(io.BytesIO(data)).format == "JPEG"


def test_imagenet_tree_conversion(tree, tmp_path):
    root, exp = tree
    out = tmp_path / "shards"
    manifest = make_imagenet_shards(
        str(root),
        str(out),
        val_labels=str(root / "LOC_val_solution.csv"),
        shard_samples=3,
        workers=2,
        progress=False,
    )
    assert manifest["classes"] == exp["wnids"]
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (tr["num_samples"], tr["num_rejects"], tr["num_reencoded"]) == (9, 2, 2)
    assert (va["num_samples"], va["num_rejects"]) == (4, 0)
    counts = [s["num_samples"] for s in tr["shards"]]  # 11 files cut by 3; the 2 rejects leave holes
    assert len(counts) == 4 and sum(counts) == 9 and max(counts) == 3
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in rejects) == [
        "n01440764_truncated.JPEG",
        "n01443537_garbage.JPEG",
    ]
    assert all(r["reason"].startswith("cannot decode") for r in rejects)
    for split in ("train", "val"):
        samples = read_split(out, split)
        assert len(samples) == manifest["splits"][split]["num_samples"]
        for key, (label, _) in samples.items():
            assert "." not in key and label == exp["labels"][key]
        for s in manifest["splits"][split]["shards"]:
            assert check_shard(str(out / s["name"]), str(out / s["index"]), "t") == s["num_samples"]
            assert len(read_index(str(out / s["index"]))) == s["num_samples"]
    train = read_split(out, "train")
    assert train["n01440764_china"][1] == (SKLEARN / "china.jpg").read_bytes()  # baseline JPEG kept as is
    for key, (_, data) in train.items():  # everything DALI gets is an RGB or gray JPEG
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.mode in ("RGB", "L"), key
    # Global shuffle: shard order is not class order, and the seed fixes it.
    assert [k for k in read_split(out, "train")] != sorted(train)


def test_resume_after_crash(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "shards"
    args = ["imagenet", "--root", str(root), "--out", str(out), "--splits", "train", "--shard-samples", "3"]
    assert main([*args, "--workers", "1", "--no-progress"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # Crash while writing shard 1: its record is gone and the tar is half written.
    (out / ".progress" / "train-000001.json").unlink()
    tar = out / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    time.sleep(0.01)
    assert main([*args, "--workers", "1", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text()) == first  # same shards, same checksums
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert [n for n in now if now[n] != stamps[n]] == ["train-000001.tar"]
    assert not list(out.glob("*.tmp*"))
    # A different conversion into the same folder is refused instead of mixing shards.
    with pytest.raises(ValueError, match="different conversion"):
        main([*args, "--shard-samples", "4", "--no-progress"])


def test_class_folder_val_and_class_file(tree, tmp_path):
    root, exp = tree
    alt = tmp_path / "tree"
    (alt / "val" / "n01443537").mkdir(parents=True)
    os.symlink(root / "train", alt / "train")
    jpeg_from(SKIMAGE / "astronaut.png", alt / "val" / "n01443537" / "a.JPEG")
    classes = tmp_path / "classes.txt"
    classes.write_text("n01484850 tench\nn01440764 goldfish\nn01443537 shark\n")
    m = make_imagenet_shards(str(alt), str(tmp_path / "o"), classes=str(classes), progress=False)
    assert m["classes"] == ["n01484850", "n01440764", "n01443537"]
    assert {k: v[0] for k, v in read_split(tmp_path / "o", "val").items()} == {"a": 2}
    tr = read_split(tmp_path / "o", "train")
    assert tr["n01484850_rocket"][0] == 0 and tr["n01440764_china"][0] == 1


def test_bad_trees(tree, tmp_path):
    root, _ = tree
    bad = tmp_path / "bad"
    (bad / "train" / "n01440764").mkdir(parents=True)
    (bad / "train" / "n09999999").mkdir(parents=True)
    jpeg_from(SKIMAGE / "coffee.png", bad / "train" / "n01440764" / "x.JPEG")
    with pytest.raises(ValueError, match="n09999999: class folder is empty"):
        make_imagenet_shards(str(bad), str(tmp_path / "o1"), splits=("train",), progress=False)
    classes = tmp_path / "c.txt"
    classes.write_text("n01440764\n")
    (bad / "train" / "n09999999" / "y.JPEG").write_bytes((SKLEARN / "china.jpg").read_bytes())
    with pytest.raises(ValueError, match="'n09999999' is not in the class list"):
        make_imagenet_shards(
            str(bad), str(tmp_path / "o2"), splits=("train",), classes=str(classes), progress=False
        )
    with pytest.raises(ValueError, match="flat validation layout needs --val-labels"):
        make_imagenet_shards(str(root), str(tmp_path / "o3"), splits=("val",), progress=False)
    labels = tmp_path / "val.txt"  # text ground truth with an unknown wnid
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002.JPEG n00000000\n")
    with pytest.raises(ValueError, match=r"val.txt:2: unknown class 'n00000000'"):
        make_imagenet_shards(
            str(root), str(tmp_path / "o4"), splits=("val",), val_labels=str(labels), progress=False
        )


def test_fmnist_fixture_subset(fmnist_shards):
    manifest = json.loads((fmnist_shards / "manifest.json").read_text())
    assert manifest["dataset"] == "fashion-mnist" and len(manifest["classes"]) == 10
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (tr["num_samples"], va["num_samples"]) == (2048, 512)
    assert [s["num_samples"] for s in tr["shards"]] == [512] * 4
    samples = read_split(fmnist_shards, "val")
    assert len(samples) == 512 and {label for label, _ in samples.values()} == set(range(10))
    im = Image.open(io.BytesIO(next(iter(samples.values()))[1]))
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (28, 28))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fmnist_full_conversion(tmp_path):
    t0 = time.perf_counter()
    m = make_fashion_mnist_shards(str(tmp_path), workers=2, progress=False)
    print(f"full Fashion-MNIST conversion: {time.perf_counter() - t0:.1f} s")
    assert (m["splits"]["train"]["num_samples"], m["splits"]["val"]["num_samples"]) == (60000, 10000)
    assert len(m["splits"]["train"]["shards"]) == 6 and m["splits"]["train"]["num_rejects"] == 0
    labels = [label for label, _ in read_split(tmp_path, "val").values()]
    assert [labels.count(c) for c in range(10)] == [1000] * 10  # the test set is balanced


def test_imagenet1k_class_order(tree, tmp_path):
    """--classes imagenet1k: timm's synset list, i.e. the standard 1000-class label order."""
    root, exp = tree
    assert main(["imagenet", "--root", str(root), "--out", str(tmp_path), "--splits", "train", "--classes",
                 "imagenet1k", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["classes"]) == 1000 and manifest["classes"][:3] == exp["wnids"]
    assert {k: v[0] for k, v in read_split(tmp_path, "train").items()} == {
        k: v
        for k, v in exp["labels"].items()
        if not k.startswith("ILSVRC") and "truncated" not in k and "garbage" not in k
    }
