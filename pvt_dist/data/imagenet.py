"""ImageNet-style trees -> samples: class order, `train/<wnid>/*` folders, flat val layout + ground truth."""

from __future__ import annotations

import os
import re

from pvt_dist.data.make_shards import Sample, convert_split, write_manifest


def load_classes(spec: str | None, train_dir: str | None) -> list[str]:
    """Class list: a file (one wnid per line, first token), "imagenet1k" (timm's synset order) or the
    sorted folder names of train/ (the standard ImageNet-1k order when all 1000 are present)."""
    if spec == "imagenet1k":
        import timm.data

        path = os.path.join(os.path.dirname(timm.data.__file__), "_info", "imagenet_synsets.txt")
        spec = path
    if spec:
        with open(spec) as f:
            classes = [line.split()[0] for line in f if line.strip()]
        if len(set(classes)) != len(classes):
            raise ValueError(f"--classes {spec}: duplicate class names")
        return classes
    if not train_dir or not os.path.isdir(train_dir):
        raise ValueError("no class list: give --classes or a tree with a train/ folder")
    return sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))


def _key(name: str, seen: set[str]) -> str:
    """File name -> tar key without dots (DALI splits key and extension at the first dot)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(name)[0]) or "img"
    key, n = stem, 1
    while key in seen:
        key, n = f"{stem}_{n}", n + 1
    seen.add(key)
    return key


def _files(d: str) -> list[os.DirEntry]:
    return sorted(
        (e for e in os.scandir(d) if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name
    )


def list_class_tree(split_dir: str, classes: list[str]) -> list[Sample]:
    """`<split>/<wnid>/*` -> samples; unknown class folders and empty folders are errors."""
    index = {c: i for i, c in enumerate(classes)}
    samples, seen = [], set()
    for d in sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")):
        if d not in index:
            raise ValueError(
                f"{split_dir}/{d}: class {d!r} is not in the class list ({len(classes)} classes)"
            )
        files = _files(os.path.join(split_dir, d))
        if not files:
            raise ValueError(f"{split_dir}/{d}: class folder is empty")
        for e in files:
            samples.append(Sample(_key(e.name, seen), index[d], e.path, size=e.stat().st_size))
    if not samples:
        raise ValueError(f"{split_dir}: no class folders")
    return samples


def read_val_labels(path: str, classes: list[str]) -> dict[str, int]:
    """Flat-val ground truth -> {file stem: label}.

    Accepts the Kaggle/LOC CSV (`ImageId,PredictionString` whose first token is the wnid) and text files
    with `<file> <wnid>` or `<file> <index into the class list>` per line.
    """
    index = {c: i for i, c in enumerate(classes)}
    labels = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("ImageId"):
            continue
        name, _, rest = line.replace(",", " ", 1).partition(" ")
        tok = rest.split()[0] if rest.split() else ""
        if tok in index:
            label = index[tok]
        elif tok.isdigit() and int(tok) < len(classes):
            label = int(tok)
        else:
            raise ValueError(f"{path}:{n}: unknown class {tok!r} for {name!r}")
        labels[os.path.splitext(os.path.basename(name))[0]] = label
    return labels


def list_flat_val(val_dir: str, labels: dict[str, int], label_file: str) -> list[Sample]:
    samples, seen = [], set()
    for e in _files(val_dir):
        stem = os.path.splitext(e.name)[0]
        if stem not in labels:
            raise ValueError(f"{val_dir}/{e.name}: no label in {label_file}")
        samples.append(Sample(_key(e.name, seen), labels[stem], e.path, size=e.stat().st_size))
    if not samples:
        raise ValueError(f"{val_dir}: no images")
    return samples


def make_imagenet_shards(
    root: str,
    out: str,
    splits: tuple[str, ...] = ("train", "val"),
    classes: str | None = None,
    val_labels: str | None = None,
    **kw,
) -> dict:
    """Convert `root/{train,val}`; val may be class folders or flat with a label file."""
    os.makedirs(out, exist_ok=True)
    class_list = load_classes(classes, os.path.join(root, "train"))
    done = {}
    for split in splits:
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d}: split folder does not exist")
        has_dirs = any(e.is_dir() for e in os.scandir(d))
        if split != "train" and not has_dirs:
            if not val_labels:
                raise ValueError(f"{d}: flat validation layout needs --val-labels (CSV or text ground truth)")
            samples = list_flat_val(d, read_val_labels(val_labels, class_list), val_labels)
        else:
            samples = list_class_tree(d, class_list)
        done[split] = convert_split(samples, out, split, **kw)
    return write_manifest(out, "imagenet", class_list, done, kw.get("seed", 0))
