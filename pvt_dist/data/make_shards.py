"""Convert an ImageNet-style tree or Fashion-MNIST into WebDataset tar shards with DALI index files.

    python -m pvt_dist.data.make_shards imagenet --root /data/ILSVRC2012 --out data/in1k
        [--val-labels LOC_val_solution.csv] [--classes imagenet1k|FILE] [--shard-bytes 256MB] [--workers 8]
    python -m pvt_dist.data.make_shards fashion-mnist --out data/fashion_mnist

Output: `<split>-NNNNNN.tar` (samples `<key>.jpg` + `<key>.cls`), one `<split>-NNNNNN.idx` per shard,
`manifest.json` (classes, samples/bytes/sha256 per shard) and `rejects.jsonl` (file, reason).

Samples are shuffled globally before writing because readers only shuffle inside a buffer. Each shard is
written to a temporary name, indexed, renamed, and only then gets its completion record under
`.progress/`; a rerun skips shards whose record matches the file on disk, so a crash never leaves a
partial shard that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

FORMAT = "pvt-dist-wds/1"


@dataclass
class Sample:
    key: str  # tar member stem, no dots
    label: int
    source: str  # file path (or a description for in-memory images)
    pixels: np.ndarray | None = None  # in-memory image [H,W] or [H,W,3] uint8 (Fashion-MNIST)
    size: int = 0  # source bytes, used to cut shards by size


class Reject(Exception):
    """An input image that cannot be used; recorded in rejects.jsonl, never fatal."""


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as the image is meant to be seen.

    PIL's ``convert("RGB")`` clips 16-bit gray (PNG mode ``I;16``/``I``) at 255, turning most of the image
    white, and drops alpha, so transparent pixels show whatever color they store (often black). Here 16-bit
    values are scaled to 8 bits, and images with alpha (RGBA, LA, palettes with transparency) are
    composited onto white.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 1 / 257 if im.mode != "I" or np.asarray(im).max() > 255 else 1.0
        gray = np.clip(np.asarray(im, dtype=np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def prepare_image(data: bytes) -> tuple[bytes, str | None]:
    """Return JPEG bytes DALI and PIL both decode to RGB/gray, and a note when re-encoded.

    Baseline RGB or grayscale JPEGs are kept byte for byte; CMYK, progressive, PNG-as-.JPEG and other
    formats are decoded once and re-encoded (quality 95). Raises Reject for unreadable data.
    """
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode = im.format, im.mode
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise Reject(f"cannot decode: {type(e).__name__}: {e}") from None
    if im.width < 1 or im.height < 1:
        raise Reject(f"empty image {im.width}x{im.height}")
    if fmt == "JPEG" and mode in ("RGB", "L") and not progressive:
        return data, None
    rgb = to_rgb(im)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=95)
    return out.getvalue(), f"re-encoded from {fmt} {mode}{' progressive' if progressive else ''}"


def encode_pixels(pixels: np.ndarray) -> bytes:
    """uint8 [H,W] gray or [H,W,3] -> RGB JPEG bytes."""
    im = Image.fromarray(pixels).convert("RGB")
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=95)
    return out.getvalue()


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _record_path(out: str, split: str, i: int) -> str:
    return os.path.join(out, ".progress", f"{split}-{i:06d}.json")


def shard_complete(out: str, split: str, i: int) -> dict | None:
    """The completion record of shard i if the shard on disk is the one the record describes."""
    rec_path = _record_path(out, split, i)
    if not os.path.isfile(rec_path):
        return None
    with open(rec_path) as f:
        rec = json.load(f)
    if rec["num_samples"] == 0:
        return rec
    tar = os.path.join(out, rec["name"])
    if not (os.path.isfile(tar) and os.path.getsize(tar) == rec["bytes"]):
        return None
    if not os.path.isfile(os.path.join(out, rec["index"])):
        return None
    return rec


def write_shard(job: tuple[str, str, int, list[Sample]]) -> dict:
    """Write one shard (tar + idx) atomically and its completion record; return the record."""
    import webdataset as wds
    from wds2idx import IndexCreator

    out, split, i, samples = job
    name = shard_name(split, i)
    tar, idx = os.path.join(out, name), os.path.join(out, name[:-4] + ".idx")
    tmp_tar, tmp_idx = f"{tar}.tmp{os.getpid()}", f"{idx}.tmp{os.getpid()}"
    rejects, reencoded, written = [], 0, 0
    with open(tmp_tar, "wb") as f, wds.TarWriter(f, mtime=0.0) as sink:
        for s in samples:
            try:
                if s.pixels is not None:
                    data, note = encode_pixels(s.pixels), None
                else:
                    with open(s.source, "rb") as src:
                        data, note = prepare_image(src.read())
            except (Reject, OSError) as e:
                rejects.append({"file": s.source, "key": s.key, "split": split, "reason": str(e)})
                continue
            reencoded += note is not None
            sink.write({"__key__": s.key, "jpg": data, "cls": s.label})
            written += 1
        f.flush()
        os.fsync(f.fileno())
    rec = {"name": name, "index": os.path.basename(idx), "num_samples": written, "rejects": rejects}
    rec["reencoded"] = reencoded
    if written == 0:  # every image rejected: no shard, but the rejects are still recorded
        os.remove(tmp_tar)
    else:
        with IndexCreator(tmp_tar, tmp_idx, verbose=False) as ic:
            ic.create_index()
        os.replace(tmp_tar, tar)
        os.replace(tmp_idx, idx)
        rec["bytes"] = os.path.getsize(tar)
        rec["sha256"] = _sha256(tar)
    _atomic_write_json(_record_path(out, split, i), rec)
    return rec


def plan_shards(
    samples: list[Sample], shard_samples: int | None, shard_bytes: int | None
) -> list[list[Sample]]:
    """Cut the (already shuffled) sample list into shards by count and/or source bytes."""
    shards, cur, cur_bytes = [], [], 0
    for s in samples:
        if cur and (
            (shard_samples and len(cur) >= shard_samples)
            or (shard_bytes and cur_bytes + s.size > shard_bytes)
        ):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += s.size
    if cur:
        shards.append(cur)
    return shards


def convert_split(
    samples: list[Sample],
    out: str,
    split: str,
    *,
    seed: int = 0,
    shard_samples: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Shuffle, cut and write one split; return its manifest entry. Resumes a previous partial run."""
    import webdataset  # noqa: F401 - imported once here rather than in every forked worker
    from tqdm import tqdm

    os.makedirs(os.path.join(out, ".progress"), exist_ok=True)
    samples = list(samples)
    random.Random(f"{seed}-{split}").shuffle(samples)
    plan = plan_shards(samples, shard_samples, shard_bytes)
    fingerprint = hashlib.sha256(
        "\n".join(f"{s.key} {s.label} {s.source}" for s in samples).encode()
        + f"|{shard_samples}|{shard_bytes}".encode()
    ).hexdigest()
    plan_path = os.path.join(out, ".progress", f"plan-{split}.json")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old["fingerprint"] != fingerprint:
            raise ValueError(
                f"{out}: holds {split} shards of a different conversion (other inputs, seed or shard size); "
                "use an empty --out directory"
            )
    else:
        _atomic_write_json(plan_path, {"fingerprint": fingerprint, "num_shards": len(plan)})

    records: dict[int, dict] = {}
    todo = []
    for i, shard in enumerate(plan):
        rec = shard_complete(out, split, i)
        if rec is not None:
            records[i] = rec
        else:
            todo.append((out, split, i, shard))
    bar = tqdm(total=len(samples), desc=f"{split} shards", unit="img", disable=not progress, file=sys.stderr)
    bar.update(sum(len(plan[i]) for i in records))
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for rec in pool.imap_unordered(write_shard, todo):
                i = int(rec["name"][len(split) + 1 : -4])
                records[i] = rec
                bar.update(len(plan[i]))
    else:
        for job in todo:
            records[job[2]] = write_shard(job)
            bar.update(len(job[3]))
    bar.close()
    ordered = [records[i] for i in range(len(plan))]
    shards = [
        {k: r[k] for k in ("name", "index", "num_samples", "bytes", "sha256")}
        for r in ordered
        if r["num_samples"]
    ]
    rejects = [rj for r in ordered for rj in r["rejects"]]
    return {
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_rejects": len(rejects),
        "num_reencoded": sum(r["reencoded"] for r in ordered),
        "shards": shards,
        "rejects": rejects,
    }


def write_manifest(
    out: str, dataset: str, classes: list[str], splits: dict[str, dict], seed: int, **extra
) -> dict:
    """Merge the converted splits into manifest.json and rejects.jsonl (other splits are kept)."""
    mpath = os.path.join(out, "manifest.json")
    manifest = {"format": FORMAT, "dataset": dataset, "classes": classes, "seed": seed, "splits": {}, **extra}
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        if old.get("classes") == classes:
            manifest["splits"] = old.get("splits", {})
    all_rejects = []
    for split, entry in splits.items():
        all_rejects += entry.pop("rejects")
        manifest["splits"][split] = entry
    rpath = os.path.join(out, "rejects.jsonl")
    kept = []
    if os.path.isfile(rpath):
        with open(rpath) as f:
            kept = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in kept if r["split"] not in splits]
    with open(f"{rpath}.tmp", "w") as f:
        for r in kept + all_rejects:
            f.write(json.dumps(r) + "\n")
    os.replace(f"{rpath}.tmp", rpath)
    _atomic_write_json(mpath, manifest)
    return manifest


# ---------------------------------------------------------------- CLI


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 256MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def main(argv: list[str] | None = None) -> int:
    from pvt_dist.data.fashion_mnist import FMNIST_DIR, make_fashion_mnist_shards
    from pvt_dist.data.imagenet import make_imagenet_shards

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory")
    common.add_argument("--seed", type=int, default=0, help="global shuffle seed")
    common.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel shards")
    common.add_argument("--shard-samples", type=int, default=None, help="max samples per shard")
    common.add_argument("--no-progress", action="store_true")
    im = sub.add_parser(
        "imagenet", parents=[common], help="ImageNet-style tree root/{train,val}/<wnid>/*.JPEG"
    )
    im.add_argument("--root", required=True)
    im.add_argument("--splits", default="train,val")
    im.add_argument(
        "--classes", default=None, help='class list file, or "imagenet1k"; default: sorted train/'
    )
    im.add_argument("--val-labels", default=None, help="ground truth for a flat val/ folder (CSV or text)")
    im.add_argument(
        "--shard-bytes", type=_parse_bytes, default=_parse_bytes("256MB"), help="target shard size"
    )
    fm = sub.add_parser("fashion-mnist", parents=[common], help=f"Fashion-MNIST from {FMNIST_DIR}")
    fm.add_argument("--source", default=FMNIST_DIR)
    fm.add_argument("--limit-train", type=int, default=None, help="random subset of the 60k train images")
    fm.add_argument("--limit-val", type=int, default=None, help="random subset of the 10k test images")
    args = p.parse_args(argv)
    kw = dict(seed=args.seed, workers=args.workers, progress=not args.no_progress)
    if args.dataset == "imagenet":
        manifest = make_imagenet_shards(
            args.root, args.out, tuple(args.splits.split(",")), args.classes, args.val_labels,
            shard_samples=args.shard_samples, shard_bytes=args.shard_bytes, **kw,
        )  # fmt: skip
    else:
        manifest = make_fashion_mnist_shards(
            args.out, args.source, args.limit_train, args.limit_val, args.shard_samples or 10000, **kw
        )
    for split, entry in manifest["splits"].items():
        print(
            f"{split}: {entry['num_samples']} samples in {len(entry['shards'])} shards, "
            f"{entry['num_reencoded']} re-encoded, {entry['num_rejects']} rejected"
        )
    n_rej = sum(e["num_rejects"] for e in manifest["splits"].values())
    print(f"rejects: {n_rej} (listed in {os.path.join(args.out, 'rejects.jsonl')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
